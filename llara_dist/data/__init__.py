"""Data path: raw interaction logs -> samples -> WebDataset shards -> prompts -> batches."""
