"""Benchmarks: each prints one JSON line; run them as ``python -m bench.<name>`` from the repository root."""
