"""Benchmarks: CPU experts, whole-model decode and prefill, a running server, the comparison with plain transformers."""
