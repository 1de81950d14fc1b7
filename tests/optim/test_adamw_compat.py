"""llaca=False is torch.optim.AdamW; the optimizer API behaves as torch users expect."""

from __future__ import annotations

import io
import platform

import pytest
import torch
from torch import nn

from support.compare import assert_close
from llaca_optim import LLaCAAdamW
from support.backends import backends


def small_model() -> nn.Module:
    # A zero-size parameter and a frozen layer, as torch's own optimizer tests use.
    model = nn.Sequential(nn.Linear(13, 31), nn.Tanh(), nn.Linear(31, 7), nn.Linear(7, 5))
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, 4)))
    model[3].requires_grad_(False)
    return model


def train(model, optimizer, steps=20, none_grad_step=7):
    data = torch.randn(steps, 16, 13)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if step == none_grad_step:  # one step where a layer has no gradient at all
            model[0].requires_grad_(False)
        loss = model(data[step]).pow(2).mean()
        loss.backward()
        model[0].requires_grad_(True)
        optimizer.step()


@pytest.mark.parametrize("backend", backends("cpu", "reference"), indirect=True)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("torch_impl", ["for-loop", "fused"])
def test_llaca_off_is_adamw(backend, amsgrad, torch_impl):
    model = small_model()
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad)
    ours = LLaCAAdamW(model.parameters(), llaca=False, backend=backend, **kwargs)
    impl = {"foreach": False} if torch_impl == "for-loop" else {"fused": True}
    theirs = torch.optim.AdamW(twin.parameters(), **kwargs, **impl)
    torch.manual_seed(1234)
    train(model, ours)
    torch.manual_seed(1234)
    train(twin, theirs)
    # fp32 rounding only: same formula, contractions and operation order may differ by an ulp
    # per step, compounding over 20 steps on O(1) weights.
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what=name)
        if q in theirs.state:
            for key, value in theirs.state[q].items():
                assert_close(ours.state[p][key].cpu(), value.cpu(), rtol=1e-5, atol=1e-6, what=f"{name}.{key}")
    assert ours.state_dict()["param_groups"][0].keys() >= theirs.state_dict()["param_groups"][0].keys()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_the_reference_is_adamws_for_loop_bit_for_bit(amsgrad, maximize):
    """In fp32 the reference backend with llaca=False runs torch.optim.AdamW(foreach=False)'s
    operations in its order: the same bits after every step, state included."""
    model = small_model()
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad,
                  maximize=maximize)
    ours = LLaCAAdamW(model.parameters(), llaca=False, backend="reference", **kwargs)
    theirs = torch.optim.AdamW(twin.parameters(), foreach=False, **kwargs)
    seed = int(torch.randint(0, 2**31, ()))
    for net, optimizer in ((model, ours), (twin, theirs)):
        torch.manual_seed(seed)
        train(net, optimizer, steps=25)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
        for key, value in theirs.state.get(q, {}).items():
            assert torch.equal(ours.state[p][key], value), f"{name}.{key}"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the cpu kernels follow torch's x86-64 AVX2/AVX512 build of fused AdamW")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_the_cpu_backend_is_torchs_fused_adamw_bit_for_bit(cpu_backend, dtype, amsgrad, maximize):
    """llaca=False on the cpu backend against torch.optim.AdamW(fused=True) over 25 steps: the
    same bits, state included, for tensors of whole vectors (sizes that are multiples of 64,
    split across threads or not); the last elements of other sizes that fill no vector, which torch steps
    in a scalar loop with other roundings, agree to float32 rounding (NOTE [torch's AdamW bits]
    in csrc/include/llaca/math.h). The AdamW part of a LLaCA step is the same code."""
    whole = [64, 4096, 70016, 2**18 + 4096]  # multiples of every vector width torch uses
    with_tail = [7, 13, 4097]
    sizes = whole + with_tail
    ours_params = [nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
    their_params = [nn.Parameter(p.detach().clone()) for p in ours_params]
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad,
                  maximize=maximize)
    ours = LLaCAAdamW(ours_params, llaca=False, backend=cpu_backend, **kwargs)
    theirs = torch.optim.AdamW(their_params, fused=True, **kwargs)
    for _ in range(25):
        for p, q in zip(ours_params, their_params):
            p.grad = torch.randn(p.shape).to(dtype)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for i, (p, q) in enumerate(zip(ours_params, their_params)):
        pairs = [("param", p, q)] + [(key, ours.state[p][key], value)
                                     for key, value in theirs.state[q].items()]
        for key, a, b in pairs:
            if sizes[i] in whole:
                assert torch.equal(a, b), f"{key} of the {sizes[i]}-element tensor"
            else:
                # float32 rounding, then one rounding of the stored 16-bit value. Where that
                # rounding went the other way at some step, the two stay about one 16-bit ulp
                # apart from then on: an absolute difference at the scale of the values the
                # tensor had, which a small final value turns into a large relative one. So a
                # 16-bit tensor may also differ by two ulps of its largest value (over 6000
                # runs of this case on 2 threads, at most one).
                rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
                atol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * b.float().abs().max().item()
                assert_close(a.float(), b.float(), rtol=rtol, atol=atol,
                             what=f"{key} of the {sizes[i]}-element tensor")


def test_group_keys_and_defaults_match_adamw():
    p = nn.Parameter(torch.randn(3))
    ours, theirs = LLaCAAdamW([p]), torch.optim.AdamW([p])
    for key, value in theirs.param_groups[0].items():
        if key != "params":
            assert ours.param_groups[0][key] == value, key
    for key in ("preset", "scale", "base_weight", "llaca", "ema_dtype"):
        assert key in ours.param_groups[0]


def test_schedulers_closures_zero_grad_and_param_groups():
    model = small_model()
    optimizer = LLaCAAdamW(model[0].parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.05, "preset": "continual-next"})
    x = torch.randn(8, 13)

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():
            expected = model(x).pow(2).mean()
        returned = optimizer.step(closure)  # the closure's loss, computed before the update
        assert torch.equal(returned.detach(), expected)
    for _ in range(3):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model[0].parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model[0].parameters())
    assert optimizer.ema(next(model[2].parameters())) is not None


def test_adamw_checkpoint_loads_into_llaca_adamw():
    model = small_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, adamw, steps=3)
    buffer = io.BytesIO()
    torch.save(adamw.state_dict(), buffer)
    ours = LLaCAAdamW(model.parameters(), lr=1e-2)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))
    assert ours.param_groups[0]["preset"] == "coin"
    train(model, ours, steps=2)  # moments resumed, EMA starts now
    assert ours.ema(model[0].weight) is not None


@pytest.mark.parametrize("backend", backends("cpu", "triton-interpreted", "reference"), indirect=True)
def test_tensor_learning_rate_equals_float(backend):
    model, twin = small_model(), small_model()
    twin.load_state_dict(model.state_dict())
    as_float = LLaCAAdamW(model.parameters(), lr=3e-3, backend=backend)
    as_tensor = LLaCAAdamW(twin.parameters(), lr=torch.tensor(3e-3, dtype=torch.float64), backend=backend)
    torch.manual_seed(7)
    train(model, as_float, steps=5)
    torch.manual_seed(7)
    train(twin, as_tensor, steps=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        if p in as_float.state:
            assert torch.equal(as_float.ema(p), as_tensor.ema(q))


def test_signature_is_adamws_with_the_llaca_knobs_after_it():
    """Code written for torch.optim.AdamW (``fused=True``, ``foreach=False``, ...) runs
    unchanged: every AdamW parameter is accepted, in the same position or keyword, with the
    same default."""
    import inspect

    ours = inspect.signature(LLaCAAdamW.__init__).parameters
    for name, theirs in inspect.signature(torch.optim.AdamW.__init__).parameters.items():
        assert name in ours, f"LLaCAAdamW does not take AdamW's {name!r}"
        assert ours[name].kind == theirs.kind and ours[name].default == theirs.default, name
    torch_names = list(inspect.signature(torch.optim.AdamW.__init__).parameters)
    assert list(ours)[: len(torch_names)] == torch_names  # the LLaCA knobs come after


def test_implementation_flags_change_nothing(cpu_backend):
    """fused, foreach and capturable pick an implementation in torch and change no result;
    here the backend picks it, so the trajectory is the same to the bit."""
    torch.manual_seed(0)
    base = small_model()
    runs = []
    for flags in ({}, {"fused": True, "capturable": True}, {"foreach": False, "fused": False}):
        model = small_model()
        model.load_state_dict(base.state_dict())
        optimizer = LLaCAAdamW(model.parameters(), lr=1e-2, backend=cpu_backend, **flags)
        torch.manual_seed(1)
        train(model, optimizer, steps=6)
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_unsupported_implementation_flags_are_refused():
    params = list(small_model().parameters())
    with pytest.raises(ValueError, match=r"differentiable=True is not supported.*constructor"):
        LLaCAAdamW(params, differentiable=True)
    with pytest.raises(ValueError, match=r"fused=True .* backend='reference'"):
        LLaCAAdamW(params, fused=True, backend="reference")
    with pytest.raises(TypeError, match=r"foreach must be None, True or False, got 'yes'"):
        LLaCAAdamW(params, foreach="yes")
    optimizer = LLaCAAdamW(params[:2])
    with pytest.raises(ValueError, match=r"differentiable=True .*param_groups\[1\]"):
        optimizer.add_param_group({"params": params[2:], "differentiable": True})
    assert len(optimizer.param_groups) == 1


def test_steps_run_without_gradient_recording():
    """As torch's optimizers do: the kernels run under no_grad, so our ops never pass through
    torch's autograd fallback for ops without a derivative (which walks every parameter: about a
    fifth of a small-tensor step's host time), and nothing a step does is recorded."""
    from llaca_optim import LLaCA
    from llaca_optim.ops.registry import reference_backend

    def recording():
        backend = reference_backend()
        backend.grad_modes = []

        def call(op, lists, run=backend.call, **scalars):
            backend.grad_modes.append(torch.is_grad_enabled())
            run(op, lists, **scalars)
        backend.call = call
        return backend

    for make in (lambda ps, b: LLaCAAdamW(ps, backend=b),
                 lambda ps, b: LLaCA(torch.optim.SGD(ps, lr=0.1), backend=b)):
        model = small_model()
        backend = recording()
        optimizer = make(model.parameters(), backend)
        train(model, optimizer, steps=3)
        assert backend.grad_modes and not any(backend.grad_modes), backend.grad_modes
        assert torch.is_grad_enabled()
        assert all(p.is_leaf and p.grad_fn is None for p in model.parameters())
