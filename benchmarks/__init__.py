"""Benchmarks of llaca_optim (the full suite is an open issue; see step_time.py for the first)."""
