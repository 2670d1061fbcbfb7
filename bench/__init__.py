"""Benchmarks: each prints its figures beside a baseline run in the same process."""
