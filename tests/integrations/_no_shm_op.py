"""Imported by the DeepSpeed ranks the tests launch: DeepSpeed builds a shared-memory all-reduce
op (two C++ files, 1 to 3 minutes on two cores) when it starts its communication backend on the
CPU, and gloo alone does the reductions of these tiny models, so the build is stubbed out. By
sys.modules: ``import deepspeed.comm.torch as m`` binds the attribute ``torch`` of
deepspeed.comm, which is the torch package itself."""

import importlib
import sys

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
