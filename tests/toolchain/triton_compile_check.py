"""Compiles every variant of the Triton kernels for a Hopper GPU (sm_90) without one, with
Triton's own compiler down to a cubin (ptxas ships with triton); launches nothing. Run by
tests/toolchain/test_triton_compile.py in a process without TRITON_INTERPRET (under the interpreter the
kernels are not compilable objects). Prints one line per kernel variant, then OK."""

from __future__ import annotations

import inspect
import itertools
import os
import re

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llaca_optim.ops.triton import kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)

# The type of every runtime argument, by name (pointers as "*<element type>").
POINTERS = {
    "table": "*i64", "numels": "*i64", "block_tensor": "*i32", "block_start": "*i64",
    "partials": "*fp32", "fresh_marks": "*i8", "tensor_first_block": "*i64",
    "tensor_blocks": "*i64", "lr_ptr": "*fp64", "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32", "shard_sums": "*fp64",
}
INTS = {"n_tensors": "i32"}


def signature(kernel, constexprs):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = POINTERS.get(name) or INTS.get(name) or "fp32"
    return sig


def compile_for_hopper(kernel, constexprs):
    src = ASTSource(kernel, signature(kernel, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"enable_fp_fusion": False})
    assert compiled.asm.get("cubin"), "no cubin produced"
    if constexprs.get("ALIGNED"):  # full blocks of aligned arrays must use 16-byte accesses
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (
            f"{kernel.fn.__name__}: no 16-byte vector loads/stores in the PTX")
    if kernel is kernels._step_blocks:
        # NOTE [CUDA loads before stores] in csrc/cuda/kernel_args.h: every load (address table
        # included) before the first store, in each of the two paths (a full block, a tensor's
        # masked last block), so one run of loads per path. Interleaved, each run after a store
        # waits one memory round trip more.
        accesses = "".join("L" if op == "ld" else "S"
                           for op in re.findall(r"\b(ld|st)\.global", compiled.asm["ptx"]))
        runs = len(re.findall("L+", accesses))
        assert runs <= 2, f"_step_blocks: {runs} runs of loads between stores: {accesses}"
    print(f"compiled {kernel.fn.__name__} {sorted((k, str(v)) for k, v in constexprs.items())}")
    return compiled


DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def main() -> None:
    for (pdt, edt), adamw in itertools.product(
            [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")], [True, False]):
        for amsgrad, flags in itertools.product([False, True] if adamw else [False], [False, True]):
            compile_for_hopper(kernels._step_blocks, {
                "PDT": DTYPES[pdt], "EDT": DTYPES[edt], "ADAMW": adamw, "AMSGRAD": amsgrad,
                "MAXIMIZE": flags, "LLACA": True, "HAS_LR_PTR": flags, "HAS_GRAD_SCALE": flags,
                "HAS_FOUND_INF": flags, "ALIGNED": not flags,
                # The deferred blend with and without amsgrad and the other flags.
                "DEFER": adamw and flags == amsgrad, "BLOCK": 1024,
            })
    for pdt, edt in [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")]:
        for aligned in (True, False):
            compile_for_hopper(kernels._blend_blocks, {"PDT": DTYPES[pdt], "EDT": DTYPES[edt],
                                                 "HAS_FOUND_INF": True, "ALIGNED": aligned,
                                                 "BLOCK": 1024})
            compile_for_hopper(kernels._flush_blocks, {"PDT": DTYPES[pdt], "EDT": DTYPES[edt],
                                                 "ALIGNED": aligned, "BLOCK": 1024})
    for adamw, llaca, defer, sharded in [(True, True, False, False), (True, True, True, False),
                                         (True, False, False, False), (False, True, False, False),
                                         (True, True, True, True), (False, True, False, True)]:
        compile_for_hopper(kernels._finish_tensors, {"ADAMW": adamw, "LLACA": llaca, "DEFER": defer,
                                               "SHARDED": sharded, "HAS_FOUND_INF": True,
                                               "RBLOCK": 128})
    compile_for_hopper(kernels._clear_pending, {})
    print("OK")


if __name__ == "__main__":
    main()
