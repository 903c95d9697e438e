"""llara-dist: distributed training of LLaRA-style LLM sequential recommenders."""

__version__ = "0.1.0"
