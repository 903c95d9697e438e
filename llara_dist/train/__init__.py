"""Distributed training: Ray Train driver, per-worker DeepSpeed loop, curriculum, checkpoints."""
