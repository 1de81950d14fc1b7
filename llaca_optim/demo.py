"""The main job: continual learning on real data, AdamW against LLaCAAdamW.

Trains one MLP on a sequence of tasks built from scikit-learn's handwritten digits (1,797 real
8x8 scans, shipped inside the package, so nothing is downloaded): task k shows the digits through
its own fixed permutation of the 64 pixels ("permuted digits", the classic domain-incremental
benchmark). After each task every task seen so far is evaluated, giving the accuracy matrix R
(R[i][j]: accuracy on task j after training task i), from which, as in the LLaCA paper family:

    Avg.ACC    = mean of the last row of R          (how good the final model is on everything)
    Forgetting = mean over earlier tasks j of max_i R[i][j] - R[T-1][j]
    New.ACC    = mean of the diagonal of R          (how well each new task was learned)

Each method starts every task with a freshly built optimizer state, as the published recipe does
by launching one training run per task; LLaCAAdamW additionally replaces the weights by their
EMA at the end of each task (``end_task``). Run ``python -m llaca_optim demo --help``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Result:
    name: str
    accuracy: list[list[float]]
    step_ms: float
    backend: str

    @property
    def avg_acc(self) -> float:
        return statistics.fmean(self.accuracy[-1])

    @property
    def forgetting(self) -> float:
        t = len(self.accuracy)
        drops = [max(self.accuracy[i][j] for i in range(j, t - 1)) - self.accuracy[-1][j] for j in range(t - 1)]
        return statistics.fmean(drops) if drops else 0.0

    @property
    def new_acc(self) -> float:
        return statistics.fmean(self.accuracy[i][i] for i in range(len(self.accuracy)))


def load_tasks(num_tasks: int, seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise SystemExit(
            "the demo needs scikit-learn (it ships the digits data): pip install 'llaca_optim[demo]'"
        ) from err
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    split = int(0.8 * len(y))
    train_idx, test_idx = order[:split], order[split:]
    tasks = []
    for k in range(num_tasks):
        perm = torch.arange(64) if k == 0 else torch.randperm(64, generator=generator)
        tasks.append(((x[train_idx][:, perm], y[train_idx]), (x[test_idx][:, perm], y[test_idx])))
    return tasks


def make_model(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return float((model(x).argmax(dim=1) == y).float().mean())


def run_method(name, make_optimizer, tasks, args, progress) -> Result:
    model = make_model(args.seed, args.width)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed + 1)
    matrix, step_times, backend = [], [], "torch"
    optimizer = None
    for t, (train, _) in enumerate(tasks):
        if optimizer is None or not hasattr(optimizer, "end_task"):
            optimizer = make_optimizer(model.parameters())  # fresh state per task
        backend = getattr(optimizer, "backend", "torch (fused)")
        x, y = train
        for _ in range(args.steps):
            batch = torch.randint(0, len(y), (args.batch,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            start = time.perf_counter()
            optimizer.step()
            step_times.append(time.perf_counter() - start)
            progress.update(1)
        if hasattr(optimizer, "end_task"):
            optimizer.end_task()  # weights <- EMA, then a fresh optimizer state
        matrix.append([accuracy(model, tasks[j][1]) for j in range(t + 1)])
        progress.set_postfix_str(f"{name}: task {t + 1} avg acc {statistics.fmean(matrix[-1]):.3f}")
    return Result(name, matrix, 1e3 * statistics.median(step_times), str(backend))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's arguments, every one checked before any work: a bad one is a usage error
    (exit 2) naming the flag."""
    parser = argparse.ArgumentParser(prog="python -m llaca_optim demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5, help="number of permuted-digits tasks (>= 3)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per task (>= 1)")
    parser.add_argument("--batch", type=int, default=64, help="examples per step (>= 1)")
    parser.add_argument("--width", type=int, default=512, help="hidden width of the MLP (>= 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (> 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--backend", default="auto", help="LLaCAAdamW backend (auto, cpu, reference)")
    args = parser.parse_args(argv)
    if args.tasks < 3:
        parser.error("--tasks must be at least 3 to measure forgetting meaningfully")
    for flag in ("steps", "batch", "width"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    from .ops.registry import resolve_backend

    try:  # the optimizers' own resolution: an unknown name, or one that cannot run CPU tensors
        resolve_backend(args.backend, "cpu")
    except (RuntimeError, ValueError) as err:
        parser.error(f"--backend {args.backend!r}: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The ``llaca-optim-demo`` command: runs the demo; 0 on success (a usage error exits 2)."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> list[Result]:
    """Runs the demo with the command line's arguments and returns each method's result."""
    args = parse_args(argv)

    from tqdm.auto import tqdm

    import llaca_optim

    tasks = load_tasks(args.tasks, args.seed)
    methods = [
        ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=args.lr, fused=True)),
        ("LLaCAAdamW coin", lambda ps: llaca_optim.LLaCAAdamW(ps, lr=args.lr, preset="coin", backend=args.backend)),
        ("LLaCAAdamW continual-next",
         lambda ps: llaca_optim.LLaCAAdamW(ps, lr=args.lr, preset="continual-next", backend=args.backend)),
    ]
    results = []
    with tqdm(total=len(methods) * args.tasks * args.steps, unit="step", desc="training", mininterval=0.5) as progress:
        for name, make in methods:
            results.append(run_method(name, make, tasks, args, progress))

    params = sum(p.numel() for p in make_model(0, args.width).parameters())
    print(f"\nPermuted digits: {args.tasks} tasks x {args.steps} steps, MLP with {params:,} parameters, "
          f"{torch.get_num_threads()} threads, seed {args.seed}")
    header = f"{'method':<28}{'Avg.ACC':>9}{'Forgetting':>12}{'New.ACC':>9}{'step (ms)':>11}  backend"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<28}{100 * r.avg_acc:>8.1f}%{100 * r.forgetting:>11.1f}%{100 * r.new_acc:>8.1f}%"
              f"{r.step_ms:>11.3f}  {r.backend}")
    print("\nAccuracy matrices (row i: after task i; column j: task j):")
    for r in results:
        print(f"  {r.name}")
        for row in r.accuracy:
            print("    " + " ".join(f"{100 * a:5.1f}" for a in row))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
