"""Two ranks (gloo on the CPU, launched by torch.distributed.run) that hand LLaCAAdamW or LLaCA to
DeepSpeed at ZeRO stages 0 to 3 and compare every step with an unsharded twin that trains the
same model on the same global batches in one process. Each rank prints, as JSON on stdout, what
it measured; tests/integrations/test_deepspeed.py asserts on it.

Per case: the largest differences from the twin (parameters, moments, previous gradients, EMAs,
alphas at every step, fallback flags), whether a run resumed from DeepSpeed's checkpoint
continues bit for bit, whether ``ema_weights()`` puts the EMA into the model DeepSpeed
evaluates, whether ``end_task()`` leaves the model at the twin's weights, and what the
partitions looked like (pieces straddling ranks, ranks holding no piece).

In bf16 (DeepSpeed's ``bf16`` section) the twin steps fp32 masters with the gradients DeepSpeed
hands its optimizer (gathered with ``deepspeed.utils.safe_get_full_grad``): the forward in bf16
differs between one process and two, the optimizer's work on the same gradients must not."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

import llaca_optim  # noqa: E402
from llaca_optim.integrations import deepspeed as ds_integration  # noqa: E402
from llaca_optim.optim import zero  # noqa: E402

import _no_shm_op  # noqa: E402,F401  (no build of DeepSpeed's shared-memory op)

STEPS, SAVE_AT, MICRO = 24, 12, 4
STATE_KEYS = ("exp_avg", "exp_avg_sq", "prev_grad", "ema")


class Net(torch.nn.Module):
    """Tensors of 35, 7, 21, 3 and 1 elements: cut across the two ranks' partitions, and one of
    a single element (in stage 3 the second rank holds none of it; alone in the second param
    group, it leaves the second rank's partition of that group empty in stages 1 and 2). Every
    parameter gets a real gradient (one whose gradient is zero would drift from rounding
    noise, sharded or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.gain


def groups(model, lr):
    rest = [p for n, p in model.named_parameters() if n != "gain"]
    return [{"params": rest}, {"params": [model.gain], "lr": lr / 2}]


def make_optimizer(kind, model, backend="auto", norms="sum"):
    # A scale small enough for these small tensors' alphas to fall in (0, 1), not back to
    # base_weight: the adaptive alpha is what needs the whole-tensor sums. With the mean norms
    # (each row's sums over its whole tensor's size) the scale that does so is smaller.
    knobs = dict(scale=1e-3 if norms == "sum" else 1e-5, base_weight=0.01, norms=norms,
                 backend=backend)
    if norms == "horizon":  # the level set by horizon=H (NOTE [horizon] in optim/sharded.py)
        knobs = dict(horizon=5, backend=backend)
    if kind == "LLaCAAdamW":
        return llaca_optim.LLaCAAdamW(groups(model, 1e-2), lr=1e-2, weight_decay=0.01, **knobs)
    return llaca_optim.LLaCA(torch.optim.AdamW(groups(model, 1e-2), lr=1e-2, weight_decay=0.01), **knobs)


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    world = dist.get_world_size()
    return [(torch.randn(MICRO * world, 5, generator=g), torch.randn(MICRO * world, 3, generator=g))
            for _ in range(STEPS)]


def engine_for(kind, stage, bf16, seed, backend, offload, norms):
    torch.manual_seed(seed)
    model = Net()
    optimizer = make_optimizer(kind, model, backend, norms)
    config = {"train_batch_size": MICRO * dist.get_world_size(),
              "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told not to
              "steps_per_print": 10 ** 9}
    if offload:  # ZeRO-Offload: DeepSpeed's own code paths for masters kept on the host
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if bf16:
        config["bf16"] = {"enabled": True}
    elif stage == 3:
        # Every parameter cut across the ranks: none kept whole between forwards ("persistent",
        # DeepSpeed's default for small ones, which the bf16 case keeps).
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, model, optimizer


def local_batch(batch):
    x, y = batch
    rank = dist.get_rank()
    return x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]


def ds_step(engine, batch, dtype):
    x, y = local_batch(batch)
    engine.backward((engine(x.to(dtype)).float() - y).pow(2).mean())


def gathered(optimizer):
    """Every row's whole state tensors, by id of the model parameter: a collective."""
    out = {key: {} for key in STATE_KEYS}
    for part, state in optimizer._zero_states():
        inner = getattr(optimizer, "optimizer", None)
        inner_state = inner.state.get(part.flat, {}) if inner is not None else {}
        for key in STATE_KEYS:
            value = state.get(key, inner_state.get(key))
            for p, whole in zip(part.rows, zero.full_tensors(part, value)):
                out[key][id(p)] = whole.clone()
    return out


def twin_state(twin_opt, p, key):
    inner = getattr(twin_opt, "optimizer", None)
    state = twin_opt.state.get(p, {})
    if key not in state and inner is not None:
        state = inner.state[p]
    return state[key]


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-30))


def run(kind, stage, bf16=False, backend="auto", offload=False, norms="sum"):
    dtype = torch.bfloat16 if bf16 else torch.float32
    seed = 10 + stage
    data = batches(seed + 100)
    engine, model, optimizer = engine_for(kind, stage, bf16, seed, backend, offload, norms)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    # The twin starts from DeepSpeed's masters (in bf16 they are the bf16 weights, widened).
    twin = Net()
    with torch.no_grad():
        for n, q in twin.named_parameters():
            q.copy_(safe_get_full_fp32_param(params[n]).view_as(q))
    twin_opt = make_optimizer(kind, twin, backend, norms)
    twin_params = dict(twin.named_parameters())
    diffs = {"alpha": 0.0, "fell_back_mismatches": 0, "adaptive_alphas": 0}
    result = {"case": f"{kind}/stage{stage}{'/bf16' if bf16 else ''}"
                      f"{'/' + backend if backend != 'auto' else ''}{'/offload' if offload else ''}"
                      f"{'/' + norms if norms != 'sum' else ''}",
              "rank": dist.get_rank()}
    ckpt = None
    for step, batch in enumerate(data):
        ds_step(engine, batch, dtype)
        if bf16:
            grads = {n: safe_get_full_grad(params[n]).clone() for n in names}
            for n in names:
                twin_params[n].grad = grads[n].view_as(twin_params[n]).float()
        else:
            twin_opt.zero_grad()
            x, y = batch
            (twin(x) - y).pow(2).mean().backward()
        engine.step()
        twin_opt.step()
        ours, theirs = optimizer.alphas(), twin_opt.alphas()
        twin_index = {id(q): i for i, q in enumerate(theirs.params)}
        order = [twin_index[id(twin_params[name_of[id(p)]])] for p in ours.params]
        diffs["alpha"] = max(diffs["alpha"], rel(ours.alphas, theirs.alphas[order]))
        diffs["fell_back_mismatches"] += int((ours.fell_back != theirs.fell_back[order]).sum())
        diffs["adaptive_alphas"] += int((~theirs.fell_back).sum())
        result["alphas_per_step"] = len(ours.params)
        if step + 1 == SAVE_AT:
            ckpt = tempfile.mkdtemp() if dist.get_rank() == 0 else None
            holder = [ckpt]
            dist.broadcast_object_list(holder, src=0)
            ckpt = holder[0]
            engine.save_checkpoint(ckpt, tag="mid")
            ema_at_save = ds_integration.ema_state_dict(model, optimizer)
    state = gathered(optimizer)
    twin_opt.flush_ema()  # its state is read directly below (a deferring bucket's EMA lags)
    for n in names:
        p = params[n]
        diffs["param"] = max(diffs.get("param", 0.0), rel(safe_get_full_fp32_param(p).view_as(twin_params[n]), twin_params[n]))
        for key in STATE_KEYS:
            diffs[key] = max(diffs.get(key, 0.0), rel(state[key][id(p)].view_as(twin_params[n]),
                                                      twin_state(twin_opt, twin_params[n], key)))
    result["diffs"] = diffs
    # DeepSpeed's own view of the EMA (its optimizer-state fragments) is ours.
    result["deepspeed_sees_the_ema"] = all(
        torch.equal(deepspeed.utils.safe_get_full_optimizer_state(params[n], "ema").view(-1),
                    state["ema"][id(params[n])].view(-1))
        for n in (["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] if stage != 3 else names))
    parts = [part for part, _ in optimizer._zero_states()]
    result["partitions"] = len(parts)
    result["pieces"] = [len(part.segments) for part in parts]
    result["rows"] = [len(part.rows) for part in parts]
    result["straddling"] = sum(1 for part in parts for s in part.segments
                               if s.numel < part.row_shapes[s.row].numel())
    result["bad_input"] = bad_input(engine, model, optimizer, data[0], dtype)
    # ema_weights(): the model DeepSpeed runs holds the EMA inside, the live weights after.
    ema = ds_integration.ema_state_dict(model, optimizer)
    live = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
    x, _ = local_batch(data[0])
    with torch.no_grad():
        result["live_output_vs_twin"] = rel(engine(x.to(dtype)).float(), twin(x))
    with optimizer.ema_weights():
        inside = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
        out_ema = engine(x.to(dtype)).float()
    twin_ema = {n: twin_opt.ema(twin_params[n]) for n in names}
    with twin_opt.ema_weights():
        twin_out = twin(x)
    after = {n: safe_get_full_fp32_param(params[n]) for n in names}
    result["ema_weights"] = {
        "masters_hold_the_ema": all(torch.equal(inside[n].view(-1), ema[n].view(-1)) for n in names),
        "ema_vs_twin": max(rel(ema[n].view_as(twin_ema[n]), twin_ema[n]) for n in names),
        "output_vs_twin": rel(out_ema, twin_out),
        "live_restored": all(torch.equal(live[n], after[n]) for n in names),
    }
    # end_task(): the model DeepSpeed runs (and saves) holds the EMA.
    optimizer.end_task()
    twin_opt.end_task()
    with torch.no_grad():
        out_end = engine(x.to(dtype)).float()
    result["end_task"] = {
        "vs_twin": max(rel(safe_get_full_fp32_param(params[n]).view_as(twin_params[n]), twin_params[n]) for n in names),
        "output_vs_twin": rel(out_end, twin(x)),
        "state_cleared": not any(True for _ in optimizer._llaca_params()),
    }
    # Resume from the checkpoint taken at SAVE_AT into a new engine and optimizer: bit for bit.
    engine.destroy()
    engine2, model2, optimizer2 = engine_for(kind, stage, bf16, seed + 1000, backend, offload, norms)
    engine2.load_checkpoint(ckpt, tag="mid")
    engine3, model3, optimizer3 = engine_for(kind, stage, bf16, seed, backend, offload, norms)
    for batch in data[:SAVE_AT]:
        ds_step(engine3, batch, dtype)
        engine3.step()
    for batch in data[SAVE_AT:]:
        ds_step(engine2, batch, dtype)
        engine2.step()
        ds_step(engine3, batch, dtype)
        engine3.step()
    p2, p3 = dict(model2.named_parameters()), dict(model3.named_parameters())
    s2, s3 = gathered(optimizer2), gathered(optimizer3)
    result["resume_bitwise"] = all(
        torch.equal(safe_get_full_fp32_param(p2[n]), safe_get_full_fp32_param(p3[n]))
        and all(torch.equal(s2[key][id(p2[n])], s3[key][id(p3[n])]) for key in STATE_KEYS)
        for n in names) and torch.equal(optimizer2.alphas().alphas, optimizer3.alphas().alphas)
    engine2.destroy()
    engine3.destroy()
    # The EMA weights read from the checkpoint files alone, as zero_to_fp32 reads the masters.
    offline = ds_integration.ema_weights_from_zero_checkpoint(ckpt, tag="mid")
    result["offline_ema_bitwise"] = sorted(offline) == sorted(names) and all(
        torch.equal(offline[n].view(-1), ema_at_save[n].view(-1)) for n in names)
    if dist.get_rank() == 0 and not offload:
        result["offline_files"] = offline_files(ckpt, names, ema_at_save)
    dist.barrier()
    return result


def offline_files(ckpt: str, names: list[str], ema_at_save: dict) -> dict:
    """ema_weights_from_zero_checkpoint as users call it: a relative folder (what
    engine.save_checkpoint users pass), and a copy with a rank's file missing or cut short,
    whose errors must name the user's files."""
    import shutil

    out = {}
    here = os.getcwd()
    try:
        os.chdir(os.path.dirname(ckpt))
        relative = ds_integration.ema_weights_from_zero_checkpoint(os.path.basename(ckpt), tag="mid")
        out["relative_bitwise"] = sorted(relative) == sorted(names) and all(
            torch.equal(relative[n].view(-1), ema_at_save[n].view(-1)) for n in names)
    finally:
        os.chdir(here)
    for damage in ("missing", "truncated"):
        copy_dir = tempfile.mkdtemp()
        shutil.copytree(os.path.join(ckpt, "mid"), os.path.join(copy_dir, "mid"))
        victim = sorted(f for f in os.listdir(os.path.join(copy_dir, "mid"))
                        if f.endswith("_optim_states.pt"))[-1]
        path = os.path.join(copy_dir, "mid", victim)
        if damage == "missing":
            os.remove(path)
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        try:
            ds_integration.ema_weights_from_zero_checkpoint(copy_dir, tag="mid")
            out[damage] = {"error": None}
        except Exception as err:  # noqa: BLE001 - what the user reads is the point
            out[damage] = {"error": f"{type(err).__name__}: {err}", "folder": copy_dir, "file": path}
        shutil.rmtree(copy_dir, ignore_errors=True)
    return out


def bad_input(engine, model, optimizer, batch, dtype) -> dict:
    """Under ZeRO: ema(param) of a partitioned parameter names the way to the EMA; a per-tensor
    slot of the wrong length (a hand-edited state) is refused at the step, naming the entry,
    with nothing changed; the state put back, training goes on."""
    out = {}
    try:
        optimizer.ema(next(model.parameters()))
        out["ema_of_a_partitioned_param"] = None
    except ValueError as err:
        out["ema_of_a_partitioned_param"] = str(err)
    part, state = next(iter(optimizer._zero_states()))
    good = state["alpha"]
    state["alpha"] = good[:1].clone()
    before = {key: value.clone() for key, value in state.items()}
    ds_step(engine, batch, dtype)
    try:
        engine.step()
        out["short_slot"] = None
    except RuntimeError as err:
        out["short_slot"] = str(err)
    out["nothing_changed"] = all(torch.equal(before[k], state[k]) for k in before)
    state["alpha"] = good
    engine.optimizer.zero_grad()
    return out


def stage0(kind):
    """Stage 0: DeepSpeed steps the model's own parameters; LLaCA is per tensor as without it."""
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(kind, model)
    config = {"train_batch_size": MICRO * dist.get_world_size(), "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    data = batches(5)
    twin_opt = make_optimizer(kind, twin)
    for batch in data[:4]:
        ds_step(engine, batch, torch.float32)
        engine.step()
        twin_opt.zero_grad()
        x, y = batch
        (twin(x) - y).pow(2).mean().backward()
        twin_opt.step()
    return {"case": f"{kind}/stage0", "rank": dist.get_rank(), "state_entries": len(optimizer.state),
            "param": max(rel(p, q) for p, q in zip(model.parameters(), twin.parameters()))}


def trainer_case() -> dict:
    """The Hugging Face Trainer with ``deepspeed=`` (ZeRO stage 2), building LLaCAAdamW itself
    from ``optimizer_cls_and_kwargs``, with LLaCACallback: alphas logged per tensor, the task
    ended on every rank."""
    from transformers import Trainer, TrainingArguments

    from llaca_optim.integrations.huggingface import LLaCACallback, llaca_optimizer

    class Wrapped(Net):
        def forward(self, x, y):
            return {"loss": (super().forward(x) - y).pow(2).mean()}

    torch.manual_seed(3)
    model = Wrapped()
    data = [{"x": x, "y": y} for batch in batches(7)[:3] for x, y in zip(*batch)]
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, deepspeed=config,
                             per_device_train_batch_size=MICRO, max_steps=6, logging_steps=2,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LLaCACallback()],
                      optimizer_cls_and_kwargs=(llaca_optim.LLaCAAdamW, {"scale": 1e-3}))
    trainer.train()
    optimizer = llaca_optimizer(trainer.optimizer)
    logged = [entry for entry in trainer.state.log_history if "llaca/alpha_median" in entry]
    return {"case": "trainer/stage2", "rank": dist.get_rank(),
            "partitions": len(list(optimizer._zero.partitions())),
            "logged_alphas": len(logged),
            "state_cleared": not any(True for _ in optimizer._llaca_params())}


def fp16_optimizer(kind: str) -> dict:
    """What DeepSpeed's fp16 optimizers (GPU only) do to their client, done here: the fused one
    makes the parameters views of one flat buffer and steps one flat fp32 copy per group; the
    unfused one steps an fp32 copy of each parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = llaca_optim.LLaCAAdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    if kind == "flattened":
        flat = _flatten_dense_tensors([p.detach().clone() for p in params])
        for p, view in zip(params, _unflatten_dense_tensors(flat, params)):
            p.data = view.data
        masters = [flat.clone().float().requires_grad_()]
    else:
        masters = [p.detach().clone().float().requires_grad_() for p in params]
    optimizer.param_groups[0]["params"] = masters
    for p in masters:
        p.grad = torch.randn_like(p)
    try:
        optimizer.step()
        error = None
    except RuntimeError as err:
        error = str(err)
    return {"case": f"fp16/{kind}", "rank": dist.get_rank(), "error": error,
            "state_entries": len(optimizer.state)}


def views_of_one_buffer() -> dict:
    """With DeepSpeed imported but no engine: LLaCA(SGD) over parameters that are disjoint views
    of one buffer (as a model that packs its weights keeps them), with a group added through the
    inner optimizer, steps as it does without DeepSpeed."""
    torch.manual_seed(dist.get_rank())
    out = {"case": "views_of_one_buffer", "rank": dist.get_rank()}
    made = {}
    for name in ("here", "twin"):
        torch.manual_seed(7)
        buffer = torch.randn(40)
        params = [torch.nn.Parameter(v) for v in (buffer[:12].view(3, 4), buffer[12:20], buffer[20:40])]
        optimizer = llaca_optim.LLaCA(torch.optim.SGD(params[:2], lr=0.1))
        optimizer.optimizer.add_param_group({"params": params[2:], "lr": 0.05})
        made[name] = (params, optimizer)
    errors = []
    for step in range(4):
        grads = [torch.randn_like(p) for p in made["here"][0]]
        for name, (params, optimizer) in made.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if name == "twin":  # the same steps, as if DeepSpeed were not loaded
                saved = sys.modules.pop("deepspeed")
            try:
                optimizer.step()
            except RuntimeError as err:
                errors.append(str(err))
            finally:
                if name == "twin":
                    sys.modules["deepspeed"] = saved
    (here, opt), (twin, twin_opt) = made["here"], made["twin"]
    out["error"] = errors[0] if errors else None
    out["bitwise"] = not errors and all(
        torch.equal(p, q) and torch.equal(opt.ema(p), twin_opt.ema(q)) for p, q in zip(here, twin))
    return out


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    assert deepspeed.comm.comm.cdb.shm_comm_op is None, "the shm op stub was not used"
    results = [stage0("LLaCAAdamW")]
    results += [run("LLaCAAdamW", stage) for stage in (1, 2, 3)]
    results += [run("LLaCA", 2), run("LLaCAAdamW", 2, bf16=True), run("LLaCAAdamW", 3, bf16=True),
                run("LLaCAAdamW", 1, backend="reference"), run("LLaCAAdamW", 2, offload=True),
                run("LLaCAAdamW", 3, offload=True), run("LLaCAAdamW", 2, norms="mean"),
                run("LLaCAAdamW", 3, norms="mean"), run("LLaCAAdamW", 2, norms="horizon"),
                run("LLaCA", 3, bf16=True, norms="horizon")]
    results += [fp16_optimizer(kind) for kind in ("flattened", "unfused")]
    results.append(views_of_one_buffer())
    results.append(trainer_case())
    sys.stdout.write("RESULTS " + json.dumps(results) + "\n")
    sys.stdout.flush()
    dist.barrier()


if __name__ == "__main__":
    main()
