"""Inference: sampling, KV-cache generation with stop strings and streaming."""
