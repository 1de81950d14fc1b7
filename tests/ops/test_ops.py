"""The torch.library ops: schemas, fake implementations and registrations (torch.library.opcheck),
and the backend registry's reports."""

from __future__ import annotations

import pytest
import torch

import llaca_optim


def adamw_args(n=3, dtype=torch.float32, amsgrad=True, fresh=False):
    shapes = [(5,), (4, 3), (0,)][:n]
    params = [torch.randn(s).to(dtype) for s in shapes]
    like = lambda: [torch.rand(s).to(dtype) for s in shapes]  # noqa: E731
    alphas = [torch.tensor(-1.0 if fresh else 0.5) for _ in shapes]
    args = (
        params, like(), like(), like(), like() if amsgrad else [],
        [torch.tensor(3.0) for _ in shapes], [p.float().clone() for p in params], like(),
        alphas, [torch.tensor(False) for _ in shapes], [],  # ema_pending: blend within the call
    )
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=amsgrad,
                  maximize=False, llaca=True, scale=2.0, base_weight=0.01)
    return args, kwargs


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_adamw_llaca(cpu_backend, dtype, fresh):
    args, kwargs = adamw_args(dtype=dtype, fresh=fresh)
    torch.library.opcheck(torch.ops.llaca_optim.adamw_llaca_.default, args, kwargs)


def test_opcheck_llaca_update(cpu_backend):
    shapes = [(6,), (2, 2)]
    params = [torch.randn(s) for s in shapes]
    args = (params, [torch.randn(s) for s in shapes], [p.clone() for p in params],
            [torch.randn(s) for s in shapes], [torch.tensor(0.3) for _ in shapes],
            [torch.tensor(False) for _ in shapes])
    torch.library.opcheck(torch.ops.llaca_optim.llaca_update_.default, args,
                          dict(scale=2.0, base_weight=0.01))


def test_ops_refuse_mismatched_lists(cpu_backend):
    args, kwargs = adamw_args()
    args = (args[0], args[1][:2], *args[2:])
    with pytest.raises(RuntimeError, match="grads has 2 tensors but params has 3"):
        torch.ops.llaca_optim.adamw_llaca_(*args, **kwargs)


def test_opcheck_deferring_step(cpu_backend):
    args, kwargs = adamw_args()
    args = (*args[:10], [torch.tensor(i % 2 == 0) for i in range(len(args[0]))])
    torch.library.opcheck(torch.ops.llaca_optim.adamw_llaca_.default, args, kwargs)


@pytest.mark.parametrize("fresh", [False, True])
def test_opcheck_sharded_mode(cpu_backend, fresh):
    args, kwargs = adamw_args(fresh=fresh)
    kwargs["shard_sums"] = torch.zeros(len(args[0]), 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.llaca_optim.adamw_llaca_.default, args, kwargs)


def test_sharded_mode_writes_the_local_sums_and_nothing_else(cpu_backend):
    """shard_sums (NOTE [sharded parameters]): the AdamW step runs, each row gets the tensor's
    L1 sums against the stepped parameter, and alpha, the fallback flag and the EMA are left for
    the caller (who reduces the sums across shards first)."""
    args, kwargs = adamw_args(amsgrad=False)
    params, grads, emas, prev = args[0], args[1], args[6], args[7]
    ema_before = [e.clone() for e in emas]
    prev_before = [g.clone() for g in prev]
    alphas_before = [a.clone() for a in args[8]]
    sums = torch.full((len(params), 3), float("nan"), dtype=torch.float64)
    torch.ops.llaca_optim.adamw_llaca_(*args, **kwargs, shard_sums=sums)
    for i, p in enumerate(params):
        expected = torch.stack([
            (p.double() - ema_before[i].double()).abs().sum(),
            grads[i].double().abs().sum(),
            (grads[i].double() - prev_before[i].double()).abs().sum(),
        ])
        torch.testing.assert_close(sums[i], expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(emas[i], ema_before[i]) and torch.equal(args[8][i], alphas_before[i])
        assert torch.equal(prev[i], grads[i])


def test_sharded_mode_refuses_bad_sums_before_changing_anything(cpu_backend):
    args, kwargs = adamw_args()
    before = [[t.clone() for t in group] for group in args]
    n = len(args[0])
    for sums, message in [
        (torch.zeros(n, 3), r"shard_sums must be a contiguous float64 tensor of shape \[3, 3\]"),
        (torch.zeros(n + 1, 3, dtype=torch.float64), r"of shape \[3, 3\].*got Double of shape \[4, 3\]"),
        (torch.zeros(3, n, dtype=torch.float64).t(), "contiguous"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.llaca_optim.adamw_llaca_(*args, **kwargs, shard_sums=sums)
    with pytest.raises(RuntimeError, match="shard_sums was given to a call with llaca=False"):
        torch.ops.llaca_optim.adamw_llaca_(*args, **{**kwargs, "llaca": False},
                                          shard_sums=torch.zeros(n, 3, dtype=torch.float64))
    for group, saved in zip(args, before):
        for t, s in zip(group, saved):
            assert torch.equal(t, s)


def test_found_inf_skips_the_whole_op(cpu_backend):
    args, kwargs = adamw_args()
    before = [[t.clone() for t in group] for group in args]
    torch.ops.llaca_optim.adamw_llaca_(*args, **kwargs, found_inf=torch.tensor(1.0))
    for group, saved in zip(args, before):
        for t, s in zip(group, saved):
            assert torch.equal(t, s)


def test_backend_registry_reports():
    status = llaca_optim.backend_status()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert all(isinstance(ok, bool) and why for ok, why in status.values())
    assert "reference" in llaca_optim.available_backends("cpu")
    assert llaca_optim.available_backends("cpu")[-1] == "reference"  # fastest first
    optimizer = llaca_optim.LLaCAAdamW([torch.nn.Parameter(torch.randn(2))])
    assert optimizer.backend == llaca_optim.available_backends("cpu")[0]
    assert optimizer.backend in repr(optimizer)
