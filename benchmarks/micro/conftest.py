"""pytest-benchmark microbenchmarks: ``pytest benchmarks/`` (add ``--benchmark-disable`` to only
check that they run). Not part of the test suite (pyproject's testpaths is tests/)."""
