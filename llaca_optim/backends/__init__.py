"""Backends: the implementations behind the one functional API, and how one is chosen.

| name        | tensors          | what runs                                                   |
|-------------|------------------|-------------------------------------------------------------|
| `reference` | any device/dtype | llaca_optim/reference.py, tensor by tensor (the oracle)     |
| `cpu`       | CPU              | the C++ extension's multi-threaded kernels (csrc/cpu/)      |
| `cuda`      | CUDA             | the extension's CUDA kernels (csrc/cuda/), when built       |
| `triton`    | CUDA             | Triton kernels, when triton is installed                    |

Every backend takes a :class:`Bucket` (the tensors of one param group that share device, dtype
and EMA dtype) and updates it in place. A backend may decline single tensors it cannot handle
(float64, a layout with gaps): the optimizer hands those to the reference implementation, so no
tensor is ever copied into a contiguous temporary and updated there (STYLE 6).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import reference
from . import _native, _triton

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailable",
    "Bucket",
    "StepHyper",
    "available_backends",
    "backend_status",
    "resolve_backend",
]

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# The largest tensor each native backend's step finishes in one visit, blend included (csrc twins:
# kWholeTensorLimit in csrc/cpu/llaca_cpu.cpp, kChunk in csrc/cuda/layout.h); only larger ones
# can have their blend deferred. tests/test_deferred_blend.py checks both.
ONE_VISIT_LIMITS = {"cpu": 2**18, "cuda": 4096}

# Fastest first, per device type: what "auto" tries.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


@dataclass
class Bucket:
    """Per-tensor lists of one kernel call. AdamW lists are empty for the standalone update;
    LLaCA lists are empty when the LLaCA update is off for the group."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    state_steps: list[Tensor] = field(default_factory=list)
    emas: list[Tensor] = field(default_factory=list)
    prev_grads: list[Tensor] = field(default_factory=list)
    alphas: list[Tensor] = field(default_factory=list)
    fell_back: list[Tensor] = field(default_factory=list)
    # Deferred-blend flags (backends with ``defers_blend`` only): empty, or one per tensor.
    ema_pending: list[Tensor] = field(default_factory=list)
    # The params' ``_version`` after the last deferring step (the optimizer's in-place check).
    param_versions: list[int] | None = None
    # Sharded parameters (NOTE [sharded parameters] in llaca_optim/_sharded.py): the DTensors
    # whose local shards the lists hold, and, with LLaCA on, the cross-shard reduction of the
    # sums (a ShardReduce). None for plain tensors.
    sources: list[Tensor] | None = None
    shard: Any = None


@dataclass
class StepHyper:
    """The hyperparameters of one group at one step, resolved (preset applied) and validated."""

    lr: float | Tensor = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    amsgrad: bool = False
    maximize: bool = False
    llaca: bool = True
    scale: float = 2.0
    base_weight: float = 0.01
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether one flat index walks both tensors' elements in the same order (csrc twin)."""
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


class Backend:
    """The interface; :class:`ReferenceBackend` is the ground truth every other one matches."""

    name = "abstract"
    # Whether adamw_llaca may leave a tensor's EMA blend pending until its next step or a flush
    # (NOTE [CUDA deferred blend] in csrc/cuda/layout.h): a bucket with ``ema_pending`` flags.
    defers_blend = False
    # Whether its kernels can run on the local shards of DTensors with a cross-shard reduction of
    # their sums (NOTE [sharded parameters] in llaca_optim/_sharded.py); if not, the optimizer
    # hands DTensors to the reference backend whole.
    runs_on_shards = False

    def accepts(self, param: Tensor, companions: list[Tensor]) -> bool:
        """Whether this backend's kernels can update ``param`` with these state tensors in place."""
        raise NotImplementedError

    def may_defer(self, params: list[Tensor]) -> bool:
        """Whether a deferring step over ``params`` could leave any blend pending."""
        return self.defers_blend

    def adamw_llaca(self, bucket: Bucket, h: StepHyper) -> None:
        raise NotImplementedError

    def llaca_update(self, bucket: Bucket, h: StepHyper) -> None:
        raise NotImplementedError

    def flush_ema(self, bucket: Bucket) -> None:
        """Applies and clears the blends pending in ``bucket`` (params, emas, alphas and
        ema_pending): blends a deferring step left, or those of a sharded step (NOTE [sharded
        parameters])."""
        raise NotImplementedError(f"the {self.name} backend never defers the EMA blend")

    def __repr__(self) -> str:
        return f"<llaca_optim backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Tensor by tensor through llaca_optim.reference; ``compute_dtype=torch.float64`` makes it the
    high-precision oracle of the tests. Reads ``found_inf`` and the fresh marks on the host."""

    name = "reference"

    def __init__(self, compute_dtype: torch.dtype = torch.float32) -> None:
        self.compute_dtype = compute_dtype

    def accepts(self, param: Tensor, companions: list[Tensor]) -> bool:
        return True

    def _overflowed(self, h: StepHyper) -> bool:
        return h.found_inf is not None and bool(h.found_inf.item() != 0)

    def _compute_dtype(self, param: Tensor) -> torch.dtype:
        # float64 parameters compute in float64, as torch.optim.AdamW does.
        return torch.float64 if param.dtype == torch.float64 else self.compute_dtype

    def _llaca(self, i: int, bucket: Bucket, grad: Tensor, h: StepHyper) -> None:
        alpha, fell_back = reference.llaca_update_(
            bucket.params[i], grad, bucket.emas[i], bucket.prev_grads[i],
            fresh=bool(bucket.alphas[i].item() < 0), scale=h.scale, base_weight=h.base_weight,
            compute_dtype=self._compute_dtype(bucket.params[i]),
        )
        bucket.alphas[i].fill_(alpha)
        bucket.fell_back[i].fill_(fell_back)

    @staticmethod
    def _on_meta(bucket: Bucket, h: StepHyper, adamw: bool) -> bool:
        """Steps a bucket of meta tensors, which carry shapes and no values (deferred
        initialisation and shape tracing make them; torch's optimizers step them). There is
        nothing to compute or read back: the step counts, and writes each state tensor from a
        tensor of its shape, as a step on a real device would."""
        if not bucket.params or not bucket.params[0].is_meta:
            return False
        for i, param in enumerate(bucket.params):
            if adamw:
                bucket.state_steps[i].add_(1)
                bucket.exp_avgs[i].copy_(bucket.grads[i])
                bucket.exp_avg_sqs[i].copy_(bucket.grads[i])
                param.copy_(bucket.grads[i])
            if h.llaca:
                bucket.emas[i].copy_(param)
                bucket.prev_grads[i].copy_(bucket.grads[i])
                bucket.alphas[i].fill_(h.base_weight)
                bucket.fell_back[i].fill_(True)
        return True

    @torch.no_grad()
    def adamw_llaca(self, bucket: Bucket, h: StepHyper) -> None:
        if self._on_meta(bucket, h, adamw=True) or self._overflowed(h):
            return
        lr = float(h.lr)
        for i, param in enumerate(bucket.params):
            grad = reference.adamw_step_(
                param, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
                bucket.max_exp_avg_sqs[i] if h.amsgrad else None, bucket.state_steps[i],
                lr=lr, beta1=h.beta1, beta2=h.beta2, weight_decay=h.weight_decay, eps=h.eps,
                amsgrad=h.amsgrad, maximize=h.maximize, grad_scale=h.grad_scale,
                compute_dtype=self._compute_dtype(param),
            )
            if h.llaca:
                self._llaca(i, bucket, grad, h)

    @torch.no_grad()
    def llaca_update(self, bucket: Bucket, h: StepHyper) -> None:
        if self._on_meta(bucket, h, adamw=False) or self._overflowed(h):
            return
        for i in range(len(bucket.params)):
            grad = bucket.grads[i].to(self._compute_dtype(bucket.params[i]))
            if h.grad_scale is not None:
                grad = grad / h.grad_scale.to(device=grad.device, dtype=grad.dtype)
            self._llaca(i, bucket, grad, h)


class NativeBackend(Backend):
    """The C++/CUDA extension's kernels, reached through the torch.library ops (the dispatcher
    picks the kernel registered for the tensors' device). ``ops`` is the op namespace: the tests
    pass the one of an emulated build (tests/_cuda_sim.py). Both defer the blend of tensors too
    large to finish in one visit (CUDA: one chunk; CPU: 2^18 elements), which makes their step a
    single pass over memory."""

    _DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    runs_on_shards = True

    def __init__(self, name: str, device_type: str, ops=None, defers_blend: bool = False,
                 one_visit_limit: int | None = None) -> None:
        self.name = name
        self.device_type = device_type
        self._ops = ops if ops is not None else torch.ops.llaca_optim
        self.defers_blend = defers_blend
        # The largest tensor the kernels finish in one visit (never deferred); None: unknown.
        self.one_visit_limit = one_visit_limit

    def may_defer(self, params: list[Tensor]) -> bool:
        limit = self.one_visit_limit
        return self.defers_blend and (limit is None or any(p.numel() > limit for p in params))

    def accepts(self, param: Tensor, companions: list[Tensor]) -> bool:
        # Companions in the parameter's dtype, or float32 (the EMA of a 16-bit parameter): an EMA
        # of another dtype (ema_dtype=torch.float64, say) goes to the reference.
        return (
            param.device.type == self.device_type
            and param.dtype in self._DTYPES
            and param.layout == torch.strided
            and is_dense(param)
            and all(same_layout(param, t) for t in companions)
            and all(t.dtype == param.dtype or t.dtype == torch.float32 for t in companions)
        )

    def adamw_llaca(self, bucket: Bucket, h: StepHyper) -> None:
        lr_tensor = h.lr if isinstance(h.lr, Tensor) else None
        self._ops.adamw_llaca_(
            bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
            bucket.max_exp_avg_sqs, bucket.state_steps, bucket.emas, bucket.prev_grads,
            bucket.alphas, bucket.fell_back, bucket.ema_pending,
            lr=0.0 if lr_tensor is not None else float(h.lr), beta1=h.beta1, beta2=h.beta2,
            weight_decay=h.weight_decay, eps=h.eps, amsgrad=h.amsgrad, maximize=h.maximize,
            llaca=h.llaca, scale=h.scale, base_weight=h.base_weight, lr_tensor=lr_tensor,
            grad_scale=h.grad_scale, found_inf=h.found_inf, shard_sums=_shard_sums(bucket),
        )

    def llaca_update(self, bucket: Bucket, h: StepHyper) -> None:
        self._ops.llaca_update_(
            bucket.params, bucket.grads, bucket.emas, bucket.prev_grads, bucket.alphas,
            bucket.fell_back, scale=h.scale, base_weight=h.base_weight,
            grad_scale=h.grad_scale, found_inf=h.found_inf, shard_sums=_shard_sums(bucket),
        )

    def flush_ema(self, bucket: Bucket) -> None:
        self._ops.llaca_flush_(bucket.params, bucket.emas, bucket.alphas, bucket.ema_pending)


def _shard_sums(bucket: Bucket) -> Tensor | None:
    """The sums tensor of a sharded bucket's kernels (NOTE [sharded parameters])."""
    return bucket.shard.sums if bucket.shard is not None else None


class TritonBackend(NativeBackend):
    """The Triton kernels (backends/_triton_kernels.py): two launches per bucket with the blend
    deferred, three without. Same eligibility as the extension's kernels (dense, one layout for
    a tensor and its state). ``block`` (elements per program) and ``num_warps`` default to
    the tuned choice (_triton.BLOCK, _triton.NUM_WARPS); an instance with others can be passed
    as ``backend=`` (benchmarks/triton_tune.py does, to time them)."""

    def __init__(self, device_type: str, block: int | None = None,
                 num_warps: int | None = None) -> None:
        super().__init__("triton", device_type, defers_blend=True)
        self._launcher = _triton.TritonLauncher(device_type, block, num_warps)

    def adamw_llaca(self, bucket: Bucket, h: StepHyper) -> None:
        self._launcher.launch(bucket, h, adamw=True)

    def llaca_update(self, bucket: Bucket, h: StepHyper) -> None:
        self._launcher.launch(bucket, h, adamw=False)

    def flush_ema(self, bucket: Bucket) -> None:
        self._launcher.flush(bucket)


def backend_status() -> dict[str, tuple[bool, str]]:
    """For every backend: whether it can run in this process, and why not / how to get it."""
    status: dict[str, tuple[bool, str]] = {"reference": (True, "pure PyTorch, always available")}
    loaded, why = _native.load()
    status["cpu"] = (loaded, why if loaded else f"the C++ extension is not available: {why}")
    status["cuda"] = _cuda_status(loaded, why)
    status["triton"] = _triton.status()
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
    if requested == "triton" and device_type in _triton.device_types():
        wanted = None  # CPU tensors too, under TRITON_INTERPRET=1 (the tests' way to run it)
    if wanted is not None and device_type != wanted:
        raise BackendUnavailable(
            f"llaca_optim: backend {requested!r} runs on {wanted} tensors, but these parameters "
            f"are on {device_type}; use backend='auto' or move the model to {wanted}"
        )
    return _instance(requested, device_type)


def _instance(name: str, device_type: str) -> Backend:
    key = (name, device_type)
    if key not in _instances:
        if name == "reference":
            _instances[key] = ReferenceBackend()
        elif name == "triton":
            _instances[key] = TritonBackend(device_type)
        else:
            _instances[key] = NativeBackend(name, device_type, defers_blend=True,
                                            one_visit_limit=ONE_VISIT_LIMITS[name])
    return _instances[key]
