"""The full plan space against single-device stages, measured: on an emulated pool whose memory
caps keep the whole model off any one device, the planner's best plan (which may use tensor-parallel
or sharded stage groups) against its best plan restricted to single-device stages (pipelines and
replicas only), both trained with `chipfuse train --plan` in one run.

Pool: four emulated CPU devices (a CPU cannot offload to host memory, so memory has to come from
splitting the model) of equal speed (`--speed-scale` of one core each; pacing holds only
while every worker gets the CPU its speed asks for), each capped at 45% of what training the whole
model's state needs (`--cap-fraction`): no device holds half the model, so single-device stages can
only form one four-stage pipeline. In one run: profile the pool (`chipfuse profile`), search both spaces over the profile
(chipfuse.plan.search.search, `max_group=1` for the restricted one), train both plans, and compare
measured tokens/s. Prints and writes `speedup_vs_single_device_stages` (target >= 1.2), each plan's
`predicted_step_s`, `measured_step_s` and `prediction_error`, and `emulated: true`.

    .venv/bin/python benchmarks/plan_space.py [--steps 6] [--speed-scale 0.05] [--json PATH]

Figures taken on a loaded shared machine are smoke tests, not results (the JSON says `loaded`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from chipfuse.cli import main as chipfuse
from chipfuse.report.output import console, table, write_json

MODEL = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 256, "n_positions": 64,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
"""A GPT-2 of 3.3M parameters: wide for its sequence, so weights, gradients and optimizer state, not
activations, are what the caps squeeze (as with a large model on small chips). GPT-2 has no tensor
parallel plan in chipfuse (model.registry.tp_refusal), so the full space's extra room is sharded (FSDP2)
stage groups: on this 2-core machine DTensor tensor parallel pays per-operation dispatch and
optimizer costs the cost model does not price (docs/emulation.md)."""
DEVICES = ("d0", "d1", "d2", "d3")
GLOBAL_BATCH, SEQ_LEN = 16, 32


def pool_toml(cap_gib: float, scale: float) -> str:
    devs = "".join(f'[[node.device]]\nname = "{n}"\nchip = "cpu"\nemulate = {{ speed = {scale:g}, '
                   f'memory_gib = {cap_gib:.6f} }}\n' for n in DEVICES)
    return f'name = "emulated-4-capped"\n[[node]]\nname = "host0"\n{devs}'


def cap_gib(model_path: Path, fraction: float) -> float:
    """`fraction` of the whole model's training state (fp32 weights, grads, AdamW moments): under one
    half no two-stage split fits, so single-device stages must pipeline over all four devices."""
    from chipfuse.model.configs import resolve_model
    from chipfuse.model.costs import model_costs

    return fraction * 16 * model_costs(resolve_model(str(model_path)), SEQ_LEN).total_params / 2**30


def layout(plan) -> str:  # type: ignore[no-untyped-def]
    def st(s) -> str:  # type: ignore[no-untyped-def]
        kind = f"tp{s.tp_degree}" if s.tp_degree > 1 else (f"{s.shard}" if len(s.devices) > 1 else "")
        kind += f",offload={s.offload}" if s.offload != "none" else ""
        return "+".join(s.devices) + (f"[{kind}]" if kind else "") + f":{s.num_layers}"
    return " | ".join(" > ".join(st(s) for s in r.stages) + f" x{r.batch_share}" for r in plan.replicas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--speed-scale", type=float, default=0.05,
                    help="one core x this = speed 1; low, so that this 2-core host's real collectives and "
                    "FSDP2/DTensor overheads fit inside the paced compute (docs/emulation.md)")
    ap.add_argument("--cap-fraction", type=float, default=0.45,
                    help="each device's memory cap, as a fraction of the whole model's training state")
    ap.add_argument("--time-budget", type=float, default=5.0, help="seconds of search per space")
    ap.add_argument("--work-dir", metavar="DIR", help="keep the pool, profile, plans and runs here")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    from chipfuse.cluster.pool import load_pool
    from chipfuse.model.configs import resolve_model
    from chipfuse.plan.profile import Profile
    from chipfuse.plan.search import search

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.work_dir or d)
        tmp.mkdir(parents=True, exist_ok=True)
        model_path = tmp / "gpt2w" / "config.json"
        model_path.parent.mkdir(exist_ok=True)
        model_path.write_text(json.dumps(MODEL))
        cap = cap_gib(model_path, args.cap_fraction)
        (tmp / "pool.toml").write_text(pool_toml(cap, args.speed_scale))
        prof_path = tmp / "profile.json"
        if not prof_path.exists() and chipfuse(["profile", "--pool", str(tmp / "pool.toml"), "--model", str(model_path), "--seq-len",
                     str(SEQ_LEN), "--micro-batch", "1,2,4,8", "--json", str(prof_path)]):
            raise SystemExit("profile failed")
        pool, spec, profile = load_pool(tmp / "pool.toml"), resolve_model(str(model_path)), Profile.load(prof_path)
        plans = {name: search(pool, spec, global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, time_budget_s=args.time_budget,
                              profile=profile, dtype="fp32", max_group=mg).plan
                 for name, mg in (("full_space", None), ("single_device_stages", 1))}
        runs = {}
        for name, plan in plans.items():
            path = tmp / f"{name}-plan.json"
            plan.to_json(path)
            out = tmp / f"{name}.json"
            rc = chipfuse(["train", "--pool", str(tmp / "pool.toml"), "--plan", str(path), "--steps", str(args.steps),
                           "--run-dir", str(tmp / name), "--json", str(out), "--profile", str(prof_path),
                           "--no-progress", "--solo-samples", "0"])
            if rc:
                raise SystemExit(f"{name} run failed ({rc})")
            runs[name] = json.loads(out.read_text())
    speedup = runs["full_space"]["tokens_per_s"] / runs["single_device_stages"]["tokens_per_s"]
    rows = [[n, layout(plans[n]), f"{r['tokens_per_s']:.0f}", f"{r['measured_step_s'] * 1e3:.0f}",
             f"{(r.get('predicted_step_s') or 0) * 1e3:.0f}", f"{r['final_loss']:.3f}"] for n, r in runs.items()]
    console.print(table("full plan space vs single-device stages on an EMULATED capped pool",
                        ["space", "stages (devices[kind]:layers) x share", "tok/s", "measured ms", "predicted ms",
                         "final loss"], rows))
    load = os.getloadavg()[0]
    console.print(f"speedup_vs_single_device_stages = {speedup:.2f} (target >= 1.2); cap {cap * 1024:.1f} MiB per "
                  f"device (EMULATED devices; load average {load:.1f})")
    write_json(args.json, {
        "emulated": True, "loaded": load > (os.cpu_count() or 1) / 2, "load_average": load,
        "speedup_vs_single_device_stages": speedup,
        "memory_cap_bytes": int(cap * 2**30), "speed_scale": args.speed_scale, "model": MODEL,
        "global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN, "steps": args.steps,
        "runs": {n: {"plan": plans[n].to_dict(), "layout": layout(plans[n]), **{k: r.get(k) for k in (
            "tokens_per_s", "measured_step_s", "predicted_step_s", "prediction_error", "final_loss")}}
            for n, r in runs.items()},
    })


if __name__ == "__main__":
    main()
