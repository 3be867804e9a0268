"""Command-line entry points, store inspection and benchmarks."""
