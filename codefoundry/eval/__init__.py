"""Evaluation: bits per byte, and pass@k benchmarks in a sandbox."""
