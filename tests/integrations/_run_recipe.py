"""Runs a script as ``python script.py`` would, without DeepSpeed's build of its shared-memory op
(_no_shm_op.py), which it makes on its first CPU launch: the docs' recipe is tested as written,
without that build in each fresh CI cache."""

import runpy
import sys

import _no_shm_op  # noqa: F401

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
