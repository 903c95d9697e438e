"""Conventional sequential recommenders (SASRec, GRU4Rec, Caser) and their frozen item table."""
