"""Comparison helpers that say where and how tensors differ, NaN and inf included."""

from __future__ import annotations

import torch
from torch import Tensor


def describe_difference(actual: Tensor, expected: Tensor) -> str:
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    if a.numel() == 0:
        return "empty"
    nan_mismatch = (a.isnan() != e.isnan()).sum().item()
    diff = (a - e).abs().nan_to_num(nan=0.0, posinf=float("inf"))
    worst = int(diff.argmax())
    return (
        f"max |diff| {diff.max().item():.3e} at flat index {worst} "
        f"(actual {a[worst].item():.9g}, expected {e[worst].item():.9g}); "
        f"NaN mismatches {nan_mismatch}; numel {a.numel()}"
    )


def max_abs_error(actual: Tensor, expected: Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    agree = (a == e) | (a.isnan() & e.isnan())  # equal infinities too: inf - inf would be NaN
    diff = (a - e).abs().nan_to_num(nan=float("inf")).masked_fill(agree, 0.0)
    return float(diff.max())


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=rtol, atol=atol, equal_nan=True,
        check_dtype=True,
        msg=lambda default: f"{what}: {describe_difference(actual, expected)}\n{default}",
    )


def assert_equal(actual: Tensor, expected: Tensor, *, what: str) -> None:
    assert_close(actual, expected, rtol=0.0, atol=0.0, what=what)
