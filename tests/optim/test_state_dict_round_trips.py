"""State dicts that travel: an AdamW checkpoint into an optimizer built with its own LLaCA knobs,
an EMA carried through an optimizer that steps without it (and so goes stale), and the dtype
words of a loaded group or of the functional API. Nothing may be lost, silently changed or
resumed from a stale EMA; a bad value is refused, naming the group, the key and the fix, and
changes nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from llaca_optim import LLaCA, LLaCAAdamW, functional
from llaca_optim.ops.roles import LLACA_STATE_KEYS
from llaca_optim.optim import stale
from support.compare import assert_equal
from support.state import assert_same, everything, make_model, train

# Each LLaCA knob with a value other than the library's default (and other than the preset's
# values, so that a knob reset to its default shows).
KNOBS = {
    "preset": "continual-next",
    "scale": 3.5,
    "base_weight": 0.2,
    "norms": "mean",
    "llaca": False,
    "ema_dtype": torch.float64,
}


# ---------------------------------------------------------------- the optimizer's own knobs

@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_an_adamw_checkpoint_keeps_the_llaca_adamw_knobs(knob):
    """A group loaded from torch.optim.AdamW has none of the LLaCA knobs: each comes from the
    optimizer's own settings, not the library's defaults."""
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, adamw, 3)
    ours = LLaCAAdamW(model.parameters(), lr=1e-2, **{knob: KNOBS[knob]}, defer_blend=False)
    ours.load_state_dict(adamw.state_dict())
    group = ours.param_groups[0]
    assert group[knob] == KNOBS[knob]
    assert group["defer_blend"] is False
    # What the knob does still holds after the load, against a twin built the same way that
    # never loaded anything but AdamW's moments.
    twin_model = copy.deepcopy(model)
    twin = LLaCAAdamW(twin_model.parameters(), lr=1e-2, **{knob: KNOBS[knob]}, defer_blend=False)
    twin.load_state_dict(copy.deepcopy(adamw.state_dict()))
    for g in twin.param_groups:  # the twin's groups say every knob explicitly
        g[knob] = KNOBS[knob]
    grads = train(model, ours, 4)
    train(twin_model, twin, 4, grads)
    assert_same(everything(twin_model, twin), everything(model, ours))
    if knob == "llaca":
        assert all(ours.ema(p) is None for p in model.parameters())
    if knob == "ema_dtype":
        assert all(ours.ema(p).dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_a_state_dict_without_knobs_keeps_the_wrappers_knobs(knob):
    """The wrapper, loading a state dict whose groups lack the knobs (its inner optimizer's
    groups as a plain SGD saved them), keeps its own."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, sgd, 2)
    saved_inner = sgd.state_dict()
    plain_groups = copy.deepcopy(saved_inner["param_groups"])
    wrapper = LLaCA(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                    **{knob: KNOBS[knob]})
    wrapper.load_state_dict({"inner": saved_inner, "llaca": {"state": {}, "param_groups": plain_groups}})
    assert wrapper.param_groups[0][knob] == KNOBS[knob]
    train(model, wrapper, 2)
    if knob == "llaca":
        assert all(wrapper.ema(p) is None for p in model.parameters())
    if knob == "ema_dtype":
        assert all(wrapper.ema(p).dtype == torch.float64 for p in model.parameters())


# ---------------------------------------------------------------- stale EMAs

def _without_llaca(saved):
    out = copy.deepcopy(saved)
    for entry in out["state"].values():
        for key in (*LLACA_STATE_KEYS, stale.KEY):
            entry.pop(key, None)
    return out


@pytest.mark.parametrize("carried_steps", [1, 4])
def test_an_ema_carried_through_adamw_restarts_with_a_warning(carried_steps):
    """LLaCAAdamW -> state_dict -> torch.optim.AdamW (which carries the EMA along untouched while
    it trains) -> state_dict -> LLaCAAdamW: the EMA is behind its parameter. It restarts from the
    current weights, as a load of AdamW's state alone would start it, and a warning says so."""
    model = make_model()
    ours = LLaCAAdamW(model.parameters(), lr=1e-2)
    train(model, ours, 5)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.load_state_dict(ours.state_dict())
    train(model, adamw, carried_steps)
    carried = adamw.state_dict()
    assert "ema" in carried["state"][0]  # torch carried it
    back = LLaCAAdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=r"did not follow.*restart"):
        back.load_state_dict(carried)
    assert all(back.ema(p) is None for p in model.parameters())
    assert all("ema_step" not in s for s in back.state.values())
    twin_model = copy.deepcopy(model)
    twin = LLaCAAdamW(twin_model.parameters(), lr=1e-2)
    twin.load_state_dict(_without_llaca(carried))
    grads = train(model, back, 3)
    train(twin_model, twin, 3, grads)
    assert_same(everything(twin_model, twin), everything(model, back))


def test_an_ema_that_followed_every_step_loads_silently():
    """Through AdamW without a step, or straight back: the EMA is current and resumes bit for
    bit; no warning."""
    model = make_model()
    ours = LLaCAAdamW(model.parameters(), lr=1e-2)
    train(model, ours, 4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.load_state_dict(ours.state_dict())
    for saved in (adamw.state_dict(), ours.state_dict()):
        twin_model = copy.deepcopy(model)
        twin = LLaCAAdamW(twin_model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            twin.load_state_dict(saved)
        for p, q in zip(model.parameters(), twin_model.parameters()):
            assert_equal(twin.ema(q), ours.ema(p), what="ema")
    reference_model, reference = copy.deepcopy((model, ours))
    grads = train(reference_model, reference, 2)
    train(twin_model, twin, 2, grads)
    assert_same(everything(reference_model, reference), everything(twin_model, twin))


def test_the_wrappers_ema_behind_its_inner_optimizer_restarts_with_a_warning():
    """LLaCA(Adam): the inner optimizer's state trained on without the wrapper, then put back
    beside the wrapper's saved EMA: the EMA is behind its parameter and restarts."""
    model = make_model()
    wrapper = LLaCA(torch.optim.Adam(model.parameters(), lr=1e-2))
    train(model, wrapper, 4)
    saved = wrapper.state_dict()
    alone = torch.optim.Adam(model.parameters(), lr=1e-2)
    alone.load_state_dict(saved["inner"])
    train(model, alone, 2)
    back = LLaCA(torch.optim.Adam(model.parameters(), lr=1e-2))
    with pytest.warns(UserWarning, match=r"did not follow"):
        back.load_state_dict({"inner": alone.state_dict(), "llaca": saved["llaca"]})
    assert all(back.ema(p) is None for p in model.parameters())
    train(model, back, 1)
    assert all(back.ema(p) is not None for p in model.parameters())
    with warnings.catch_warnings():  # its own state dict, straight back: silent
        warnings.simplefilter("error")
        LLaCA(torch.optim.Adam(model.parameters(), lr=1e-2)).load_state_dict(back.state_dict())


# ---------------------------------------------------------------- dtype words

def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return info.value


@pytest.mark.parametrize("ema_dtype", [torch.int32, "float32", "half", 3])
def test_the_functional_api_refuses_what_the_optimizer_refuses(ema_dtype):
    p = nn.Parameter(torch.randn(4, 3))
    ours = _error(lambda: LLaCAAdamW([p], ema_dtype=ema_dtype))
    theirs = _error(lambda: functional.new_state(p, ema_dtype=ema_dtype))
    assert type(ours) is type(theirs)
    assert (str(theirs).replace("functional arguments", "WHERE")
            == str(ours).replace("constructor arguments", "WHERE"))
    assert "ema_dtype" in str(theirs)


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_a_loaded_ema_dtype_word_is_refused_naming_the_fix(kind):
    model = make_model()
    optimizer = (LLaCAAdamW(model.parameters(), lr=1e-2) if kind == "fused"
                 else LLaCA(torch.optim.SGD(model.parameters(), lr=0.05)))
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    # The wrapper's groups are its inner optimizer's: both parts of its state dict hold them.
    for part in ([saved] if kind == "fused" else [saved["inner"], saved["llaca"]]):
        part["param_groups"][0]["ema_dtype"] = "half"
    before = everything(model, optimizer)
    with pytest.raises(ValueError, match=r"ema_dtype.*'half'.*param_groups\[0\].*torch\.half"):
        optimizer.load_state_dict(saved)
    assert_same(before, everything(model, optimizer))


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_a_state_dict_kept_in_memory_while_training_goes_on_loads_its_current_ema(kind):
    """torch's state dicts hold the live state tensors: one kept in memory while training goes
    on holds a step count and an EMA that moved on together. Loading it is not a stale EMA."""
    model = make_model()
    optimizer = (LLaCAAdamW(model.parameters(), lr=1e-2) if kind == "fused"
                 else LLaCA(torch.optim.Adam(model.parameters(), lr=1e-2)))
    train(model, optimizer, 3)
    kept = optimizer.state_dict()
    train(model, optimizer, 3)
    twin_model = copy.deepcopy(model)
    twin = (LLaCAAdamW(twin_model.parameters(), lr=1e-2) if kind == "fused"
            else LLaCA(torch.optim.Adam(twin_model.parameters(), lr=1e-2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin.load_state_dict(kept)
        optimizer.load_state_dict(kept)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert_equal(twin.ema(q), optimizer.ema(p), what="ema")


def test_an_ema_cast_by_adamws_loader_is_still_found_stale():
    """torch's loader casts every floating state tensor to the parameter's dtype: a float32 EMA
    of a bfloat16 parameter comes back rounded, and is still recognised as not having moved."""
    model = make_model().to(torch.bfloat16)
    ours = LLaCAAdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        ours.zero_grad()
        model(torch.randn(5, 6, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        ours.step()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.load_state_dict(ours.state_dict())
    assert adamw.state[model[0].weight]["ema"].dtype == torch.bfloat16
    adamw.zero_grad()
    model(torch.randn(5, 6, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    adamw.step()
    back = LLaCAAdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="did not follow"):
        back.load_state_dict(adamw.state_dict())
    assert all(back.ema(p) is None for p in model.parameters())
