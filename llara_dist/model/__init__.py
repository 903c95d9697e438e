"""The LLaRA model: base causal LM + LoRA + projector + embedding injection."""
