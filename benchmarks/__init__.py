"""Benchmarks: measured, never timed in tests. Results go to benchmarks/RESULTS.md."""
