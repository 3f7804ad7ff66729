"""The planner's predictions against published measured runs, out of sample.

Reads benchmarks/data/published_runs.toml (each row: a public table's measured tokens/s per GPU or
step time, and peak memory where given, with the configuration it was measured on and its URL),
builds for each run a pool (its chips, nodes of `gpus_per_node`, the inter-node bandwidth) and the
plan it ran (FSDP over all GPUs, or tensor x pipeline x data parallel), and compares
chipfuse.plan.cost.predict's step time and plan.memory's peak with the measured figures.

The runs are split in two halves, alternating by id within each source: the calibration half, on
which `--fit` chooses the kernel model's few global parameters (plan.kernels.Calibration: GEMM
efficiency, GEMM fill, attention rate, per-layer overhead) and writes them with the held-out
errors to src/chipfuse/plan/calibration.toml; and the held-out half, on which the errors are
reported. Nothing is fitted per run or per chip.

Prints and writes (--json): `time_mape_heldout`, `memory_mape_heldout`, `spearman_heldout` (rank
correlation of predicted and measured tokens/s per GPU), the same per source, the calibration
half's errors, and every run's figures. Pure arithmetic: runs in seconds, no device.

    .venv/bin/python benchmarks/prediction.py [--fit] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import tomllib

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.cost import predict
from chipfuse.plan.kernels import Calibration, default_calibration, set_calibration
from chipfuse.plan.memory import reserved_bytes
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.report.output import console, table, write_json

DATA = Path(__file__).parent / "data" / "published_runs.toml"
CALIBRATION = Path(__file__).parents[1] / "src" / "chipfuse" / "plan" / "calibration.toml"
GiB = 1024**3
FIT = {  # parameter -> candidate values (coordinate descent over these)
    "gemm_eff_tc": [0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9],
    "mn_half": [256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0],
    "attn_eff": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    "layer_overhead_s": [0.0, 20e-6, 60e-6, 150e-6, 300e-6, 600e-6, 1e-3],
}


def load_runs(path: Path = DATA) -> tuple[list[dict], list[dict]]:
    raw = tomllib.loads(path.read_text())
    chips = [{"name": k, **v} for k, v in raw.get("chip", {}).items()]
    return [r for r in raw["run"] if "excluded" not in r], chips


def excluded_runs(path: Path = DATA) -> list[dict]:
    """Runs kept in the data with the reason they are not scored."""
    return [{"id": r["id"], "why": r["excluded"]} for r in tomllib.loads(path.read_text())["run"] if "excluded" in r]


def split(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(calibration, held out): alternate by id within each source, so each source is in both."""
    cal, held = [], []
    for _, group in itertools.groupby(sorted(runs, key=lambda r: (r["source"], r["id"])), key=lambda r: r["source"]):
        for i, r in enumerate(group):
            (cal if i % 2 == 0 else held).append(r)
    return cal, held


def build(run: dict, chips: list[dict]) -> tuple[Any, Plan]:
    n, per = run["gpus"], run["gpus_per_node"]
    nodes = []
    for k in range(math.ceil(n / per)):
        count = min(per, n - k * per)
        nodes.append({"name": f"node{k}", "device": [{"name": f"n{k}g", "chip": run["chip"], "count": count}]})
    pool = pool_from_dict({"name": run["id"], "chip": chips, "node": nodes,
                           "default_link": {"bandwidth_gbit_s": run["inter_node_gbit_s_per_gpu"], "latency_ms": 0.005}},
                          source=str(DATA))
    names = [d.name for d in pool.devices]
    m = run["model"]
    spec = ModelSpec(name=run["id"], seq_len=run["seq_len"], **m)
    tp, pp = run.get("tp", 1), run.get("pp", 1)
    gb, mb = run["global_batch"], run["micro_batch"]
    L = spec.num_layers
    if run["shard"] == "full":
        replicas = (Replica(stages=(Stage(devices=tuple(names), first_layer=0, num_layers=L, shard="full",
                                          checkpoint=run["checkpoint"]),),
                            batch_share=gb, micro_batch_size=mb * n),)
    else:
        dp = n // (tp * pp)
        base, extra = divmod(L, pp)
        reps = []
        for r in range(dp):
            first, stages = 0, []
            for i in range(pp):
                k = base + (1 if i < extra else 0)
                devs = tuple(names[(r * pp + i) * tp:(r * pp + i + 1) * tp])
                stages.append(Stage(devices=devs, first_layer=first, num_layers=k, tp_degree=tp,
                                    checkpoint=run["checkpoint"]))
                first += k
            reps.append(Replica(stages=tuple(stages), batch_share=gb // dp, micro_batch_size=mb))
        replicas = tuple(reps)
    plan = Plan(model=spec, global_batch=gb, seq_len=run["seq_len"], replicas=replicas, dtype=run["dtype"],
                optimizer_dtype=run.get("optimizer_dtype", "fp32"), strategy="manual", pool=run["id"])
    return pool, plan


def measured_step_s(run: dict) -> float:
    if "step_s" in run:
        return float(run["step_s"])
    return run["global_batch"] * run["seq_len"] / (run["tokens_per_s_per_gpu"] * run["gpus"])


def evaluate(runs: list[dict], chips: list[dict]) -> list[dict]:
    out = []
    for run in runs:
        pool, plan = build(run, chips)
        pred = predict(plan, pool)
        step = measured_step_s(run)
        tokens = run["global_batch"] * run["seq_len"]
        row = {"id": run["id"], "source": run["source"], "url": run["url"], "measured_step_s": step,
               "predicted_step_s": pred.step_s, "time_error": pred.step_s / step - 1,
               "measured_tokens_per_s_per_gpu": tokens / step / run["gpus"],
               "predicted_tokens_per_s_per_gpu": tokens / pred.step_s / run["gpus"]}
        if "memory_gib" in run and run.get("memory_comparable", True):
            peak = max(pred.memory_bytes.values())
            row.update(measured_memory_gib=run["memory_gib"], predicted_memory_gib=reserved_bytes(peak) / GiB,
                       memory_error=reserved_bytes(peak) / GiB / run["memory_gib"] - 1)
        out.append(row)
    return out


def mape(xs: list[float]) -> float | None:
    return sum(abs(x) for x in xs) / len(xs) if xs else None


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else None


def summary(rows: list[dict]) -> dict[str, Any]:
    return {"time_mape": mape([r["time_error"] for r in rows]),
            "memory_mape": mape([r["memory_error"] for r in rows if "memory_error" in r]),
            "spearman": spearman([r["predicted_tokens_per_s_per_gpu"] for r in rows],
                                 [r["measured_tokens_per_s_per_gpu"] for r in rows]),
            "runs": len(rows), "runs_with_memory": sum(1 for r in rows if "memory_error" in r)}


def fit(cal_runs: list[dict], chips: list[dict], start: Calibration) -> Calibration:
    """Coordinate descent over FIT's grids, minimising the calibration half's time MAPE."""
    best = start

    def score(c: Calibration) -> float:
        set_calibration(c)
        return mape([r["time_error"] for r in evaluate(cal_runs, chips)]) or 0.0

    best_s = score(best)
    for _ in range(3):
        improved = False
        for name, values in FIT.items():
            for v in values:
                cand = replace(best, **{name: v})
                s = score(cand)
                if s < best_s - 1e-9:
                    best, best_s, improved = cand, s, True
        if not improved:
            break
    set_calibration(None)
    return best


def write_calibration(cal: Calibration, held: dict[str, Any], cal_half: dict[str, Any], n_runs: int) -> None:
    lines = ["# Kernel-model parameters fitted by `benchmarks/prediction.py --fit` on the calibration half of",
             "# benchmarks/data/published_runs.toml, and the errors measured on the held-out half (the expected",
             "# error band `chipfuse plan` prints). Regenerate with that command; do not edit by hand.",
             "", "[parameters]"]
    lines += [f"{k} = {v!r}" for k, v in cal.to_dict().items()]
    lines += ["", "[error]", f"runs = {n_runs}"]
    for k in ("time_mape", "memory_mape", "spearman"):
        if held[k] is not None:
            lines.append(f"{k}_heldout = {held[k]:.4f}")
        if cal_half[k] is not None:
            lines.append(f"{k}_calibration = {cal_half[k]:.4f}")
    lines.append('command = "benchmarks/prediction.py --fit"')
    CALIBRATION.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="fit the global parameters on the calibration half and "
                    "write src/chipfuse/plan/calibration.toml")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    runs, chips = load_runs()
    cal_runs, held_runs = split(runs)
    set_calibration(Calibration())
    before = summary(evaluate(held_runs, chips))  # the kernel model's defaults, before any fit
    set_calibration(None)
    cal = default_calibration()
    if args.fit:
        cal = fit(cal_runs, chips, Calibration())
    set_calibration(cal)
    held_rows, cal_rows = evaluate(held_runs, chips), evaluate(cal_runs, chips)
    set_calibration(None)
    held, cal_half = summary(held_rows), summary(cal_rows)
    if args.fit:
        write_calibration(cal, held, cal_half, len(runs))
    per_source = {}
    for src in sorted({r["source"] for r in runs}):
        s = summary([r for r in held_rows if r["source"] == src])
        per_source[src] = {"time_mape_heldout": s["time_mape"], "memory_mape_heldout": s["memory_mape"],
                           "spearman_heldout": s["spearman"], "runs_heldout": s["runs"],
                           "runs_calibration": sum(1 for r in cal_rows if r["source"] == src)}
    rows = [[r["id"], f"{r['measured_step_s']:.3g}", f"{r['predicted_step_s']:.3g}", f"{r['time_error']:+.0%}",
             f"{r.get('measured_memory_gib', '-')}",
             f"{r['predicted_memory_gib']:.1f}" if "predicted_memory_gib" in r else "-"]
            for r in held_rows]
    console.print(table("held-out published runs: measured vs predicted", ["run", "step s", "predicted",
                                                                           "error", "mem GiB", "predicted"], rows))

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    console.print(f"held out ({held['runs']} runs, {held['runs_with_memory']} with memory): time MAPE "
                  f"{fmt(held['time_mape'])} (target 0.25), memory MAPE {fmt(held['memory_mape'])} (target 0.30), "
                  f"Spearman {fmt(held['spearman'])} (target 0.9); calibration half: time MAPE "
                  f"{fmt(cal_half['time_mape'])}; before calibration, held out: {fmt(before['time_mape'])}")
    for src, s in per_source.items():
        console.print(f"  {src}: time MAPE {fmt(s['time_mape_heldout'])}, memory MAPE "
                      f"{fmt(s['memory_mape_heldout'])}, Spearman {fmt(s['spearman_heldout'])}")
    write_json(args.json, {
        "time_mape_heldout": held["time_mape"], "memory_mape_heldout": held["memory_mape"],
        "spearman_heldout": held["spearman"], "per_source": per_source,
        "calibration_half": cal_half, "heldout_before_calibration": before, "parameters": cal.to_dict(),
        "fitted": bool(args.fit), "emulated": False, "excluded": excluded_runs(), "runs_heldout": held_rows, "runs_calibration": cal_rows,
        "data": str(DATA.relative_to(Path(__file__).parents[1]))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
