"""LLaCA's balance weight against tensor size: ``python -m benchmarks.continual.alpha_size``.

``alpha = scale * (1 + |g|_1) / (|p - ema|_1 * |g - g_prev|_1)`` is not invariant to a tensor's
number of elements n: each L1 sum grows about as n, so the ratio ``R = (1 + b) / (a c)`` falls
about as 1/n, and whether ``scale * R`` lands in (0, 1), or falls back to ``base_weight``, depends
on n. This measures R over training for tensors from 16 elements (the tiny models of this
suite) to 524,288 (a LoRA factor of a 4096-wide layer at rank 128, the published recipe's; see
docs/coin-recipe.md), all in one model trained with LLaCAAdamW (``coin`` preset, the recipe's
LoRA learning rate 2e-4, no weight decay) on two regression tasks in sequence:

* LoRA sites: a frozen random ``w x w`` layer with a rank-128 adapter (A: 128 x w, B: w x 128,
  B starting at zero, as peft does), w in 512 .. 4096;
* full fine-tuning sites: a trainable ``w x w`` layer and its bias, w in 16 .. 128;

each learning to match a teacher that adds a random rank-8 change to the frozen layer, a new one
per task. At every step R is computed for every tensor from the state before the step and the
stepped parameter (``llaca_optim.reference.llaca_sums``), and the alpha the optimizer used is
read from ``optimizer.alphas()``. Writes ``alpha_vs_size.json`` and ``alpha_vs_size.png`` into
``--out`` (default benchmarks/results/continual/alpha-size/) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch
from torch import nn

import llaca_optim
from llaca_optim.reference import llaca_sums

RESULTS = Path(__file__).resolve().parents[1] / "results" / "continual" / "alpha-size"
RANK = 128


class LoRASite(nn.Module):
    def __init__(self, width: int, rank: int, g: torch.Generator) -> None:
        super().__init__()
        self.base = torch.randn(width, width, generator=g) / math.sqrt(width)  # frozen
        self.lora_A = nn.Parameter(torch.randn(rank, width, generator=g) / math.sqrt(width))
        self.lora_B = nn.Parameter(torch.zeros(width, rank))
        self.scaling = 2.0  # lora_alpha / r, as the recipe's 256 / 128

    def forward(self, x):
        return x @ self.base.T + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


class FullSite(nn.Module):
    def __init__(self, width: int, g: torch.Generator) -> None:
        super().__init__()
        self.base = torch.randn(width, width, generator=g) / math.sqrt(width)
        self.layer = nn.Linear(width, width)
        with torch.no_grad():
            self.layer.weight.copy_(self.base)
            self.layer.bias.zero_()

    def forward(self, x):
        return self.layer(x)


def teacher(site: nn.Module, g: torch.Generator) -> torch.Tensor:
    width = site.base.shape[0]
    u, v = torch.randn(width, 8, generator=g), torch.randn(8, width, generator=g)
    return site.base + 0.5 * (u @ v) / math.sqrt(8 * width)


def run(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    sites = nn.ModuleList([LoRASite(w, RANK, g) for w in args.lora_widths]
                          + [FullSite(w, g) for w in args.full_widths])
    params = [p for p in sites.parameters() if p.requires_grad]
    names = {id(p): n for n, p in sites.named_parameters()}
    optimizer = llaca_optim.LLaCAAdamW(params, lr=args.lr, weight_decay=0.0, preset=args.preset,
                                       backend=args.backend)
    rows = {id(p): {"name": names[id(p)], "numel": p.numel(), "R": [], "R_mean": [], "alpha": [],
                    "fell_back": []} for p in params}
    for task in range(args.tasks):
        targets = [teacher(site, g) for site in sites]
        for _ in range(args.steps):
            loss = sum(nn.functional.mse_loss(site(x), x @ t.T)
                       for site, t in zip(sites, targets)
                       for x in [torch.randn(args.batch, site.base.shape[0], generator=g)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.flush_ema()
            before = {id(p): (optimizer.state[p]["ema"].clone(), optimizer.state[p]["prev_grad"].clone())
                      for p in params if "ema" in optimizer.state.get(p, {})}
            optimizer.step()
            found = optimizer.alphas()
            for p, alpha, fell in zip(found.params, found.alphas.tolist(), found.fell_back.tolist()):
                if id(p) not in before:
                    continue  # its first LLaCA step: no EMA yet, so no ratio
                ema, prev = before[id(p)]
                a, b, c = llaca_sums(p, p.grad, ema, prev)
                row = rows[id(p)]
                row["R"].append((1.0 + b) / (a * c) if a * c > 0 else math.inf)
                n = p.numel()  # the same ratio of the L1 means (norms="mean")
                row["R_mean"].append((1.0 + b / n) / ((a / n) * (c / n)) if a * c > 0 else math.inf)
                row["alpha"].append(alpha)
                row["fell_back"].append(bool(fell))
        optimizer.end_task()
    summary = []
    for row in sorted(rows.values(), key=lambda r: r["numel"]):
        if not any(math.isfinite(r) for r in row["R"]):
            continue
        entry = {"tensor": row["name"], "numel": row["numel"], "steps": len(row["R"])}
        for key in ("R", "R_mean"):
            finite = torch.tensor([r for r in row[key] if math.isfinite(r)], dtype=torch.float64)
            q = torch.quantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            entry |= {f"{key}_p10": q[0], f"{key}_median": q[1], f"{key}_p90": q[2]}
        entry |= {
            "alpha_median": float(torch.tensor(row["alpha"]).median()),
            "fallback_fraction": sum(row["fell_back"]) / len(row["fell_back"]),
            "scale_for_median_alpha_0.1": 0.1 / entry["R_median"],
        }
        summary.append(entry)
    # The mean-norms scale that gives a tensor of the recipe's size (the largest LoRA factor)
    # the median alpha the published sums give it with coin's scale 2.0: the calibration of the
    # coin-mean preset (llaca_optim/presets.py).
    largest = max(summary, key=lambda r: r["numel"])
    return {"summary": summary, "preset": args.preset,
            "loglog_slope_R_vs_numel": _slope(summary, "R_median"),
            "loglog_slope_R_mean_vs_numel": _slope(summary, "R_mean_median"),
            "coin_mean_scale": 2.0 * largest["R_median"] / largest["R_mean_median"],
            "config": {k: v for k, v in vars(args).items() if k != "out"} | {"rank": RANK},
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def _slope(summary: list[dict], key: str) -> float:
    """Least-squares slope of log(key) against log(numel)."""
    logs = torch.tensor([[math.log(s["numel"]), math.log(s[key])] for s in summary],
                        dtype=torch.float64)
    x, y = logs[:, 0], logs[:, 1]
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llaca_optim.presets import PRESETS

    s = result["summary"]
    n = [r["numel"] for r in s]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        ("R", "R = (1+|g|) / (|p-ema| |g-g_prev|), L1 sums", "coin", "continual-next"),
        ("R_mean", "R_mean = (1+mean|g|) / (mean|p-ema| mean|g-g_prev|), L1 means", "coin-mean", None),
    )
    for ax, (key, label, *presets) in zip(axes, panels):
        ax.errorbar(n, [r[f"{key}_median"] for r in s],
                    yerr=[[r[f"{key}_median"] - r[f"{key}_p10"] for r in s],
                          [r[f"{key}_p90"] - r[f"{key}_median"] for r in s]],
                    fmt="o", capsize=3, label=f"{label}: median, 10-90%")
        for name in (p for p in presets if p in PRESETS):
            ax.axhline(1.0 / PRESETS[name].scale, ls="--", lw=1,
                       label=f"{name} (scale {PRESETS[name].scale:g}): alpha adaptive below")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tensor size (elements)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} against tensor size (log-log slope "
                     f"{result[f'loglog_slope_{key}_vs_numel']:.2f})")
        ax.legend(fontsize=7)
    fig.suptitle(f"LLaCA's balance ratio against tensor size (trained with {result['preset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.continual.alpha_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora-widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--full-widths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--steps", type=int, default=150, help="steps per task")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--preset", default="coin", help="the preset the model is trained with")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "continual" / "alpha-size",
                   help=f"results folder (default: bench-results/continual/alpha-size/; name "
                        f"{RESULTS.relative_to(RESULTS.parents[2])} to update the committed results)")
    args = p.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "alpha_vs_size" if args.preset == "coin" else f"alpha_vs_size_{args.preset}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{stem}.png")
    print(f"trained with {args.preset}")
    print(f"{'tensor':<16} {'elements':>9} {'R median':>10} {'R p10':>10} {'R p90':>10} "
          f"{'R_mean median':>13} {'alpha':>10} {'fallback':>8}")
    for r in result["summary"]:
        print(f"{r['tensor']:<16} {r['numel']:>9} {r['R_median']:>10.3g} {r['R_p10']:>10.3g} "
              f"{r['R_p90']:>10.3g} {r['R_mean_median']:>13.3g} {r['alpha_median']:>10.3g} "
              f"{r['fallback_fraction']:>8.2f}")
    print(f"log-log slope of the median R against the size: {result['loglog_slope_R_vs_numel']:.2f}, "
          f"of the median R_mean: {result['loglog_slope_R_mean_vs_numel']:.2f}")
    print(f"mean-norms scale matching coin's median alpha at {result['summary'][-1]['numel']} "
          f"elements: {result['coin_mean_scale']:.3g}")


if __name__ == "__main__":
    main()
