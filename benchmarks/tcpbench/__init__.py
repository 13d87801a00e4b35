"""Helpers for benchmarks/bench.py: peers, processes, targets, workloads, report."""
