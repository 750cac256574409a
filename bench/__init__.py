"""Benchmarks: scripts that put firekit beside ANTs, Greedy, elastix and ConvexAdam and print tables (python -m bench.NAME)."""
