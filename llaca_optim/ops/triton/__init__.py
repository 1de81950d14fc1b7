"""The Triton kernels as an op namespace: ``llaca_optim_triton``, the ops' schemas with the
launcher (``launcher.py``, kernels in ``kernels.py``) registered as their CUDA kernel, and as
their CPU kernel for Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run them).

A launch configuration other than the tuned one (``launcher.BLOCK``, ``launcher.NUM_WARPS``)
gets a namespace of its own, ``llaca_optim_triton_b<block>_w<warps>``: the benchmark that tunes
them times each through the same op path as a real step.
"""

from __future__ import annotations

from typing import Any

from .. import library
from ..roles import ADAMW_LLACA, LLACA_FLUSH, LLACA_UPDATE, roles_of
from . import launcher
from .launcher import BLOCK, NUM_WARPS, TritonLauncher, device_types, interpreting, status

__all__ = ["BLOCK", "NUM_WARPS", "TritonLauncher", "device_types", "interpreting", "ops_for",
           "status"]

NAMESPACE = "llaca_optim_triton"


def _kernels(launch: TritonLauncher) -> dict[str, Any]:
    def named(op: str, lists: tuple[Any, ...]) -> dict[str, Any]:
        return {role.arg: column for role, column in zip(roles_of(op), lists)}

    def adamw_llaca_(*lists: Any, **scalars: Any) -> None:
        launch.launch(named(ADAMW_LLACA, lists), adamw=True, **scalars)

    def llaca_update_(*lists: Any, **scalars: Any) -> None:
        launch.launch(named(LLACA_UPDATE, lists), adamw=False, **scalars)

    def llaca_flush_(params, emas, alphas, ema_pending) -> None:
        launch.flush(params, emas, alphas, ema_pending)

    return {ADAMW_LLACA: adamw_llaca_, LLACA_UPDATE: llaca_update_, LLACA_FLUSH: llaca_flush_}


def ops_for(block: int | None = None, num_warps: int | None = None) -> Any:
    """The op namespace of the Triton kernels launched with ``block`` elements per program and
    ``num_warps`` warps (None: the tuned values); raises ValueError for a configuration the
    kernels cannot take."""
    launch = TritonLauncher(block, num_warps)
    tuned = launch.block == launcher.BLOCK and launch.num_warps == launcher.NUM_WARPS
    namespace = NAMESPACE if tuned else f"{NAMESPACE}_b{launch.block}_w{launch.num_warps}"
    kernels = _kernels(launch)
    for key in ("CUDA", "CPU"):
        library.implement(namespace, kernels, key)
    return library.define(namespace)
