"""Checkpoint reading: safetensors headers, FP8 dequantization, streaming weights to their ops."""
