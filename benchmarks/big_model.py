"""A model several times larger than one rank's share, split over emulated pipeline stages: each
rank's peak host memory against the bytes of its own part.

Model: a Llama-shaped Hugging Face config made here (hidden 1024, 24 layers, vocabulary 32000:
374M parameters, 1.5 GB in fp32), split into `--stages` (default 3) pipeline stages of one
emulated device each, every stage a separate process on gloo over 127.0.0.1. Each rank builds its
stage the way `chipfuse train` does (chipfuse.model.split: meta device, only its own tensors
materialised and initialised by name), then trains `--steps` steps.

Per rank it records (Linux ru_maxrss and /proc/self/statm):
- `baseline_rss_bytes`: resident memory after imports and process-group set-up, before the model;
- `peak_rss_bytes`: the peak resident memory once the stage is built;
- `own_part_bytes`: the bytes of the stage's own parameters;
- `ratio` = (peak_rss_bytes - baseline_rss_bytes) / own_part_bytes; `max_ratio` over ranks (target
  <= 1.5; building the whole model on every rank and cutting it gives about the number of stages);
- after the training steps, `train_peak_rss_bytes` and `own_state_bytes` (parameters, gradients
  and AdamW's two moments of the stage) with `train_ratio` (activations come on top).
With `--compare-full` the same ranks also run the old way (whole model built, stage cut from it)
in the same run: `full_build_max_ratio` is the baseline the ratio is measured against.

Emulated devices (`"emulated": true`): memory figures are real host bytes of each process; no
time is reported (this machine is shared).

    .venv/bin/python benchmarks/big_model.py [--stages 3] [--steps 2] [--compare-full] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
from typing import Any

CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
          "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2}
SEQ_LEN = 64


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _plan(stages: int) -> Any:
    from chipfuse.cluster.pool import pool_from_dict
    from chipfuse.model.configs import spec_from_config_dict
    from chipfuse.plan.plan import Plan, Replica, Stage

    spec = spec_from_config_dict(CONFIG, name="llama-374m", source="benchmarks/big_model.py")
    L = spec.num_layers
    cuts = [round(i * L / stages) for i in range(stages + 1)]
    sts = tuple(Stage(devices=(f"d{i}",), first_layer=cuts[i], num_layers=cuts[i + 1] - cuts[i])
                for i in range(stages))
    plan = Plan(model=spec, global_batch=stages, seq_len=SEQ_LEN,
                replicas=(Replica(stages=sts, batch_share=stages, micro_batch_size=1),), schedule="gpipe")
    pool = pool_from_dict({"name": "big-model", "node": [{"name": "host0", "device": [
        {"name": f"d{i}", "chip": "cpu", "emulate": {"speed": 1.0}} for i in range(stages)]}]})
    return plan, pool


def _rank(rank: int, world: int, steps: int, full_build: bool) -> dict[str, Any]:
    import torch

    from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig

    plan, pool = _plan(world)
    base = _rss_now()
    if full_build:  # the old way, for the baseline: the whole model on every rank, then cut
        from chipfuse.model.build import build_full, build_stage

        full = build_full(plan.model, 0)
        module = build_stage(plan.model, plan.replicas[0].stages, rank, full=full)
        del full
        own = sum(p.numel() * p.element_size() for p in module.parameters())
        return {"rank": rank, "baseline_rss_bytes": base, "peak_rss_bytes": _rss_peak(), "own_part_bytes": own,
                "ratio": (_rss_peak() - base) / own}
    w = PipelineWorker(plan, pool, rank=rank, config=WorkerConfig(pace=False, memory_caps=False))
    peak = _rss_peak()
    own = sum(p.numel() * p.element_size() for p in w.module.parameters())
    for s in range(steps):
        w.step(s)
    state = own * 2 + sum(t.numel() * t.element_size() for st in w.opt.state.values() for t in st.values()
                          if isinstance(t, torch.Tensor))
    train_peak = _rss_peak()
    return {"rank": rank, "layers": list(plan.replicas[0].stages[rank].layers), "baseline_rss_bytes": base,
            "peak_rss_bytes": peak, "own_part_bytes": own, "ratio": (peak - base) / own,
            "train_peak_rss_bytes": train_peak, "own_state_bytes": state, "train_ratio": (train_peak - base) / state}


def _entry(rank: int, world: int, port: int, steps: int, full_build: bool, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put(_rank(rank, world, steps, full_build))
    except Exception as e:  # reported by the parent, which then stops
        queue.put({"rank": rank, "error": repr(e)})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, steps: int, full_build: bool) -> list[dict[str, Any]]:
    """One process per stage (spawned, so each measures its own memory from a clean start)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, steps, full_build, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    errors = [r for r in res if "error" in r]
    if errors:
        raise SystemExit(f"big_model: rank {errors[0]['rank']} failed: {errors[0]['error']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--compare-full", action="store_true", help="also measure the whole-model build (baseline)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    from chipfuse.model.costs import model_costs
    from chipfuse.report.output import console, table, write_json
    plan, _ = _plan(args.stages)
    num_params = model_costs(plan.model).total_params
    ranks = run_ranks(args.stages, args.steps, False)
    out: dict[str, Any] = {
        "emulated": True, "model": plan.model.name, "num_params": num_params, "stages": args.stages,
        "steps": args.steps, "peak_rss_bytes": {r["rank"]: r["peak_rss_bytes"] for r in ranks},
        "own_part_bytes": {r["rank"]: r["own_part_bytes"] for r in ranks},
        "baseline_rss_bytes": {r["rank"]: r["baseline_rss_bytes"] for r in ranks},
        "max_ratio": max(r["ratio"] for r in ranks), "target_max_ratio": 1.5,
        "train_peak_rss_bytes": {r["rank"]: r["train_peak_rss_bytes"] for r in ranks},
        "own_state_bytes": {r["rank"]: r["own_state_bytes"] for r in ranks},
        "max_train_ratio": max(r["train_ratio"] for r in ranks), "ranks": ranks,
        "note": "measured on a shared 2-core host under load; memory figures are this host's bytes",
    }
    if args.compare_full:
        full = run_ranks(args.stages, 0, True)
        out["full_build_max_ratio"] = max(r["ratio"] for r in full)
        out["full_build_ranks"] = full
    rows = [[r["rank"], f"{r['layers'][0]}-{r['layers'][-1]}", f"{r['baseline_rss_bytes'] / 2**20:.0f}",
             f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['own_part_bytes'] / 2**20:.0f}", f"{r['ratio']:.2f}",
             f"{r['train_ratio']:.2f}"] for r in ranks]
    console.print(table(f"{plan.model.name} ({num_params / 1e6:.0f}M params) over {args.stages} EMULATED stages",
                        ["rank", "layers", "baseline MiB", "peak MiB", "own part MiB", "ratio", "train ratio"], rows))
    line = f"max_ratio {out['max_ratio']:.2f} (target <= 1.5)"
    if args.compare_full:
        line += f"; whole model built on every rank: {out['full_build_max_ratio']:.2f}"
    console.print(line)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
