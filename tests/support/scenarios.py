"""Scenarios more than one test module runs: the GradScaler overflow check, and the package
without its extension."""

from __future__ import annotations

import torch

from support.state import assert_same, everything

# The first lines of a subprocess's code that hides the installed extension (llaca_optim._C)
# from it: the package as installed without its native kernels.
HIDE_EXTENSION = (
    "import importlib.abc, sys\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'llaca_optim._C':\n"
    "            raise ImportError('llaca_optim._C hidden by the test')\n"
    "sys.meta_path.insert(0, Hide())\n"
)


def check_grad_scaler_overflow(model, optimizer, dtype, device="cpu"):
    """Three good GradScaler steps, one whose gradients overflow (it must change nothing, and the
    scale must drop), one more good one: the step count ends at 4. tests/backends/test_cuda_gpu.py runs
    it on a GPU too."""
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    in_features = next(model.parameters()).shape[1]

    def scaled_step(poison: bool):
        optimizer.zero_grad()
        x = torch.randn(4, in_features, dtype=dtype, device=device)
        scaler.scale(model(x).float().pow(2).mean()).backward()
        if poison:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        scaled_step(poison=False)
    before = everything(model, optimizer)
    scale_before = scaler.get_scale()
    scaled_step(poison=True)
    assert_same(everything(model, optimizer), before)
    assert scaler.get_scale() < scale_before
    scaled_step(poison=False)
    assert int(optimizer.state[next(model.parameters())]["step"]) == 4
