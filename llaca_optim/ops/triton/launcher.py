"""The Triton launcher: builds the address and block tables of a bucket and launches the three
kernels of kernels.py (a fixed number of launches per bucket, whatever its size).

It runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is
first imported (Triton's interpreter: how the tests check these kernels on a machine without a
GPU). Nothing in a step reads a device value on the host: the step counters, alphas, fresh marks,
learning-rate tensor, gradient scale and found-inf flag are all read by the kernels.
"""

from __future__ import annotations

import math
import os
import struct

import torch
from torch import Tensor

from ..roles import ARRAY_ROWS, TABLE_ROWS

RBLOCK = 128   # block partials summed per iteration of the per-tensor pass


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Elements per program of the element-wise passes, and warps per program there. The interpreter
# runs programs one by one in Python, so it gets fewer, larger blocks (tensors in the tests still
# span several). A launcher can be given others (benchmarks/triton_tune.py times the choices on a
# GPU); the block size also fixes the order of the sums, so each choice is deterministic alone.
BLOCK = 4096 if interpreting() else 1024
NUM_WARPS = 4


def status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    if torch.cuda.is_available():
        return True, "Triton kernels (JIT-compiled on first use)"
    if interpreting():
        return True, "Triton kernels through TRITON_INTERPRET=1 (CPU tensors; slow, for testing)"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set (set it to run the kernels on CPU tensors for testing)"


def device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def _split(x: float) -> tuple[float, float]:
    """A double as fp32 hi + lo (Triton passes float scalars as fp32; the kernel adds them in fp64)."""
    hi = struct.unpack("f", struct.pack("f", x))[0] if math.isfinite(x) else x
    return hi, (x - hi) if math.isfinite(x) else 0.0


def _tl_dtype(dtype: torch.dtype):
    """The Triton type of a storage dtype (triton is imported on first use, not with the package)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class _Tables:
    """Block tables of one list of tensor sizes, kept between steps (they change only when the
    sizes do); the address table is rebuilt each step because gradients are new tensors."""

    def __init__(self, numels: list[int], device: torch.device, block: int) -> None:
        block_tensor, block_start, first, count = [], [], [], []
        for t, n in enumerate(numels):
            blocks = math.ceil(n / block)
            first.append(len(block_tensor))
            count.append(blocks)
            block_tensor += [t] * blocks
            block_start += [k * block for k in range(blocks)]
        as_tensor = lambda xs, dt: torch.tensor(xs, dtype=dt).to(device)  # noqa: E731
        self.n_blocks = len(block_tensor)
        self.numels = as_tensor(numels, torch.int64)
        self.block_tensor = as_tensor(block_tensor or [0], torch.int32)
        self.block_start = as_tensor(block_start or [0], torch.int64)
        self.first_block = as_tensor(first, torch.int64)
        self.block_count = as_tensor(count, torch.int64)
        self.partials = torch.zeros(3 * max(1, self.n_blocks), dtype=torch.float32, device=device)
        self.fresh = torch.zeros(max(1, len(numels)), dtype=torch.int8, device=device)


class TritonLauncher:
    def __init__(self, block: int | None = None, num_warps: int | None = None) -> None:
        self.block = BLOCK if block is None else block
        self.num_warps = NUM_WARPS if num_warps is None else num_warps
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError("llaca_optim: the Triton block must be a power of two of at least "
                             f"16 elements, got block={self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError("llaca_optim: num_warps must be a power of two up to 32, got "
                             f"num_warps={self.num_warps}")
        self._tables: dict[tuple[torch.device, tuple[int, ...]], _Tables] = {}

    def tables(self, params: list[Tensor]) -> _Tables:
        key = (params[0].device, tuple(p.numel() for p in params))
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) > 64:  # a changing model: do not keep every old layout
                self._tables.clear()
            tables = self._tables[key] = _Tables(list(key[1]), params[0].device, self.block)
        return tables

    @staticmethod
    def addresses(lists: dict[str, list[Tensor] | None], n: int, device: torch.device
                  ) -> tuple[Tensor, bool]:
        """The address table (a row per role of TABLE_ROWS, a column per tensor; zeros for a role
        absent from ``lists`` or None there), and whether every element array in it is 16-byte
        aligned, which the kernels' vector loads need (allocations are; views with an odd storage
        offset may not be)."""
        rows = []
        for role in TABLE_ROWS:
            column = lists.get(role.arg)
            rows += [t.data_ptr() for t in column] if column else [0] * n
        # struct.pack, and one tensor op for the alignment: cheaper than torch.tensor(list) and
        # a generator over the addresses.
        host = torch.frombuffer(bytearray(struct.pack(f"{len(rows)}q", *rows)), dtype=torch.int64)
        aligned = not bool(host[: ARRAY_ROWS * n].bitwise_and(15).any())
        if device.type == "cuda":  # pinned, so the copy does not synchronise with the host
            return host.pin_memory().to(device, non_blocking=True), aligned
        return host, aligned

    def launch(self, lists: dict[str, list[Tensor]], *, adamw: bool, lr: float = 0.0,
               beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0,
               eps: float = 1e-8, amsgrad: bool = False, maximize: bool = False,
               llaca: bool = True, scale: float, base_weight: float, mean_norms: bool = False,
               lr_tensor: Tensor | None = None, grad_scale: Tensor | None = None,
               found_inf: Tensor | None = None, shard_sums: Tensor | None = None) -> None:
        """One op call: ``lists`` holds the op's role lists by name, the rest its scalars."""
        from . import kernels

        params = lists["params"]
        if not params:
            return
        device = params[0].device
        n = len(params)
        tables = self.tables(params)
        pdt = _tl_dtype(params[0].dtype)
        llaca = llaca and bool(lists["emas"])
        edt = _tl_dtype(lists["emas"][0].dtype) if llaca else pdt
        defer = llaca and adamw and bool(lists.get("ema_pending"))
        wanted = {"params", "grads"}
        wanted |= {"exp_avgs", "exp_avg_sqs", "state_steps"} | ({"max_exp_avg_sqs"} if amsgrad else set()) if adamw else set()
        wanted |= {"emas", "prev_grads", "alphas", "alpha_fell_backs"} if llaca else set()
        wanted |= {"ema_pending"} if defer else set()
        table, aligned = self.addresses({k: v for k, v in lists.items() if k in wanted}, n, device)
        dummy = tables.partials  # any tensor on the device, for pointer arguments left unused
        beta1, beta2 = float(beta1), float(beta2)
        # enable_fp_fusion=False: no a*b+c -> FMA contraction, so the kernels round like torch's
        # element-wise ops (as the CPU build's -ffp-contract=off); the step is memory-bound.
        common = dict(found_inf_ptr=found_inf if found_inf is not None else dummy,
                      HAS_FOUND_INF=found_inf is not None, enable_fp_fusion=False)
        if tables.n_blocks:
            kernels._step_blocks[(tables.n_blocks,)](
                table, tables.numels, tables.block_tensor, tables.block_start, tables.partials, n,
                *_split(0.0 if lr_tensor is not None else float(lr)), beta1, beta2,
                1.0 - beta1, 1.0 - beta2,
                math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
                *_split(float(weight_decay)), float(eps),
                lr_tensor if lr_tensor is not None else dummy,
                grad_scale if grad_scale is not None else dummy,
                PDT=pdt, EDT=edt, ADAMW=adamw, AMSGRAD=adamw and amsgrad, MAXIMIZE=maximize,
                LLACA=llaca, HAS_LR_PTR=lr_tensor is not None,
                HAS_GRAD_SCALE=grad_scale is not None, ALIGNED=aligned, DEFER=defer,
                BLOCK=self.block, num_warps=self.num_warps, **common,
            )
        sharded = llaca and shard_sums is not None
        kernels._finish_tensors[(n,)](
            table, tables.first_block, tables.block_count, tables.partials, tables.fresh, n,
            tables.numels, *_split(float(scale)), float(base_weight),
            shard_sums=shard_sums if sharded else dummy,
            ADAMW=adamw, LLACA=llaca, DEFER=defer, SHARDED=sharded, MEAN_NORMS=bool(mean_norms),
            RBLOCK=RBLOCK, **common,
        )
        if llaca and not defer and not sharded and tables.n_blocks:
            kernels._blend_blocks[(tables.n_blocks,)](
                table, tables.numels, tables.block_tensor, tables.block_start, tables.fresh, n,
                PDT=pdt, EDT=edt, ALIGNED=aligned, BLOCK=self.block, num_warps=self.num_warps,
                **common,
            )

    def flush(self, params: list[Tensor], emas: list[Tensor], alphas: list[Tensor],
              ema_pending: list[Tensor]) -> None:
        """Applies and clears the blends pending on these tensors."""
        from . import kernels

        if not params:
            return
        n = len(params)
        tables = self.tables(params)
        table, aligned = self.addresses(
            {"params": params, "emas": emas, "alphas": alphas, "ema_pending": ema_pending}, n,
            params[0].device)
        if tables.n_blocks:
            kernels._flush_blocks[(tables.n_blocks,)](
                table, tables.numels, tables.block_tensor, tables.block_start, n,
                PDT=_tl_dtype(params[0].dtype), EDT=_tl_dtype(emas[0].dtype), ALIGNED=aligned,
                BLOCK=self.block, num_warps=self.num_warps, enable_fp_fusion=False,
            )
        kernels._clear_pending[(n,)](table, n)
