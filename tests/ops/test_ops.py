"""The torch.library ops: schemas, fake implementations and registrations (torch.library.opcheck),
and the backend registry's reports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llaca_optim
from support.backends import backends
from support.scenarios import HIDE_EXTENSION


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


@pytest.mark.parametrize("namespace", ["llaca_optim", "llaca_optim_reference"])
def test_sharded_mode_writes_the_local_sums_and_nothing_else(cpu_backend, namespace):
    """shard_sums (NOTE [sharded parameters]): the AdamW step runs, each row gets the tensor's
    L1 sums against the stepped parameter, and alpha, the fallback flag and the EMA are left for
    the caller (who reduces the sums across shards first). The reference kernels too: they
    step the pieces of DeepSpeed's ZeRO partitions that the native kernels do not take."""
    ops = getattr(torch.ops, namespace)
    args, kwargs = adamw_args(amsgrad=False)
    params, grads, emas, prev = args[0], args[1], args[6], args[7]
    ema_before = [e.clone() for e in emas]
    prev_before = [g.clone() for g in prev]
    alphas_before = [a.clone() for a in args[8]]
    sums = torch.full((len(params), 3), float("nan"), dtype=torch.float64)
    ops.adamw_llaca_(*args, **kwargs, shard_sums=sums)
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


def test_the_op_runs_on_cpu_tensors_without_the_extension():
    """The reference is the ops' default kernel: with llaca_optim._C hidden (and no build on
    first use), torch.ops.llaca_optim.adamw_llaca_ still runs on CPU tensors, and its result is
    the reference math applied tensor by tensor."""
    code = HIDE_EXTENSION + (
        "import torch, llaca_optim\n"
        "from llaca_optim import functional, reference\n"
        "assert not llaca_optim.backend_status()['cpu'][0]\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('llaca_optim::adamw_llaca_', 'CPU')\n"
        "params = [torch.randn(5, 3), torch.randn(7)]\n"
        "twins = [p.clone() for p in params]\n"
        "states = [functional.new_state(p) for p in params]\n"
        "twin_states = [functional.new_state(p) for p in twins]\n"
        "for step in range(3):\n"
        "    grads = [torch.randn_like(p) for p in params]\n"
        "    torch.ops.llaca_optim.adamw_llaca_(params, grads, *functional.state_lists(states), [],\n"
        "        lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False,\n"
        "        maximize=False, llaca=True, scale=2.0, base_weight=0.01)\n"
        "    for p, g, s in zip(twins, grads, twin_states):\n"
        "        g32 = reference.adamw_step_(p, g, s['exp_avg'], s['exp_avg_sq'], None, s['step'],\n"
        "            lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False,\n"
        "            maximize=False)\n"
        "        alpha, fell = reference.llaca_update_(p, g32, s['ema'], s['prev_grad'],\n"
        "            fresh=bool(s['alpha'] < 0), scale=2.0, base_weight=0.01)\n"
        "        s['alpha'].fill_(alpha); s['alpha_fell_back'].fill_(fell)\n"
        "for p, q, s, t in zip(params, twins, states, twin_states):\n"
        "    assert torch.equal(p, q)\n"
        "    for key in s:\n"
        "        assert torch.equal(s[key], t[key]), key\n"
        "print('same', float(states[0]['alpha']))\n"
    )
    env = {**os.environ, "LLACA_NO_JIT": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "same" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("backend", backends("reference", "cpu", "cuda-emulated"), indirect=True)
def test_functional_matches_the_optimizer(backend):
    """llaca_optim.functional.adamw_llaca is the optimizer's step without the optimizer: the same
    op call on the same lists, so the same bits (with every blend applied within the call)."""
    from llaca_optim import LLaCAAdamW, functional

    shapes = [(33, 5), (300,), (1,)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    twins = [p.detach().clone() for p in params]
    optimizer = LLaCAAdamW(params, lr=3e-3, weight_decay=0.05, amsgrad=True, defer_blend=False,
                           backend=backend)
    states = [functional.new_state(p, amsgrad=True) for p in twins]
    fn_backend = "cuda" if not isinstance(backend, str) else backend
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        ops = backend.ops if not isinstance(backend, str) else None
        lists = functional.state_lists(states)
        if ops is not None:  # the emulated build's namespace, as the optimizer calls it
            ops.adamw_llaca_(twins, grads, *lists, [], lr=3e-3, beta1=0.9, beta2=0.999,
                             weight_decay=0.05, eps=1e-8, amsgrad=True, maximize=False,
                             llaca=True, scale=2.0, base_weight=0.01)
        else:
            functional.adamw_llaca(twins, grads, *lists, lr=3e-3, weight_decay=0.05, amsgrad=True,
                                   backend=fn_backend)
    for p, q, s in zip(params, twins, states):
        assert torch.equal(p.detach(), q)
        for key, value in s.items():
            assert torch.equal(optimizer.state[p][key], value), key


def test_functional_refuses_lists_of_other_lengths():
    from llaca_optim import functional

    p = torch.randn(4)
    lists = functional.state_lists([functional.new_state(p)])
    with pytest.raises(ValueError, match="emas has 0 tensors but params has 1"):
        lists[4] = []  # the EMAs
        functional.adamw_llaca([p], [torch.randn(4)], *lists)


def test_reference_flush_applies_the_blends_a_sharded_step_leaves(cpu_backend):
    """After a sharded step the caller sets each alpha and flags the blends; the reference's
    llaca_flush_ applies exactly the flagged ones, as the native kernels' does, and clears
    the flags."""
    params = [torch.randn(5), torch.randn(2, 3), torch.randn(4)]
    emas = [p + 0.1 * torch.randn_like(p) for p in params]
    alphas = [torch.tensor(0.25), torch.tensor(0.5), torch.tensor(0.75)]
    outs = {}
    for namespace in ("llaca_optim", "llaca_optim_reference"):
        e = [t.clone() for t in emas]
        flags = [torch.tensor(True), torch.tensor(False), torch.tensor(True)]
        getattr(torch.ops, namespace).llaca_flush_(params, e, alphas, flags)
        assert not any(bool(f) for f in flags)
        outs[namespace] = e
    assert torch.equal(outs["llaca_optim_reference"][1], emas[1])
    for ours, theirs in zip(outs["llaca_optim_reference"], outs["llaca_optim"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_the_alphas_op_is_the_per_tensor_rule_on_every_backend(backend):
    """``llaca_alphas_`` (the finish of a sharded step) gives, for each row of sums, what the
    reference's per-tensor ``balance_weight`` gives (float64, then rounded to float32), on every
    backend's namespace: fresh tensors fall back and blend nothing, a found_inf changes nothing,
    and zero or non-finite sums fall back."""
    import math

    from llaca_optim import reference
    from llaca_optim.ops.registry import Backend, resolve_backend

    ops = (backend if isinstance(backend, Backend) else resolve_backend(backend, "cpu")).ops
    n = 64
    sums = torch.rand(n, 3, dtype=torch.float64) * torch.logspace(-3, 3, n, dtype=torch.float64).unsqueeze(1)
    sums[0] = 0.0
    sums[1, 0] = math.inf
    sums[2, 2] = math.nan
    elements = torch.randint(1, 10**6, (n,)).double()
    old_alpha = torch.rand(n)
    old_alpha[3:8] = -1.0  # fresh
    for mean in (False, True):
        scale, base = float(torch.rand(()) * 10 + 0.1), 0.01
        expected = []
        for row, count, before in zip(sums.tolist(), elements.tolist(), old_alpha.tolist()):
            if before < 0:
                expected.append((base, True, False))
                continue
            divide = count if mean else 1.0
            alpha, fell = reference.balance_weight(row[0] / divide, row[1] / divide, row[2] / divide, scale, base)
            expected.append((alpha, fell, True))
        alpha, fell_back, pending = old_alpha.clone(), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        none = torch.zeros(0, dtype=torch.float64)  # no horizon: no signal statistic
        ops.llaca_alphas_(sums, elements, alpha, fell_back, none, none, pending, scale=scale,
                          base_weight=base, mean_norms=mean)
        assert alpha.tolist() == [torch.tensor(a, dtype=torch.float32).item() for a, _, _ in expected]
        assert fell_back.tolist() == [f for _, f, _ in expected]
        assert pending.tolist() == [p for _, _, p in expected]
        before = (alpha.clone(), fell_back.clone(), pending.clone())
        ops.llaca_alphas_(sums * 2, elements, alpha, fell_back, none, none, pending, scale=scale,
                          base_weight=base, mean_norms=mean, found_inf=torch.ones(()))
        assert all(torch.equal(x, y) for x, y in zip(before, (alpha, fell_back, pending)))


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_the_alphas_op_is_the_horizon_rule_on_every_backend(backend):
    """With ``horizon=H`` the op's alpha is the signal r = (1 + b) / (a c) over its running
    geometric mean (the mean of log r over the steps so far, then an EMA of weight 1/20), over H,
    capped at 0.5; a fresh tensor or a non-finite signal takes 1/H and leaves the statistic as it
    was; a found_inf step changes nothing. Checked over many steps against the rule written out
    per tensor in Python floats."""
    import math

    from llaca_optim.ops.registry import Backend, resolve_backend

    ops = (backend if isinstance(backend, Backend) else resolve_backend(backend, "cpu")).ops
    n, horizon, window = 16, 37.0, 20
    elements = torch.randint(1, 10**6, (n,)).double()
    alpha = torch.full((n,), -1.0)  # every tensor fresh at the first step
    fell_back, pending = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    log_mean, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    want_mean, want_count = [0.0] * n, [0] * n
    late = []
    for step in range(45):
        # Levels that differ by orders of magnitude between tensors, as sizes make them.
        sums = torch.rand(n, 3, dtype=torch.float64) * torch.logspace(-2, 4, n, dtype=torch.float64).unsqueeze(1)
        if step % 7 == 3:
            sums[step % n, 0] = 0.0  # a c = 0: not finite
        if step == 30:  # an AMP overflow: nothing moves
            before = [t.clone() for t in (alpha, fell_back, pending, log_mean, count)]
            ops.llaca_alphas_(sums, elements, alpha, fell_back, log_mean, count, pending, scale=2.0,
                              base_weight=1 / horizon, mean_norms=False, horizon=horizon,
                              found_inf=torch.ones(()))
            assert all(torch.equal(x, y) for x, y in zip(before, (alpha, fell_back, pending, log_mean, count)))
            continue
        expected = []
        for i, (a, b, c) in enumerate(sums.tolist()):
            fresh = alpha[i].item() < 0
            r = (1.0 + b) / (a * c) if a * c > 0 else math.inf
            if fresh or not math.isfinite(r):
                expected.append((1 / horizon, True, not fresh))
                continue
            want_count[i] += 1
            want_mean[i] += (math.log(r) - want_mean[i]) / min(want_count[i], window)
            expected.append((min(math.exp(math.log(r) - want_mean[i]) / horizon, 0.5), False, True))
        ops.llaca_alphas_(sums, elements, alpha, fell_back, log_mean, count, pending, scale=2.0,
                          base_weight=1 / horizon, mean_norms=False, horizon=horizon)
        torch.testing.assert_close(alpha, torch.tensor([e[0] for e in expected], dtype=torch.float32),
                                   rtol=1e-6, atol=0)
        assert fell_back.tolist() == [e[1] for e in expected]
        assert pending.tolist() == [e[2] for e in expected]
        assert count.tolist() == want_count
        torch.testing.assert_close(log_mean, torch.tensor(want_mean, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        if step >= 20:
            late.append(alpha[~fell_back])
    # The level is 1/H whatever the tensor's signal level (they differ by 10^6 here): the median
    # alpha over the tensors and the steps after the running mean's first window.
    assert 1 / 3 < torch.cat(late).median().item() * horizon < 3
