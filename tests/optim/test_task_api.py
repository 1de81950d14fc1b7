"""end_task, the EMA swap, alphas, state dicts and AMP (docs/spec.md section 2), on every backend."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from support.compare import assert_equal
from support.backends import backend_value, backends
from support.scenarios import check_grad_scaler_overflow
from support.state import assert_same, everything, make_model, make_optimizer, run_steps


@pytest.fixture(params=backends())
def backend(request):
    return backend_value(request.param)


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_weights_round_trip_is_bit_exact(backend, kind, dtype):
    model = make_model(dtype)
    optimizer = make_optimizer(kind, model.parameters(), backend)
    run_steps(model, optimizer, torch.randn(5, 4, 6, dtype=dtype))
    before = everything(model, optimizer)
    x = torch.randn(4, 6, dtype=dtype)
    with optimizer.ema_weights():
        for p, ema in zip(model.parameters(), (s["ema"] for s in before["state"])):
            assert_equal(p.detach(), ema.to(dtype), what="EMA swapped in")
            assert_equal(optimizer.ema(p), ema, what="ema() inside the swap")
        with pytest.raises(RuntimeError, match="ema_weights"):
            optimizer.step()
        ema_output = model(x)
    assert_same(everything(model, optimizer), before)
    with pytest.raises(RuntimeError, match="boom"):
        with optimizer.ema_weights():
            raise RuntimeError("boom")
    assert_same(everything(model, optimizer), before)
    assert not torch.equal(ema_output, model(x))


# horizon=H keeps a signal statistic per tensor beside the EMA (NOTE [horizon] in
# optim/sharded.py): it is state like the EMA's, so these run with and without it.
HORIZONS = [None, 7]


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
@pytest.mark.parametrize("horizon", HORIZONS)
def test_end_task_loads_the_ema_and_resets_to_a_fresh_optimizer(backend, kind, horizon):
    model = make_model()
    optimizer = make_optimizer(kind, model.parameters(), backend, horizon=horizon)
    run_steps(model, optimizer, torch.randn(6, 4, 6))
    emas = [optimizer.ema(p).clone() for p in model.parameters()]
    optimizer.end_task()
    for p, ema in zip(model.parameters(), emas):
        assert_equal(p.detach(), ema, what="weights after end_task")
    assert not optimizer.state and not getattr(optimizer, "optimizer", optimizer).state
    # From here on it behaves exactly like a freshly built optimizer on the same weights.
    twin = copy.deepcopy(model)
    fresh = make_optimizer(kind, twin.parameters(), backend, horizon=horizon)
    data = torch.randn(3, 4, 6)
    run_steps(model, optimizer, data)
    run_steps(twin, fresh, data)
    assert_same(everything(model, optimizer), everything(twin, fresh))


@pytest.mark.parametrize("horizon", HORIZONS)
def test_end_task_can_keep_moments(backend, horizon):
    model = make_model()
    optimizer = make_optimizer("fused", model.parameters(), backend, horizon=horizon)
    run_steps(model, optimizer, torch.randn(3, 4, 6))
    assert ("signal_count" in optimizer.state[next(model.parameters())]) == (horizon is not None)
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    optimizer.end_task(keep_moments=True)
    for p, m in zip(model.parameters(), moments):
        assert_equal(optimizer.state[p]["exp_avg"], m, what="exp_avg kept")
        assert "ema" not in optimizer.state[p] and "signal_count" not in optimizer.state[p]
    assert int(optimizer.state[next(model.parameters())]["step"]) == 3


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_state_dict_saved_halfway_continues_identically(backend, kind, dtype, horizon):
    model = make_model(dtype)
    optimizer = make_optimizer(kind, model.parameters(), backend, horizon=horizon)
    data = torch.randn(10, 4, 6, dtype=dtype)
    run_steps(model, optimizer, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    run_steps(model, optimizer, data[5:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = make_model(dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed = make_optimizer(kind, resumed_model.parameters(), backend, horizon=horizon)
    resumed.load_state_dict(saved["optimizer"])
    if horizon is not None:  # the statistic came back in its own dtype, not the parameter's
        state = (resumed.state[next(resumed_model.parameters())])
        assert state["signal_log_mean"].dtype == torch.float64 and int(state["signal_count"]) == 4
    ema = resumed.ema(next(resumed_model.parameters()))
    assert ema.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype), "EMA kept its precision"
    run_steps(resumed_model, resumed, data[5:])
    assert_same(everything(resumed_model, resumed), everything(model, optimizer))


def test_alphas_are_device_tensors_and_report_fallback(backend):
    model = make_model()
    optimizer = make_optimizer("fused", model.parameters(), backend)
    assert optimizer.alphas().alphas.numel() == 0
    run_steps(model, optimizer, torch.randn(1, 4, 6))
    first = optimizer.alphas()
    assert first.alphas.dtype == torch.float32 and first.fell_back.dtype == torch.bool
    assert len(first.params) == 4 and bool(first.fell_back.all())  # no previous gradient yet
    assert torch.allclose(first.alphas, torch.full((4,), 0.01))
    run_steps(model, optimizer, torch.randn(3, 4, 6))
    later = optimizer.alphas()
    adaptive = later.alphas[~later.fell_back]
    assert bool(((adaptive > 0) & (adaptive < 1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scaler_overflow_changes_nothing(backend, dtype):
    model = make_model(dtype)
    check_grad_scaler_overflow(model, make_optimizer("fused", model.parameters(), backend), dtype)


def test_scaled_gradients_are_unscaled_inside_the_step(backend):
    model = make_model()
    twin = copy.deepcopy(model)
    ours = make_optimizer("fused", model.parameters(), backend)
    plain = make_optimizer("fused", twin.parameters(), backend)
    scale = torch.tensor(256.0)
    for x in torch.randn(4, 4, 6):
        for m, opt in ((model, ours), (twin, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
        for p in model.parameters():
            p.grad.mul_(scale)  # a power of two: unscaling is exact
        ours.grad_scale, ours.found_inf = scale, torch.tensor(0.0)
        ours.step()
        plain.step()
    assert_same(everything(model, ours), everything(twin, plain))
