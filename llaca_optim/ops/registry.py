"""Backends: the implementations behind the ops, and how one is chosen.

| name        | tensors          | op namespace (its kernels)                                  |
|-------------|------------------|-------------------------------------------------------------|
| `reference` | any device/dtype | `llaca_optim_reference`: ops/reference_kernels.py, tensor by tensor |
| `cpu`       | CPU              | `llaca_optim`: the C++ extension's kernels (csrc/cpu/)      |
| `cuda`      | CUDA             | `llaca_optim`: the extension's CUDA kernels (csrc/cuda/)    |
| `triton`    | CUDA             | `llaca_optim_triton`: ops/triton/, when triton is installed |

A backend is an op namespace plus what its kernels take (:class:`Backend`); the functional layer
(llaca_optim/functional.py) calls its op on a bucket's lists (the tensors of one param group that
share device, dtype and EMA dtype). A backend may decline single tensors it cannot handle
(float64, a layout with gaps): the optimizer hands those to the reference, so no tensor is ever
copied into a contiguous temporary and updated there.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from . import library, native
from . import reference_kernels
from . import triton as triton_ops

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendChoice",
    "BackendUnavailable",
    "available_backends",
    "backend_status",
    "reference_backend",
    "resolve_backend",
    "triton_backend",
]

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# The largest tensor each native backend's step finishes in one visit, blend included (csrc twins:
# kWholeTensorLimit in csrc/cpu/llaca_cpu.cpp, kChunk in csrc/cuda/kernel_args.h); only larger ones
# can have their blend deferred. tests/backends/test_deferred_blend.py checks both.
ONE_VISIT_LIMITS = {"cpu": 2**18, "cuda": 4096}

# Fastest first, per device type: what "auto" tries.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether one flat index walks both tensors' elements in the same order (csrc twin:
    same_layout in csrc/include/llaca/checks.h)."""
    if a.numel() <= 1:
        return True
    return all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory without gaps or overlaps, in any order
    of dimensions (a transposed tensor is dense; a strided slice is not)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter, or its state). Importing DTensor costs
    most of a second, so it is not done here: a process that has not imported it (FSDP2 and
    tensor parallelism do) has none."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class Backend:
    """An op namespace (``ops``: ``torch.ops.<namespace>``) and what its kernels take.

    ``device_type``: the tensors' device its kernels run on (None: any). ``flat_kernels``: they
    take the three kernel dtypes in dense layouts only, each state tensor laid out like its
    parameter (else the tensor goes to the reference). ``defers_blend``: a deferring step may
    leave a tensor's EMA blend pending until its next step or a flush (NOTE [deferred blend] in
    optim/deferred.py), except for tensors of at most ``one_visit_limit`` elements, which the
    kernels finish in one visit (None: any tensor may be left pending). ``runs_on_shards``: the
    kernels can run on the local shards of DTensors in the ops' sharded mode (NOTE [sharded
    parameters] in optim/sharded.py); else the optimizer hands DTensors to the reference whole.
    ``direct``: kernels (op name -> function) called instead of the op for whole DTensors, which
    dispatch ops by sharding rules that these ops do not have (the reference's only).
    """

    def __init__(self, name: str, ops: Any, *, device_type: str | None = None,
                 flat_kernels: bool = True, defers_blend: bool = False,
                 one_visit_limit: int | None = None, runs_on_shards: bool = True,
                 direct: dict[str, Any] | None = None) -> None:
        self.name = name
        self.ops = ops
        self.device_type = device_type
        self.flat_kernels = flat_kernels
        self.defers_blend = defers_blend
        self.one_visit_limit = one_visit_limit
        self.runs_on_shards = runs_on_shards
        self.direct = direct

    def accepts(self, param: Tensor, companions: list[Tensor]) -> bool:
        """Whether the kernels can update ``param`` with these state tensors in place."""
        if not self.flat_kernels:
            return self.device_type is None or param.device.type == self.device_type
        # Companions in the parameter's dtype, or float32 (the EMA of a 16-bit parameter): an EMA
        # of another dtype (ema_dtype=torch.float64, say) goes to the reference.
        return (
            (self.device_type is None or param.device.type == self.device_type)
            and param.dtype in _KERNEL_DTYPES
            and param.layout == torch.strided
            and is_dense(param)
            and all(same_layout(param, t) for t in companions)
            and all(t.dtype == param.dtype or t.dtype == torch.float32 for t in companions)
        )

    def may_defer(self, params: list[Tensor]) -> bool:
        """Whether a deferring step over ``params`` could leave any blend pending."""
        limit = self.one_visit_limit
        return self.defers_blend and (limit is None or any(p.numel() > limit for p in params))

    def call(self, op: str, lists: list[list[Tensor]], **scalars: Any) -> None:
        """Calls ``op`` of this backend's namespace on ``lists`` (the op's list arguments, in
        schema order) with its scalar arguments; whole DTensors go to ``direct``. The one
        caller is the functional layer (llaca_optim/functional.py), which builds the
        arguments."""
        if self.direct is not None and lists[0] and is_dtensor(lists[0][0]):
            self.direct[op](*lists, **scalars)
        else:
            getattr(self.ops, op)(*lists, **scalars)

    def __repr__(self) -> str:
        return f"<llaca_optim backend {self.name!r}>"


def reference_backend(compute_dtype: torch.dtype = torch.float32) -> Backend:
    """The reference kernels as a backend; ``compute_dtype=torch.float64`` is the tests' oracle."""
    return Backend("reference", reference_kernels.ops_for(compute_dtype), flat_kernels=False,
                   runs_on_shards=False, direct=reference_kernels.kernels(compute_dtype))


def native_backend(name: str, device_type: str, ops: Any = None,
                   one_visit_limit: int | None = None) -> Backend:
    """The extension's kernels of ``name`` ("cpu", "cuda") on ``device_type`` tensors, through
    ``torch.ops.llaca_optim`` (the dispatcher picks the kernel for the device) or ``ops``, the
    namespace of another build of the same sources (the tests' emulated CUDA build). Both defer
    the blend of tensors too large to finish in one visit, which makes their step a single pass
    over memory."""
    return Backend(name, ops if ops is not None else library.define(library.NAMESPACE),
                   device_type=device_type, defers_blend=True,
                   one_visit_limit=ONE_VISIT_LIMITS[name] if one_visit_limit is None else one_visit_limit)


def triton_backend(device_type: str = "cuda", block: int | None = None,
                   num_warps: int | None = None) -> Backend:
    """The Triton kernels, launched with ``block`` elements per program and ``num_warps`` warps
    (None: the tuned values, ``ops.triton.BLOCK`` and ``NUM_WARPS``). Two launches per bucket with
    the blend deferred, three without; any tensor's blend may be deferred."""
    return Backend("triton", triton_ops.ops_for(block, num_warps), device_type=device_type,
                   defers_blend=True)


def backend_status() -> dict[str, tuple[bool, str]]:
    """For every backend: whether it can run in this process, and why not / how to get it."""
    status: dict[str, tuple[bool, str]] = {"reference": (True, "pure PyTorch, always available")}
    loaded, why = native.load()
    status["cpu"] = (loaded, why if loaded else f"the C++ extension is not available: {why}")
    status["cuda"] = _cuda_status(loaded, why)
    status["triton"] = triton_ops.status()
    return status


def _cuda_status(loaded: bool, why: str) -> tuple[bool, str]:
    if not loaded:
        return False, f"the C++ extension is not available: {why}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("llaca_optim::adamw_llaca_", "CUDA"):
        from .. import _build

        with_cuda, reason = _build.build_cuda()
        return False, (
            "the extension was built without its CUDA kernels"
            + ("" if with_cuda else f" ({reason})")
            + "; on a machine with a CUDA build of torch and the CUDA toolkit, reinstall with "
            "`pip install --no-build-isolation .` (LLACA_CUDA_ARCH picks the GPU architectures)"
        )
    if not torch.cuda.is_available():
        return False, "the CUDA kernels are built, but no CUDA device is visible"
    return True, "the extension's CUDA kernels (csrc/cuda/)"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run here, fastest first; for one device type if ``device`` is given.

    >>> llaca_optim.available_backends("cpu")
    ['cpu', 'reference']
    """
    status = backend_status()
    if device is None:
        return [name for name in BACKEND_NAMES if status[name][0]]
    device_type = torch.device(device).type
    order = _AUTO_ORDER.get(device_type, ("reference",))
    return [name for name in order if status[name][0]]


_warned_auto: set[str] = set()
_instances: dict[tuple[str, str], Backend] = {}


def resolve_backend(requested: str | Backend, device_type: str) -> Backend:
    """The backend object for a request ("auto", a name, or a Backend) and a device type.

    An explicit name that cannot run raises :class:`BackendUnavailable`; "auto" falls back to
    the reference implementation and warns once per device type, saying what is missing.
    """
    if isinstance(requested, Backend):
        return requested
    if requested == "auto":
        candidates = _AUTO_ORDER.get(device_type, ("reference",))
        status = backend_status()
        for name in candidates:
            if status[name][0]:
                if name == "reference" and device_type not in _warned_auto and len(candidates) > 1:
                    _warned_auto.add(device_type)
                    reasons = "; ".join(f"{n}: {status[n][1]}" for n in candidates[:-1])
                    warnings.warn(
                        f"llaca_optim: no fused kernels for {device_type} tensors ({reasons}). "
                        "Falling back to the reference implementation, which is correct but slow.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return _instance(name, device_type)
    if requested not in BACKEND_NAMES:
        raise ValueError(
            f"llaca_optim: unknown backend {requested!r}; choose one of "
            f"{('auto',) + BACKEND_NAMES} (see llaca_optim.available_backends())"
        )
    ok, why = backend_status()[requested]
    if not ok:
        raise BackendUnavailable(f"llaca_optim: backend {requested!r} is not available: {why}")
    wanted = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}.get(requested)
    if requested == "triton" and device_type in triton_ops.device_types():
        wanted = None  # CPU tensors too, under TRITON_INTERPRET=1 (the tests' way to run it)
    if wanted is not None and device_type != wanted:
        raise BackendUnavailable(
            f"llaca_optim: backend {requested!r} runs on {wanted} tensors, but these parameters "
            f"are on {device_type}; use backend='auto' or move the model to {wanted}"
        )
    return _instance(requested, device_type)


class BackendChoice:
    """What one request (``"auto"``, a name, or a :class:`Backend`) gives each device type,
    resolved on first use per device type (:func:`resolve_backend`) and kept."""

    def __init__(self, requested: str | Backend) -> None:
        self.requested = requested
        self.by_device: dict[str, Backend] = {}

    def __call__(self, device_type: str) -> Backend:
        backend = self.by_device.get(device_type)
        if backend is None:
            backend = self.by_device[device_type] = resolve_backend(self.requested, device_type)
        return backend


def _instance(name: str, device_type: str) -> Backend:
    key = (name, device_type)
    if key not in _instances:
        if name == "reference":
            _instances[key] = reference_backend()
        elif name == "triton":
            _instances[key] = triton_backend(device_type)
        else:
            _instances[key] = native_backend(name, device_type)
    return _instances[key]
