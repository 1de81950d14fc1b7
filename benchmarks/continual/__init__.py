"""Continual-learning suite (issue 6): python -m benchmarks.continual --help."""
