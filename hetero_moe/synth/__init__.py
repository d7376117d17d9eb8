"""Synthetic checkpoints in the real on-disk layout: tiny ones for tests, real-size ones for
benchmarks, and the demo model."""
