"""Continual-learning suite: python -m benchmarks.continual --help."""
