"""Benchmarks and the perf tool of the exposure monitor."""
