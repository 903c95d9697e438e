"""Evaluation: distributed generation, answer matching, metrics and reports."""
