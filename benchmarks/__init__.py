"""The benchmarks a user runs, as modules: `python -m benchmarks.bench_attention` from the repository root."""
