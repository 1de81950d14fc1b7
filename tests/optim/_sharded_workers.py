"""What each rank of tests/optim/test_sharded.py runs, in processes of their own (gloo on the CPU).

Every rank builds the same problem from the same seed: parameters of awkward shapes (odd row
counts, so shards are uneven; a one-row tensor, so one rank's shard is empty; tensors over the
CPU kernel's whole-tensor limit and over several emulated CUDA chunks) and a gradient sequence.
The parameters are sharded by rows (``Shard(0)``, FSDP2's layout) and trained; rank 0 returns
every parameter and state tensor gathered whole, to be compared with an unsharded run.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llaca_optim.ops.roles import LLACA_STATE_KEYS, SAVED_STATE_KEYS as STATE_KEYS

SHAPES = [(7, 5), (13,), (3, 1, 4), (1, 9), (2,), (301, 33), (2**18 + 4099,)]
SMALL_SHAPES = SHAPES[:-1]  # Triton's interpreter is slow on the large one


def make_problem(seed: int, steps: int, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                 overflow_at: int | None = None) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Base parameter values and a gradient sequence, the same in every process for a seed."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    grads = []
    for step in range(steps):
        level = 0.3 + 1.7 * torch.rand((), generator=gen)
        row = [(torch.randn(shape, generator=gen) * level).to(dtype) for shape in shapes]
        if step == overflow_at:
            row[0].view(-1)[0] = float("inf")
        grads.append(row)
    return base, grads


def resolve_backend(name: str) -> Any:
    if name == "cuda_sim":
        from support.cuda_sim import emulated_cuda_backend

        return emulated_cuda_backend()
    return name


def build_optimizer(params: list[nn.Parameter], config: dict[str, Any]):
    from llaca_optim import LLaCA, LLaCAAdamW

    backend = resolve_backend(config["backend"])
    knobs = dict(scale=config["scale"], base_weight=0.01, norms=config.get("norms", "sum"),
                 backend=backend)
    if config.get("horizon"):  # the level is the horizon's (NOTE [horizon] in optim/sharded.py)
        knobs = dict(horizon=config["horizon"], backend=backend)
    if config.get("wrapper"):
        inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        return LLaCA(inner, **knobs)
    return LLaCAAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=config.get("amsgrad", False),
                      defer_blend=config.get("defer_blend", True), **knobs)


def gathered(optimizer, params, whole) -> dict[str, list[torch.Tensor]]:
    """Every parameter and state tensor after a flush, DTensors gathered whole (``whole``)."""
    optimizer.flush_ema()
    inner = getattr(optimizer, "optimizer", optimizer)
    out: dict[str, list[torch.Tensor]] = {"param": [whole(p).detach().clone() for p in params]}
    for key in STATE_KEYS:
        owner = optimizer.state if key in LLACA_STATE_KEYS else inner.state
        values = [whole(owner[p][key]).detach().clone() for p in params if key in owner.get(p, {})]
        if values:
            out[key] = values
    return out


def train(config: dict[str, Any], shard) -> dict[str, list[torch.Tensor]]:
    """One trajectory; ``shard`` turns a full tensor into the parameter or gradient to use."""
    shapes = SMALL_SHAPES if config["backend"] == "triton" else SHAPES
    base, grads = make_problem(config["seed"], config["steps"], shapes, config["dtype"],
                               config.get("overflow_at"))
    device = config.get("device", "cpu")
    params = [nn.Parameter(shard(b.to(device))) for b in base]
    optimizer = build_optimizer(params, config)
    for step, row in enumerate(grads):
        for p, g in zip(params, row):
            p.grad = shard(g.to(device, copy=True))
        if step == config.get("overflow_at"):
            # What GradScaler hands an optimizer with _step_supports_amp_scaling.
            optimizer.grad_scale = torch.ones((), device=device)
            optimizer.found_inf = torch.ones((), device=device)
        optimizer.step()
        for name in ("grad_scale", "found_inf"):
            if hasattr(optimizer, name):
                delattr(optimizer, name)
    return gathered(optimizer, params,
                    lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu())


def unsharded(config: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    return train(config, lambda t: t)


def mlp(seed: int, mesh=None) -> nn.Module:
    """The small model of the FSDP tests, the same weights for a seed; ``fully_shard`` on
    ``mesh`` when one is given (a CPU mesh: without one FSDP picks the GPU if any)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 5))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    return model


def fsdp_model_run(seed: int, steps: int, sharded: bool, backend: str, mesh=None):
    """A small MLP trained with FSDP2 (``fully_shard``) or without, on the same batches (every rank
    sees the same batch, so FSDP's averaged gradient equals the unsharded one)."""
    from llaca_optim import LLaCAAdamW

    model = mlp(seed, mesh if sharded else None)
    # scale 0.5 puts this small model's alphas in (0, 1) after the first steps (adaptive branch).
    optimizer = LLaCAAdamW(model.parameters(), lr=3e-2, scale=0.5, backend=resolve_backend(backend))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(12, 16, generator=gen)
        y = torch.randn(12, 5, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = list(model.parameters())
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    out = gathered(optimizer, params, whole)
    # The task API on DTensors: evaluate with the EMA swapped in, then end the task.
    with optimizer.ema_weights():
        out["weights_in_ema_weights"] = [whole(p).detach().clone() for p in params]
    out["weights_after_ema_weights"] = [whole(p).detach().clone() for p in params]
    optimizer.end_task()
    out["weights_after_end_task"] = [whole(p).detach().clone() for p in params]
    return out


def checkpoint_resume(seed: int, steps: int, out_dir: str, mesh) -> list[torch.Tensor]:
    """Trains a fully_shard model for ``steps`` steps, saves model and optimizer with
    torch.distributed.checkpoint, trains ``steps`` more; then builds both anew, loads the
    checkpoint and trains the same ``steps`` more. Returns the two final weights and EMAs,
    gathered (first run's, then the resumed run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from llaca_optim import LLaCAAdamW

    def build():
        model = mlp(seed, mesh)
        return model, LLaCAAdamW(model.parameters(), lr=3e-2, scale=0.5, backend="cpu")

    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(12, 16, generator=gen), torch.randn(12, 5, generator=gen))
               for _ in range(2 * steps)]

    def train(model, optimizer, part):
        for x, y in part:
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    def final(model, optimizer):
        optimizer.flush_ema()
        params = list(model.parameters())
        return [p.full_tensor() for p in params] + [optimizer.state[p]["ema"].full_tensor() for p in params]

    path = os.path.join(out_dir, f"checkpoint-{seed}")
    model, optimizer = build()
    train(model, optimizer, batches[:steps])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    train(model, optimizer, batches[steps:])
    straight = final(model, optimizer)

    model, optimizer = build()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(model, optimizer, batches[steps:])
    return straight + final(model, optimizer)


def load_plain_state_dict(seed: int, mesh) -> tuple[str, bool]:
    """Loads the state dict of an unsharded twin into the optimizer of a fully_shard model:
    returns the error message and whether the optimizer's state was left unchanged."""
    from llaca_optim import LLaCAAdamW

    runs = []
    for sharded in (True, False):
        model = mlp(seed, mesh if sharded else None)
        optimizer = LLaCAAdamW(model.parameters(), lr=1e-2, backend="cpu")
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        runs.append((model, optimizer))
    (model, optimizer), (_, twin) = runs
    before = [optimizer.state[p]["ema"].full_tensor().clone() for p in model.parameters()]
    try:
        optimizer.load_state_dict(twin.state_dict())
        message = ""
    except ValueError as err:
        message = str(err)
    after = [optimizer.state[p]["ema"].full_tensor() for p in model.parameters()]
    return message, all(torch.equal(a, b) for a, b in zip(after, before))


def rank_main(rank: int, world: int, store_path: str, out_dir: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of each spawned rank: runs every job and saves rank 0's results."""
    # A rank that dies in C++ (an abort, a segfault) then prints every thread's Python stack to
    # its stderr, which the test's report captures; otherwise it only says "signal SIGABRT".
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    # The ranks talk over loopback: without this, gloo binds to the address the host name
    # resolves to, which a sandboxed CI machine may not have.
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(store_path, world)
    # GPU jobs (one rank: one GPU) reduce over NCCL, the others over gloo.
    gpu = any(job.get("device") == "cuda" for job in jobs)
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", store=store, rank=rank,
                            world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        meshes = {"cpu": init_device_mesh("cpu", (world,))}
        if gpu:
            meshes["cuda"] = init_device_mesh("cuda", (world,))
        mesh = meshes["cpu"]
        results = []
        for job in jobs:
            if job["kind"] == "trajectory":
                on = meshes[job.get("device", "cpu")]
                placement = Replicate() if job.get("replicated") else Shard(0)
                results.append(train(job, lambda t: distribute_tensor(t, on, [placement])))
            elif job["kind"] == "plain_state_dict":
                results.append(load_plain_state_dict(job["seed"], mesh))
            elif job["kind"] == "checkpoint":
                results.append(checkpoint_resume(job["seed"], job["steps"], out_dir, mesh))
            else:
                results.append(fsdp_model_run(job["seed"], job["steps"], True, job["backend"], mesh))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        # No rank tears its connections down while another still talks over them.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A spawned process ends with sys.exit, so the interpreter's teardown would then free what
    # still holds the gloo group (device meshes, DTensor and FSDP caches) in no set order, while
    # gloo's C++ threads run (pytorch/pytorch PR 179291 describes this race). A CI machine saw
    # a rank abort with no Python error ("terminate called without an active exception",
    # signal SIGABRT), which matches it; it did not happen here. Everything is saved and the
    # group is destroyed by now, so the rank leaves without that teardown. An exception above skips this and
    # reaches torch.multiprocessing, which reports its traceback to the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
