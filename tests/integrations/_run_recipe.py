"""Runs a script as ``python script.py`` would, after stubbing DeepSpeed's shared-memory op, which
DeepSpeed compiles on its first CPU launch (1 to 3 minutes): the docs' recipe is tested as
written, without that build in each fresh CI cache. gloo does the reductions of these tiny
models alone. ``import deepspeed.comm.torch as m`` would bind the torch package (see
_deepspeed_worker.py), hence sys.modules."""

import importlib
import runpy
import sys

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
