"""LLaCAAdamW in the Hugging Face Trainer (a tiny Llama from transformers, on the CPU): it trains
like the reference, a checkpoint resumes bit for bit with the EMA, and LLaCACallback ends the
task (weights <- EMA, fresh optimizer) and logs the alphas."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments)

from llaca_optim import LLaCA, LLaCAAdamW  # noqa: E402
from llaca_optim.integrations.huggingface import LLaCACallback, alpha_summary, llaca_optimizer  # noqa: E402

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.slow]

VOCAB, SEQ = 61, 12


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences (a fresh draw from the test's seed), trained as causal LM."""

    def __init__(self, n: int = 48) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: str, steps: int = 10, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=out, per_device_train_batch_size=8, max_steps=steps,
                  learning_rate=3e-3, weight_decay=0.01, logging_steps=2, save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def llaca_state(optimizer: LLaCAAdamW) -> list[dict[str, torch.Tensor]]:
    optimizer.flush_ema()
    return [{k: v.clone() for k, v in optimizer.state[p].items()}
            for g in optimizer.param_groups for p in g["params"]]


def test_trainer_steps_match_the_reference_backend(tmp_path, cpu_backend):
    """The Trainer (accelerate's wrapper, its gradient clipping, its LR schedule) drives the
    fused kernel as it drives the oracle. At every step the reference backend takes the step
    from the fused optimizer's inputs: its parameters, its gradients after the Trainer clipped
    them, its state and its groups after the schedule set their lr. One step from equal inputs
    differs by that step's rounding only; two whole runs would not (Adam divides by sqrt(v) + eps,
    and an element whose gradient is near zero turns a last-bit difference into a different
    step)."""
    model = tiny_llama(0)
    params = list(model.parameters())
    optimizer = LLaCAAdamW(params, lr=3e-3, backend=cpu_backend)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = LLaCAAdamW(twin_params, lr=3e-3, backend="reference")
    fused_step, lrs = optimizer.step, []

    def step(*args, **kwargs):
        with torch.no_grad():
            for p, q in zip(params, twin_params):
                q.copy_(p)
                q.grad = p.grad.clone()
        twin.load_state_dict(optimizer.state_dict())
        result = fused_step(*args, **kwargs)
        twin.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        what = f"step {len(lrs)}"
        for p, q in zip(params, twin_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
        for s, r in zip(llaca_state(optimizer), llaca_state(twin)):
            assert s.keys() == r.keys()
            for key in s:  # the kernel sums in another order than torch: alphas differ in the
                # last bits, the EMA by a few ulps of its drift
                torch.testing.assert_close(s[key], r[key], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{what}, {key}: {m}")
        return result

    optimizer.step = step
    Trainer(model=model, args=training_args(str(tmp_path)), train_dataset=Tokens(),
            optimizers=(optimizer, None)).train()
    assert len(lrs) == 10
    assert all(a > b for a, b in zip(lrs, lrs[1:])), f"the linear schedule reached the step: {lrs}"


def test_optimizer_cls_and_kwargs_builds_llaca_with_the_trainers_groups(tmp_path, cpu_backend):
    trainer = Trainer(model=tiny_llama(0), args=training_args(str(tmp_path), steps=2),
                      train_dataset=Tokens(16),
                      optimizer_cls_and_kwargs=(LLaCAAdamW, {"preset": "continual-next"}))
    trainer.train()
    optimizer = llaca_optimizer(trainer.optimizer)
    assert isinstance(optimizer, LLaCAAdamW) and optimizer.backend == cpu_backend
    # The Trainer's own split: no weight decay on norms and biases.
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]
    assert all(g["preset"] == "continual-next" for g in optimizer.param_groups)
    assert all(optimizer.ema(p) is not None for g in optimizer.param_groups for p in g["params"])


class _SavesWithTheEMA(Trainer):
    """Saves every checkpoint with the EMA weights swapped in, so that the checkpoint's model file
    holds the EMA (the weights one evaluates and deploys); records them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_emas: dict[int, list[torch.Tensor]] = {}

    def _save_checkpoint(self, model, trial):
        with llaca_optimizer(self.optimizer).ema_weights():
            self.saved_emas[self.state.global_step] = [p.detach().clone() for p in model.parameters()]
            super()._save_checkpoint(model, trial)


@pytest.mark.parametrize("saved", ["as trained", "inside ema_weights"])
def test_checkpoint_resume_continues_bit_for_bit(tmp_path, cpu_backend, saved):
    """Trainer's optimizer.pt is our state dict, EMA and previous gradients included: a run
    resumed from step 4 ends where the uninterrupted run ends, to the bit. A checkpoint saved
    with the EMA swapped in holds the EMA as the model's weights and, in optimizer.pt, the true
    state with the live weights (NOTE [state dicts inside the EMA swap]): it resumes as well."""
    data = Tokens()
    out = str(tmp_path)
    model = tiny_llama(0)
    optimizer = LLaCAAdamW(model.parameters(), lr=3e-3)
    trainer = (Trainer if saved == "as trained" else _SavesWithTheEMA)(
        model=model, args=training_args(out, save_strategy="steps", save_steps=4),
        train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))
    if saved == "inside ema_weights":
        safetensors = pytest.importorskip("safetensors.torch")
        weights = safetensors.load_file(os.path.join(out, "checkpoint-4", "model.safetensors"))
        for (name, _), ema in zip(model.named_parameters(), trainer.saved_emas[4]):
            assert torch.equal(weights[name], ema), name

    resumed_model = tiny_llama(1)  # other initial weights: the checkpoint must overwrite them all
    resumed = LLaCAAdamW(resumed_model.parameters(), lr=3e-3)
    Trainer(model=resumed_model, args=training_args(out), train_dataset=data,
            optimizers=(resumed, None)).train(
                resume_from_checkpoint=os.path.join(out, "checkpoint-4"))

    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for s, r in zip(llaca_state(optimizer), llaca_state(resumed)):
        assert s.keys() == r.keys() and {"ema", "prev_grad", "alpha"} <= s.keys()
        for key in s:
            assert torch.equal(s[key], r[key]), key


class _RecordEMA(TrainerCallback):
    """Placed before LLaCACallback: what the EMAs were when training ended."""

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        inner = llaca_optimizer(optimizer)
        self.emas = [inner.ema(p).clone() for g in inner.param_groups for p in g["params"]]


@pytest.mark.parametrize("kind", ["LLaCAAdamW", "LLaCA(AdamW)", "one LLaCAAdamW for both tasks"])
def test_callback_ends_each_task_with_the_ema_in_the_weights(tmp_path, cpu_backend, kind):
    model = tiny_llama(0)
    shared = LLaCAAdamW(model.parameters(), lr=3e-3)
    for task in range(2):
        if kind == "LLaCA(AdamW)":
            optimizer = LLaCA(torch.optim.AdamW(model.parameters(), lr=3e-3))
        elif kind == "LLaCAAdamW":
            optimizer = LLaCAAdamW(model.parameters(), lr=3e-3)
        else:  # end_task left it as a fresh one; the second Trainer's schedule starts again
            optimizer = shared
        recorder = _RecordEMA()
        trainer = Trainer(model=model, args=training_args(str(tmp_path / str(task)), steps=6),
                          train_dataset=Tokens(), optimizers=(optimizer, None),
                          callbacks=[recorder, LLaCACallback()])
        trainer.train()
        for p, ema in zip(model.parameters(), recorder.emas):
            assert torch.equal(p, ema.to(p.dtype)), f"task {task}: weights are not the EMA"
        # end_task left the optimizer as a freshly built one.
        assert all(optimizer.ema(p) is None for p in model.parameters())
        assert not any(optimizer.state.values()), "end_task kept optimizer state"

        logged = [e for e in trainer.state.log_history if "llaca/alpha_median" in e]
        assert [e["step"] for e in logged if "loss" in e] == [2, 4, 6]  # every logging step
        lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
        assert lrs[0] == pytest.approx(3e-3 * 5 / 6)  # linear decay from the full rate again
        for entry in logged:
            assert 0 < entry["llaca/alpha_median"] < 1
            assert 0 <= entry["llaca/alpha_fallback_fraction"] <= 1


def test_alpha_summary_reads_the_optimizers_alphas(cpu_backend):
    model = tiny_llama(0)
    optimizer = LLaCAAdamW(model.parameters(), lr=3e-3)
    assert alpha_summary(optimizer) == {}  # no step yet
    ids = Tokens(8).ids
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    found = optimizer.alphas()
    summary = alpha_summary(optimizer)
    assert summary["llaca/alpha_median"] == pytest.approx(float(found.alphas.double().median()))
    assert summary["llaca/alpha_fallback_fraction"] == pytest.approx(
        found.fell_back.double().mean().item())


def test_callback_refuses_another_optimizer_before_the_first_step(tmp_path):
    model = tiny_llama(0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=training_args(str(tmp_path), steps=2),
                      train_dataset=Tokens(16), callbacks=[LLaCACallback()])  # Trainer's AdamW
    with pytest.raises(TypeError, match=r"AcceleratedOptimizer wrapping AdamW, which is not "
                                        r"\(and does not wrap\) LLaCAAdamW"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="keep_moments must be True or False"):
        LLaCACallback(keep_moments="yes")


def test_peft_lora_task_end_puts_the_ema_into_the_adapters_only(tmp_path, cpu_backend):
    """A PEFT LoRA model in the Trainer: only the adapters train and get an EMA; at the end of the
    task the adapters hold their EMA and the frozen base weights are untouched."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    recorder = _RecordEMA()
    trainer = Trainer(model=model, args=training_args(str(tmp_path), steps=4),
                      train_dataset=Tokens(), callbacks=[recorder, LLaCACallback()],
                      optimizer_cls_and_kwargs=(LLaCAAdamW, {}))
    trainer.train()
    optimizer = llaca_optimizer(trainer.optimizer)
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    for p, ema in zip(in_optimizer, recorder.emas):
        assert torch.equal(p, ema)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # The adapters are what save_pretrained writes: the EMA weights.
    model.save_pretrained(str(tmp_path / "adapter"))
    assert any(f.name.startswith("adapter_model") for f in (tmp_path / "adapter").iterdir())


def test_the_task_end_hook_sees_the_ema_and_each_step_logs_its_alphas_once(tmp_path, cpu_backend):
    """``on_task_end`` runs inside ``train()`` with the model and the optimizer while both the
    EMA and the live weights are there (the moment to export the EMA); the alphas of a step are
    logged on its entry only, not again on the end-of-training summary entry."""
    model = tiny_llama(0)
    seen = {}

    def hook(m, optimizer):
        seen["model"] = m
        seen["emas"] = [optimizer.ema(p).detach().clone() for p in m.parameters()]
        seen["live"] = [p.detach().clone() for p in m.parameters()]

    trainer = Trainer(model=model, args=training_args(str(tmp_path), steps=6), train_dataset=Tokens(),
                      optimizer_cls_and_kwargs=(LLaCAAdamW, {}),
                      callbacks=[LLaCACallback(on_task_end=hook)])
    trainer.train()
    assert seen["model"] is model
    for p, ema in zip(model.parameters(), seen["emas"]):
        assert torch.equal(p, ema.to(p.dtype))  # end_task came after the hook
    assert any(not torch.equal(live, ema) for live, ema in zip(seen["live"], seen["emas"]))
    entries = [e for e in trainer.state.log_history if "llaca/alpha_median" in e]
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert not any("train_runtime" in e for e in entries)
    with pytest.raises(TypeError, match="on_task_end must be a function"):
        LLaCACallback(on_task_end="save")


def test_the_callback_logs_a_task_run_as_a_fixed_ema_once(tmp_path, cpu_backend, caplog):
    """What the optimizer warns at the task's end, the callback says in the Trainer's log as soon
    as three logging steps in a row show it, once."""
    model = tiny_llama(0)
    trainer = Trainer(model=model, args=training_args(str(tmp_path), steps=24, logging_steps=2),
                      train_dataset=Tokens(), optimizer_cls_and_kwargs=(LLaCAAdamW, {"scale": 1e9}),
                      callbacks=[LLaCACallback()])
    with caplog.at_level("WARNING", logger="llaca_optim"):
        with pytest.warns(UserWarning, match="fixed EMA"):  # the optimizer's, at end_task
            trainer.train()
    said = [r.getMessage() for r in caplog.records if "fixed EMA" in r.getMessage()]
    assert len(said) == 1 and "Lower `scale`" in said[0]
