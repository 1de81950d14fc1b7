"""Benchmarks of llaca_optim against every baseline of docs/spec.md section 5.

* ``python -m benchmarks``: the suite (workloads.py, contenders.py, harness.py, report.py), which
  writes JSON, CSV, a markdown table and plots; ``--help`` for options.
* ``pytest benchmarks/``: pytest-benchmark microbenchmarks of each op on each backend (micro/).
"""
