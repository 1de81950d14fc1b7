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
    optimizer = llaca_optim.LLaCAAdamW(params, lr=args.lr, weight_decay=0.0, preset="coin",
                                       backend=args.backend)
    scale = optimizer.param_groups[0]["scale"] or 2.0
    rows = {id(p): {"name": names[id(p)], "numel": p.numel(), "R": [], "alpha": [], "fell_back": []}
            for p in params}
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
                row["alpha"].append(alpha)
                row["fell_back"].append(bool(fell))
        optimizer.end_task()
    summary = []
    for row in sorted(rows.values(), key=lambda r: r["numel"]):
        finite = torch.tensor([r for r in row["R"] if math.isfinite(r)], dtype=torch.float64)
        if finite.numel() == 0:
            continue
        q = torch.quantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        summary.append({
            "tensor": row["name"], "numel": row["numel"], "steps": len(row["R"]),
            "R_p10": q[0], "R_median": q[1], "R_p90": q[2],
            "coin_alpha_median": float(torch.tensor(row["alpha"]).median()),
            "coin_fallback_fraction": sum(row["fell_back"]) / len(row["fell_back"]),
            "scale_for_median_alpha_0.1": 0.1 / q[1],
        })
    logs = torch.tensor([[math.log(s["numel"]), math.log(s["R_median"])] for s in summary],
                        dtype=torch.float64)
    x, y = logs[:, 0], logs[:, 1]
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return {"summary": summary, "loglog_slope_R_vs_numel": slope, "scale": scale,
            "config": {k: v for k, v in vars(args).items() if k != "out"} | {"rank": RANK},
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    n = [r["numel"] for r in s]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.errorbar(n, [r["R_median"] for r in s],
                yerr=[[r["R_median"] - r["R_p10"] for r in s], [r["R_p90"] - r["R_median"] for r in s]],
                fmt="o", capsize=3, label="R = (1+|g|) / (|p-ema| |g-g_prev|): median, 10-90%")
    for scale, label in ((2.0, "coin (scale 2)"), (0.01, "continual-next (scale 0.01)")):
        ax.axhline(1.0 / scale, ls="--", lw=1, label=f"{label}: alpha adaptive below this R")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensor size (elements)")
    ax.set_ylabel("R")
    ax.set_title(f"LLaCA's ratio against tensor size (log-log slope {result['loglog_slope_R_vs_numel']:.2f})")
    ax.legend(fontsize=8)
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
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alpha_vs_size.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "alpha_vs_size.png")
    print(f"{'tensor':<16} {'elements':>9} {'R median':>10} {'R p10':>10} {'R p90':>10} "
          f"{'coin alpha':>10} {'coin fallback':>13}")
    for r in result["summary"]:
        print(f"{r['tensor']:<16} {r['numel']:>9} {r['R_median']:>10.3g} {r['R_p10']:>10.3g} "
              f"{r['R_p90']:>10.3g} {r['coin_alpha_median']:>10.3g} {r['coin_fallback_fraction']:>13.2f}")
    print(f"log-log slope of the median R against the size: {result['loglog_slope_R_vs_numel']:.2f}")


if __name__ == "__main__":
    main()
