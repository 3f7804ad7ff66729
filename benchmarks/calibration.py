"""Calibration of the planner's step-time prediction against real runs, on emulated pools.

Two emulated pools (speeds 1 : 0.5 : 0.5 and 0.7 : 0.7 : 0.35, times `--speed-scale` of one core,
default 0.2) are profiled first with
`chipfuse profile`; then 10 different plans (unequal pipelines, GPipe and 1F1B, several micro-batch
sizes, checkpointing, pipelines beside whole-model replicas, another stage order, a device left
out, a badly balanced split, spanning step times from fast to slow) are each
predicted by chipfuse.plan.cost.predict with that profile and run for real with
`chipfuse train --plan --profile`. Prints and writes `mape` (mean absolute percentage error of the
step time; target <= 0.10), `spearman` (rank correlation of predicted and measured; target
>= 0.9), every plan's figures, and `emulated: true`.

    .venv/bin/python benchmarks/calibration.py [--steps 12] [--speed-scale 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from chipfuse.cli import main as chipfuse
from chipfuse.report.output import console, table, write_json

MODEL = {"model_type": "gpt2", "n_layer": 8, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 128}
# Pacing holds only while every worker gets the CPU its speed asks for (shared/notes/torch-on-cpu.md:
# sums under ~1.6 cores on an idle 2-core machine; far less when other jobs share it), hence the scale.
POOLS = {"A": {"fast": 1.0, "slow0": 0.5, "slow1": 0.5}, "B": {"fast": 0.7, "slow0": 0.7, "slow1": 0.35}}
GLOBAL_BATCH, SEQ_LEN = 16, 128
# (pool, schedule, checkpoint, [([(device, layers), ...], share, micro_batch), ...])
PLANS = [
    ("A", "1f1b", "none", [([("fast", 3), ("slow0", 3), ("slow1", 2)], 16, 2)]),
    ("A", "1f1b", "none", [([("fast", 4), ("slow0", 2), ("slow1", 2)], 16, 2)]),
    ("A", "gpipe", "none", [([("fast", 4), ("slow0", 2), ("slow1", 2)], 16, 4)]),
    ("A", "1f1b", "full", [([("slow0", 2), ("fast", 4), ("slow1", 2)], 16, 2)]),
    ("A", "1f1b", "none", [([("fast", 5), ("slow0", 3)], 12, 2), ([("slow1", 8)], 4, 2)]),
    ("B", "1f1b", "none", [([("fast", 3), ("slow0", 3), ("slow1", 2)], 16, 2)]),
    ("B", "1f1b", "none", [([("fast", 4), ("slow1", 4)], 8, 1), ([("slow0", 8)], 8, 4)]),
    ("B", "gpipe", "none", [([("fast", 3), ("slow0", 3), ("slow1", 2)], 16, 4)]),
    ("A", "1f1b", "none", [([("slow0", 6), ("slow1", 2)], 16, 2)]),
    ("B", "1f1b", "none", [([("fast", 2), ("slow0", 2), ("slow1", 4)], 16, 2)]),
]


def pool_toml(name: str, speeds: dict[str, float], scale: float) -> str:
    devs = "".join(f'[[node.device]]\nname = "{n}"\nchip = "cpu"\nemulate = {{ speed = {s * scale:g} }}\n'
                   for n, s in speeds.items())
    return f'name = "emulated-{name}"\n[[node]]\nname = "host0"\n{devs}'


def make_plan(spec, schedule: str, checkpoint: str, replicas: list):  # type: ignore[no-untyped-def]
    from chipfuse.plan.plan import Plan, Replica, Stage

    reps = []
    for stages, share, mbs in replicas:
        first, sts = 0, []
        for dev, k in stages:
            sts.append(Stage(devices=(dev,), first_layer=first, num_layers=k, checkpoint=checkpoint))
            first += k
        reps.append(Replica(stages=tuple(sts), batch_share=share, micro_batch_size=mbs))
    return Plan(model=spec, global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, replicas=tuple(reps), schedule=schedule,
                strategy="manual")


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def describe(plan) -> str:  # type: ignore[no-untyped-def]
    return " | ".join("+".join(f"{s.devices[0]}:{s.num_layers}" for s in r.stages) + f" x{r.batch_share}/{r.micro_batch_size}"
                      for r in plan.replicas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--speed-scale", type=float, default=0.2, help="one core x this = speed 1")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    from chipfuse.cluster.pool import load_pool
    from chipfuse.model.configs import resolve_model
    from chipfuse.plan.cost import predict
    from chipfuse.plan.profile import Profile

    rows, results = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_path = tmp / "gpt8" / "config.json"
        model_path.parent.mkdir()
        model_path.write_text(json.dumps(MODEL))
        spec = resolve_model(str(model_path))
        for name, speeds in POOLS.items():
            (tmp / f"pool{name}.toml").write_text(pool_toml(name, speeds, args.speed_scale))
            if chipfuse(["profile", "--pool", str(tmp / f"pool{name}.toml"), "--model", str(model_path), "--seq-len",
                         str(SEQ_LEN), "--micro-batch", "1,2,4", "--json", str(tmp / f"profile{name}.json")]):
                raise SystemExit("profile failed")
        for i, (pname, schedule, ck, reps) in enumerate(PLANS):
            plan = make_plan(spec, schedule, ck, reps)
            pool_path, prof_path = tmp / f"pool{pname}.toml", tmp / f"profile{pname}.json"
            predicted = predict(plan, load_pool(pool_path), Profile.load(prof_path)).step_s
            plan_path, out = tmp / f"plan{i}.json", tmp / f"run{i}.json"
            plan.to_json(plan_path)
            if chipfuse(["train", "--pool", str(pool_path), "--plan", str(plan_path), "--steps", str(args.steps),
                         "--profile", str(prof_path), "--run-dir", str(tmp / f"run{i}"), "--json", str(out),
                         "--no-progress"]):
                raise SystemExit(f"plan {i} failed")
            measured = json.loads(out.read_text())["measured_step_s"]
            err = (predicted - measured) / measured
            results.append({"pool": pname, "schedule": schedule, "checkpoint": ck, "layout": describe(plan),
                            "predicted_step_s": predicted, "measured_step_s": measured, "relative_error": err})
            rows.append([str(i), pname, schedule, ck, describe(plan), f"{predicted * 1e3:.0f}", f"{measured * 1e3:.0f}",
                         f"{err:+.1%}"])
    pred = [r["predicted_step_s"] for r in results]
    meas = [r["measured_step_s"] for r in results]
    mape = float(np.mean([abs(r["relative_error"]) for r in results]))
    rho = spearman(pred, meas)
    console.print(table("predicted vs measured step time (EMULATED devices)",
                        ["#", "pool", "schedule", "ckpt", "stages (device:layers) x share/micro-batch", "predicted ms",
                         "measured ms", "error"], rows))
    console.print(f"mape = {mape:.3f} (target <= 0.10), spearman = {rho:.3f} (target >= 0.9), "
                  f"{len(results)} plans, EMULATED devices")
    write_json(args.json, {"emulated": True, "mape": mape, "spearman": rho, "steps": args.steps, "speed_scale": args.speed_scale,
                           "pools": POOLS,
                           "model": MODEL, "plans": results})


if __name__ == "__main__":
    main()
