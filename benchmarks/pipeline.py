"""Pipeline plans on an emulated pool that forces pipelining: chipfuse's plan versus an even layer split.

Pool: three emulated devices of speeds 1 : 0.5 : 0.5, times `--speed-scale` of one core (default
0.2: pacing holds only while every worker gets the CPU its speed asks for, and this 2-core machine
is shared with other jobs; on an idle one 0.7 fits, shared/notes/torch-on-cpu.md), each with a
memory cap below what the whole model needs to train, so every plan must split the layers. The model is GPT-shaped with 8 blocks
(an even split 3/3/2 cannot follow the speeds; 4/2/2 can). Both plans are one 1F1B pipeline over
the three devices in the same order (the solver's best of two) with the same micro-batches; they
differ only in the layer split. In one
run: profile the pool (`chipfuse profile`), split the layers with the planner's solver
(chipfuse.plan.partition) over the profiled per-block times and the memory caps, train that plan
and the even split for real with `chipfuse train --plan`, and compare measured tokens/s. Prints
and writes `speedup_vs_even` (target >= 1.3), `predicted_step_s` / `measured_step_s` of both,
and `emulated: true`.

Why not the planner's whole search: under these caps it prefers plans with parameter offload,
which the pipeline runtime does not run yet; the split is the part this benchmark is about.

    .venv/bin/python benchmarks/pipeline.py [--steps 12] [--speed-scale 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from chipfuse.cli import main as chipfuse
from chipfuse.report.output import console, table, write_json

MODEL = {"model_type": "gpt2", "n_layer": 8, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 128}
SPEEDS = {"fast": 1.0, "slow0": 0.5, "slow1": 0.5}
ORDERS = (("fast", "slow0", "slow1"), ("slow0", "slow1", "fast"))
GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH = 32, 128, 2  # 16 micro-batches: a short fill and drain


def pool_toml(cap_gib: float, scale: float) -> str:
    devs = "".join(f'[[node.device]]\nname = "{n}"\nchip = "cpu"\nemulate = {{ speed = {s * scale:g}, '
                   f'memory_gib = {cap_gib:.6f} }}\n' for n, s in SPEEDS.items())
    return f'name = "emulated-1-0.5-0.5-capped"\n[[node]]\nname = "host0"\n{devs}'


def cap_that_forces_pipelining(model_path: Path) -> float:
    """90% of the whole model's training state (fp32 weights, grads, AdamW moments): no device can
    train the model alone, two can."""
    from chipfuse.model.configs import resolve_model
    from chipfuse.model.costs import model_costs

    params = model_costs(resolve_model(str(model_path)), SEQ_LEN).total_params
    return 0.9 * 16 * params / 2**30


def even_split(L: int, p: int) -> list[int]:
    base, extra = divmod(L, p)
    return [base + (1 if i < extra else 0) for i in range(p)]


def solve_split(spec, profile: dict, cap_gib: float, order: tuple[str, ...]) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
    """The planner's layer-split solver over profiled seconds per block (forward, backward and the
    recomputed forward of one micro-batch) on each device of `order`, with the head on the last;
    k blocks that would not fit the cap (fp32 weights, grads and AdamW moments, 16 bytes a
    parameter, with 35% left for activations) cost infinity. Returns the split and its objective."""
    import numpy as np

    from chipfuse.model.costs import model_costs
    from chipfuse.plan.partition import partition

    costs = model_costs(spec, SEQ_LEN)
    L, names = spec.num_layers, list(order)
    table = []
    for i, d in enumerate(names):
        blk = min(profile["layer_times"][d], key=lambda t: abs(t["micro_batch_size"] - MICRO_BATCH))
        head = min(profile["head_times"][d], key=lambda t: abs(t["micro_batch_size"] - MICRO_BATCH))
        per_block = 2 * blk["fwd_s"] + blk["bwd_s"]
        extra = head["fwd_s"] + head["bwd_s"] if i == len(names) - 1 else 0.0
        row = np.full(L + 1, np.inf)
        for k in range(1, L + 1):
            if 16 * k * costs.block_params <= 0.65 * cap_gib * 2**30:
                row[k] = k * per_block + extra
        table.append(row)
    found = partition(table, L, GLOBAL_BATCH // MICRO_BATCH, exact=True)
    if found is None:
        raise SystemExit("no layer split fits the memory caps")
    return found


def pipeline_plan(spec, order: tuple[str, ...], layers: list[int], strategy: str):  # type: ignore[no-untyped-def]
    from chipfuse.plan.plan import Plan, Replica, Stage

    first, stages = 0, []
    for d, k in zip(order, layers, strict=True):
        # full checkpointing in both plans: under the caps, 1F1B's in-flight activations would not fit
        stages.append(Stage(devices=(d,), first_layer=first, num_layers=k, checkpoint="full"))
        first += k
    return Plan(model=spec, global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, schedule="1f1b", strategy=strategy,
                replicas=(Replica(stages=tuple(stages), batch_share=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH),))


def train(tmp: Path, name: str, plan_path: Path, steps: int, profile: Path) -> dict:
    out = tmp / f"{name}.json"
    rc = chipfuse(["train", "--pool", str(tmp / "pool.toml"), "--plan", str(plan_path), "--steps", str(steps),
                   "--run-dir", str(tmp / name), "--json", str(out), "--profile", str(profile), "--no-progress"])
    if rc:
        raise SystemExit(f"{name} run failed ({rc})")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--speed-scale", type=float, default=0.2, help="one core x this = speed 1")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    from chipfuse.model.configs import resolve_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_path = tmp / "gpt8" / "config.json"
        model_path.parent.mkdir()
        model_path.write_text(json.dumps(MODEL))
        cap = cap_that_forces_pipelining(model_path)
        (tmp / "pool.toml").write_text(pool_toml(cap, args.speed_scale))
        prof_path = tmp / "profile.json"
        if chipfuse(["profile", "--pool", str(tmp / "pool.toml"), "--model", str(model_path), "--seq-len",
                     str(SEQ_LEN), "--micro-batch", "1,2,4", "--json", str(prof_path)]):
            raise SystemExit("profile failed")
        profile = json.loads(prof_path.read_text())
        spec = resolve_model(str(model_path))
        # The stage order is part of the plan (which device carries the head): the solver's best of
        # two orders; the even split runs in the same order, so only the split differs.
        order, (layers, _) = min(((o, solve_split(spec, profile, cap, o)) for o in ORDERS), key=lambda x: x[1][1])
        plans = {"chipfuse": pipeline_plan(spec, order, layers, "chipfuse"),
                 "even": pipeline_plan(spec, order, even_split(spec.num_layers, len(SPEEDS)), "even")}
        runs = {}
        for name, plan in plans.items():
            path = tmp / f"{name}-plan.json"
            plan.to_json(path)
            runs[name] = train(tmp, name, path, args.steps, prof_path)
    speedup = runs["chipfuse"]["tokens_per_s"] / runs["even"]["tokens_per_s"]

    def layout(p) -> str:  # type: ignore[no-untyped-def]
        return " | ".join("+".join(f"{s.devices[0]}:{s.num_layers}" for s in r.stages) + f" x{r.batch_share}"
                          for r in p.replicas)

    rows = [[n, layout(plans[n]), f"{r['tokens_per_s']:.0f}", f"{r['measured_step_s'] * 1e3:.0f}",
             f"{r['predicted_step_s'] * 1e3:.0f}", f"{r['final_loss']:.3f}"] for n, r in runs.items()]
    console.print(table("pipeline plans on an EMULATED 1 : 0.5 : 0.5 pool with memory caps",
                        ["plan", "stages (device:layers) x share", "tok/s", "measured ms", "predicted ms",
                         "final loss"], rows))
    console.print(f"speedup_vs_even = {speedup:.2f} (target >= 1.3); memory cap {cap * 1024:.1f} MiB per device "
                  "(EMULATED devices)")
    write_json(args.json, {
        "emulated": True, "speedup_vs_even": speedup, "memory_cap_bytes": int(cap * 2**30), "speeds": {n: v * args.speed_scale for n, v in SPEEDS.items()},
        "model": MODEL, "global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN, "steps": args.steps,
        "runs": {n: {"plan": plans[n].to_dict(), **{k: r[k] for k in (
            "tokens_per_s", "measured_step_s", "predicted_step_s", "prediction_error", "final_loss")}}
            for n, r in runs.items()},
    })


if __name__ == "__main__":
    main()
