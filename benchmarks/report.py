"""Rows, ratios and the files a benchmark run writes: JSON, CSV, a markdown table and PNG plots."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import llaca_optim

from .contenders import ADAMW_FUSED, COPY, FOREACH, PUBLISHED, Contender, model_bytes
from .harness import Measurement
from .workloads import Workload

MAIN_FAMILIES = ("lora_llama", "full", "many_tiny")  # docs/spec.md section 5's workloads (not the sweeps)

COLUMNS = [
    "workload", "family", "dtype", "n_tensors", "n_elements", "implementation", "kind", "backend",
    "median_ms", "p10_ms", "p90_ms", "steps_timed", "bytes_model", "model_bytes",
    "bandwidth_GBps", "fraction_of_copy", "x_adamw_fused", "speedup_vs_published",
    "speedup_vs_foreach", "state_bytes", "step_alloc_bytes",
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "llaca_optim": getattr(llaca_optim, "__version__", "unknown")}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "versions": versions,
        "backends": {k: {"available": ok, "detail": why}
                     for k, (ok, why) in llaca_optim.backend_status().items()},
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def rows_for(workload: Workload, dtype: torch.dtype, params: list[torch.Tensor],
             contenders: list[Contender], results: dict[str, Measurement]) -> list[dict[str, Any]]:
    """One row per contender that ran, with ratios to the baselines measured in the same run
    (a contender that failed has no row: ``failures`` lists those)."""
    ran = {name: m for name, m in results.items() if m.error is None}
    med = {name: m.median_s for name, m in ran.items()}
    copy_bw = None
    if COPY in ran:
        copy_bw = model_bytes("llaca", params) / med[COPY] / 1e9
    rows = []
    for c in contenders:
        if c.name not in ran:
            continue
        m = results[c.name]
        nbytes = model_bytes("llaca" if c.bytes_model == "copy" else c.bytes_model, params)
        bandwidth = nbytes / m.median_s / 1e9
        rows.append({
            "workload": workload.name,
            "family": workload.family,
            "dtype": str(dtype).removeprefix("torch."),
            "n_tensors": workload.n_tensors,
            "n_elements": workload.n_elements,
            "implementation": c.name,
            "kind": c.kind,
            "backend": c.backend,
            "median_ms": 1e3 * m.median_s,
            "p10_ms": 1e3 * m.quantile_s(0.1),
            "p90_ms": 1e3 * m.quantile_s(0.9),
            "steps_timed": len(m.times_s),
            "bytes_model": c.bytes_model,
            "model_bytes": nbytes,
            "bandwidth_GBps": bandwidth,
            "fraction_of_copy": bandwidth / copy_bw if copy_bw else None,
            "x_adamw_fused": m.median_s / med[ADAMW_FUSED] if ADAMW_FUSED in med else None,
            "speedup_vs_published": med[PUBLISHED] / m.median_s if PUBLISHED in med else None,
            "speedup_vs_foreach": med[FOREACH] / m.median_s if FOREACH in med else None,
            "state_bytes": m.state_bytes,
            "step_alloc_bytes": m.step_alloc_bytes,
        })
    return rows


def label(workload: Workload, dtype: torch.dtype) -> str:
    """One measurement's name, as results.json lists measurements left out or failed."""
    return f"{workload.name} {str(dtype).removeprefix('torch.')}"


def failures(workload: Workload, dtype: torch.dtype,
             results: dict[str, Measurement]) -> dict[str, str]:
    """``"<workload> <dtype> <contender>" -> why`` for the contenders that could not run."""
    what = label(workload, dtype)
    return {f"{what} {name}": m.error for name, m in results.items() if m.error is not None}


def note_failures(env: dict[str, Any], workload: Workload, dtype: torch.dtype,
                  results: dict[str, Measurement]) -> None:
    """Records the contenders that could not run in ``env["failed"]`` and says so on stderr."""
    failed = failures(workload, dtype, results)
    if failed:
        env.setdefault("failed", {}).update(failed)
        for what, why in failed.items():
            print(f"FAILED {what}: {why}", file=sys.stderr, flush=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], families: tuple[str, ...]) -> str:
    lines = [
        f"Device: **{env['device']}**; torch {env['versions']['torch']}; {env['date']}",
        f"Command: `{env['command']}`",
        "",
        "Medians over interleaved steps (CPU) or CUDA events (GPU). Bandwidth is docs/spec.md section 5's "
        "bytes model over the median time (7 accesses for AdamW alone, 11 for an AdamW+LLaCA step); "
        "`copy` is a device-to-device copy of the LLaCA step's bytes. Ratios are to the baselines "
        "of the same run.",
        "",
    ]
    header = ("| workload | dtype | implementation | median ms (p10–p90) | GB/s | of copy "
              "| × AdamW(fused) | vs published | vs foreach | state MiB | step alloc MiB |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if r["family"] not in families:
            continue
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['implementation']} "
            f"| {_fmt(r['median_ms'], 3)} ({_fmt(r['p10_ms'], 3)}–{_fmt(r['p90_ms'], 3)}) "
            f"| {_fmt(r['bandwidth_GBps'], 1)} | {_fmt(r['fraction_of_copy'])} "
            f"| {_fmt(r['x_adamw_fused'])} | {_fmt(r['speedup_vs_published'], 1)} "
            f"| {_fmt(r['speedup_vs_foreach'])} | {_mib(r['state_bytes'])} "
            f"| {_mib(r['step_alloc_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def brief(env: dict[str, Any], rows: list[dict[str, Any]], families: tuple[str, ...]) -> str:
    """A few lines per measurement for a terminal (a remote run's log is often read only at its
    end): the copy bandwidth, then each of our rows' docs/spec.md section 5 ratios."""
    lines = [f"{env['device']}, torch {env['versions']['torch']}: of copy, x AdamW(fused), "
             "speedup vs published loop, vs foreach"]
    for r in rows:
        if r["family"] not in families:
            continue
        what = f"{r['workload']} {r['dtype']}"
        if r["implementation"] == COPY:
            lines.append(f"{what}: copy {_fmt(r['bandwidth_GBps'], 0)} GB/s")
        elif r["kind"] == "ours":
            lines.append(
                f"  {r['implementation']}: {_fmt(r['median_ms'], 3)} ms, "
                f"{_fmt(r['fraction_of_copy'])} of copy, x{_fmt(r['x_adamw_fused'])}, "
                f"{_fmt(r['speedup_vs_published'], 1)}x, {_fmt(r['speedup_vs_foreach'], 1)}x")
    for what, why in (env.get("failed") or {}).items():
        lines.append(f"FAILED {what}: {why}")
    left_out = env.get("not_measured") or []
    if left_out:
        shown = ", ".join(left_out[:3]) + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else "")
        lines.append(f"not measured (time limit): {shown}")
    for t in targets(env, rows):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"target {t['column']} {t['target']}, {t['workload']} {t['dtype']} "
                     f"{t['implementation']}: {_fmt(t['measured'])} {verdict}")
    return "\n".join(lines) + "\n"


# docs/spec.md section 5's targets: (device type, workload family, backends, our row's suffix, column,
# "min" or "max", bound). The LoRA bandwidth target is graph-replayed (" graph" rows); the others
# are eager steps. Each is read per dtype: docs/spec.md asks for fp32 and bf16 alike.
TARGETS = [
    ("cuda", "lora_llama", ("cuda", "triton"), " graph", "fraction_of_copy", "min", 0.65),
    ("cuda", "full", ("cuda",), "", "fraction_of_copy", "min", 0.85),
    ("cuda", "full", ("triton",), "", "fraction_of_copy", "min", 0.80),
    ("cuda", "full", ("cuda", "triton"), "", "x_adamw_fused", "max", 1.7),
    ("cuda", "lora_llama", ("cuda", "triton"), "", "speedup_vs_published", "min", 30.0),
    ("cuda", "full", ("cuda", "triton"), "", "speedup_vs_published", "min", 2.0),
    ("cuda", "lora_llama", ("cuda", "triton"), "", "speedup_vs_foreach", "min", 3.0),
    ("cuda", "full", ("cuda", "triton"), "", "speedup_vs_foreach", "min", 1.6),
    ("cpu", "lora_llama", ("cpu",), "", "x_adamw_fused", "max", 2.0),
    ("cpu", "full", ("cpu",), "", "x_adamw_fused", "max", 2.0),
    ("cpu", "lora_llama", ("cpu",), "", "speedup_vs_published", "min", 8.0),
]


def targets(env: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each docs/spec.md section 5 target that this run's rows can answer: what was measured, the
    bound, and whether it was met. A target whose row is missing (a backend not available, a
    workload cut by --time-limit) is listed as not measured, never as met."""
    out = []
    for device_type, family, backends, suffix, column, sense, bound in TARGETS:
        if env.get("device_type") != device_type:
            continue
        for backend in backends:
            name = f"LLaCAAdamW[{backend}]{suffix}"
            for dtype in ("float32", "bfloat16"):
                found = [r for r in rows if r["family"] == family and r["dtype"] == dtype
                         and r["implementation"] == name and r[column] is not None]
                value = found[0][column] if found else None
                met = None if value is None else (value >= bound if sense == "min" else value <= bound)
                out.append({"workload": found[0]["workload"] if found else family, "dtype": dtype,
                            "implementation": name, "column": column,
                            "target": f"{'>=' if sense == 'min' else '<='} {bound:g}",
                            "measured": value, "met": met})
    return out


def targets_markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["| target | workload | dtype | implementation | measured | met |", "|---|---|---|---|---|---|"]
    for t in targets(env, rows):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['column']} {t['target']} | {t['workload']} | {t['dtype']} "
                     f"| {t['implementation']} | {_fmt(t['measured'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], family: str, x_key: str, x_label: str, title: str,
         path: Path) -> bool:
    """Median step time against ``x_key``, one line per implementation and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r["family"] == family]
    if not selected:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    impls = list(dict.fromkeys(r["implementation"] for r in selected))
    colors = plt.get_cmap("tab10")
    for dtype, style in (("float32", "-"), ("bfloat16", "--"), ("float16", ":")):
        for k, impl in enumerate(impls):  # one colour per implementation, one style per dtype
            pts = sorted((r[x_key], r["median_ms"]) for r in selected
                         if r["implementation"] == impl and r["dtype"] == dtype)
            if pts:
                ax.plot(*zip(*pts), style, color=colors(k % 10), marker="o", ms=3,
                        label=f"{impl} {dtype}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("median step time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_json(out_dir: Path, env: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """results.json alone: the run writes it after every measurement, so a run stopped from
    outside (a time limit on a GPU machine) still leaves everything it measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "columns": COLUMNS, "rows": rows}, indent=1))
    tmp.replace(path)  # never a half-written file, whenever the run is stopped
    return path


def write_all(out_dir: Path, env: dict[str, Any], rows: list[dict[str, Any]],
              json_too: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir, env, rows)] if json_too else []
    path = out_dir / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    written.append(path)
    path = out_dir / "results.md"
    path.write_text(markdown(env, rows, MAIN_FAMILIES) + "\ndocs/spec.md section 5 targets, as this run "
                    "measured them:\n\n" + targets_markdown(env, rows))
    written.append(path)
    dev = env["device"]
    for family, x_key, x_label, name in (
        ("tensors_sweep", "n_tensors", "number of 1024-element tensors", "time_vs_tensors.png"),
        ("size_sweep", "n_elements", "elements in one tensor", "time_vs_size.png"),
    ):
        if plot(rows, family, x_key, x_label, f"optimizer step, {dev} ({env['date'][:10]})",
                out_dir / name):
            written.append(out_dir / name)
    return written
