"""Benchmarks for moba-compile (GPU only; see ``python -m benchmarks.attention --help``)."""
