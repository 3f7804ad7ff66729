"""Serving on an emulated unequal pool: chipfuse's placement against an even layer split and a
memory-proportional split (as exo and llama.cpp's RPC backend place layers), in one run.

Pool: three emulated devices, fast (speed 1, 4 MiB), mid (0.5, 8 MiB) and slow (0.2, 48 MiB: the big,
slow host). Model: a Llama-shaped decoder of 8 layers (width 128, fp32) made here and saved locally.
Each placement is served by the real runtime (one worker per stage, gloo, continuous batching); the
emulated devices are paced to the cost model's times for their chips (docs/serve.md: emulated pacing)
on one clock for every placement. For each placement, 1 request alone and then 8 at once, each asking
for `--new-tokens` tokens; measured: time to first token (mean) and decode tokens/s (all requests'
tokens after their first, over the time from the first first-token to the last token).

Keys: `speedup_vs_memory_split` and `speedup_vs_even` (chipfuse's decode tokens/s at 8 concurrent over
the split's), `slowest_device_effect` (tokens/s at 8 concurrent with the slowest device in the pool over
without it: chipfuse's plan for each pool; 1.0 when the plan leaves it out), `emulated: true`,
`machine_load` (the 1-minute load average when it ran: figures taken under load are smoke tests).

    .venv/bin/python benchmarks/serve.py [--new-tokens 24] [--step-ms 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from chipfuse.cluster.pool import Pool, pool_from_dict
from chipfuse.plan.serve import (
    ServePlan,
    fastest_layer_step_s,
    fixed_plan,
    plan_serve,
    predict_serve,
    split_by_memory,
    split_even,
)
from chipfuse.report.output import console, table, write_json
from chipfuse.serve.engine import Engine, Request, ServeConfig
from chipfuse.serve.hf import model_spec

DEVICES = (("fast", 1.0, 4.0), ("mid", 0.5, 8.0), ("slow", 0.2, 48.0))  # name, speed, memory MiB
CONTEXT, CONCURRENCY = 128, 8


def make_pool(devices=DEVICES) -> Pool:
    return pool_from_dict({"name": "bench-serve", "node": [{"name": "host0", "device": [
        {"name": n, "chip": "cpu", "emulate": {"speed": s, "memory_gib": m / 1024}} for n, s, m in devices]}]})


def make_model(path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)  # token ids in, no tokenizer needed
    return path


def measure(model: Path, pool: Pool, plan: ServePlan, step_s: float, new_tokens: int) -> dict:
    eng = Engine(model, pool, plan, ServeConfig(emulated_step_s=step_s)).start()
    out = {}
    try:
        eng.generate([5, 6, 7, 8], 2)  # warm-up
        for n in (1, CONCURRENCY):
            firsts: list[dict] = []
            t0s: list[float] = []
            finished = threading.Semaphore(0)  # released from the engine's thread: never block there
            for i in range(n):
                st: dict = {"first": None, "last": None, "n": 0}

                def on(ev: tuple, st: dict = st, finished: threading.Semaphore = finished) -> None:
                    if ev[0] == "token":
                        now = time.perf_counter()
                        st["first"] = st["first"] or now
                        st["last"] = now
                        st["n"] += 1
                    else:
                        finished.release()

                t0s.append(time.perf_counter())
                eng.submit(Request(prompt=[10 + i, 20, 30, 40, 50, 60, 70, 80], max_new=new_tokens, on_event=on))
                firsts.append(st)
            for _ in range(n):
                finished.acquire()
            ttft = sum(st["first"] - t0 for st, t0 in zip(firsts, t0s, strict=True)) / n
            span = max(st["last"] for st in firsts) - min(st["first"] for st in firsts)
            toks = sum(st["n"] - 1 for st in firsts)
            out[n] = {"ttft_s": ttft, "decode_tokens_per_s": toks / span}
    finally:
        eng.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--step-ms", type=float, default=20.0,
                    help="emulated ms of one layer's decode step for one sequence on the fastest device")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    pool = make_pool()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model")
        spec = model_spec(model)
        ours = plan_serve(pool, spec, context_len=CONTEXT, concurrency=CONCURRENCY, dtype="fp32").best.plan
        names = [d.name for d in pool.devices]
        plans = {"chipfuse": ours}
        for name, layers in (("even", split_even(spec.num_layers, names)),
                             ("memory-proportional", split_by_memory(spec.num_layers,
                                                                     {d.name: d.memory_bytes for d in pool.devices}))):
            plans[name] = fixed_plan(pool, spec, dict(zip(names, layers, strict=True)), context_len=CONTEXT,
                                     concurrency=CONCURRENCY, dtype="fp32", strategy=name)
        slowest = min(pool.devices, key=lambda d: d.emulation.speed if d.emulation else 1.0)
        without = make_pool(tuple(d for d in DEVICES if d[0] != slowest.name))
        plan_without = plan_serve(without, spec, context_len=CONTEXT, concurrency=CONCURRENCY, dtype="fp32").best.plan
        results = {}
        for name, plan in plans.items():
            console.print(f"measuring {name}: " + ", ".join(f"{s.device}:{s.num_layers}" for s in plan.stages))
            results[name] = measure(model, pool, plan, args.step_ms / 1e3, args.new_tokens)
        same = plan_without.stages == ours.stages
        # One clock for both pools: the pacing unit is the fastest device's, which both pools share.
        without_res = results["chipfuse"] if same else measure(model, without, plan_without, args.step_ms / 1e3,
                                                               args.new_tokens)
    tps = {k: v[CONCURRENCY]["decode_tokens_per_s"] for k, v in results.items()}
    summary = {
        "emulated": True,
        "machine_load": os.getloadavg()[0],
        "pool": {n: {"speed": s, "memory_mib": m} for n, s, m in DEVICES},
        "model": {"layers": spec.num_layers, "width": spec.dim, "dtype": "fp32", "context_len": CONTEXT},
        "new_tokens": args.new_tokens, "step_ms": args.step_ms,
        "placements": {k: {s.device: s.num_layers for s in p.stages} for k, p in plans.items()},
        "groups": {k: p.groups or min(CONCURRENCY, len(p.stages)) for k, p in plans.items()},
        # The cost model's figures on the emulation's clock (what the pacing asks for), and whether each
        # placement fits the devices' memory (the runtime does not refuse one that does not).
        "predicted": {k: {"fits": (pr := predict_serve(p, pool)).fits,
                          "decode_tokens_per_s": pr.decode_tokens_per_s * fastest_layer_step_s(p, pool)
                          / (args.step_ms / 1e3),
                          "ttft_s": pr.ttft_s / fastest_layer_step_s(p, pool) * (args.step_ms / 1e3)}
                      for k, p in plans.items()},
        "results": {k: {str(n): r for n, r in v.items()} for k, v in results.items()},
        "speedup_vs_memory_split": tps["chipfuse"] / tps["memory-proportional"],
        "speedup_vs_even": tps["chipfuse"] / tps["even"],
        "slowest_device_effect": tps["chipfuse"] / without_res[CONCURRENCY]["decode_tokens_per_s"],
        "slowest_device": slowest.name, "slowest_left_out_by_plan": same,
    }
    rows = [[k, ", ".join(f"{d}:{n}" for d, n in summary["placements"][k].items()),
             f"{v[1]['ttft_s'] * 1e3:.0f}", f"{v[1]['decode_tokens_per_s']:.1f}",
             f"{v[CONCURRENCY]['ttft_s'] * 1e3:.0f}", f"{v[CONCURRENCY]['decode_tokens_per_s']:.1f}"]
            for k, v in results.items()]
    console.print(table("serving on an EMULATED unequal pool (measured)",
                        ["placement", "layers", "TTFT ms (1)", "tok/s (1)", f"TTFT ms ({CONCURRENCY})",
                         f"tok/s ({CONCURRENCY})"], rows))
    console.print(f"speedup_vs_memory_split {summary['speedup_vs_memory_split']:.2f}, speedup_vs_even "
                  f"{summary['speedup_vs_even']:.2f}, slowest_device_effect {summary['slowest_device_effect']:.2f}"
                  f" (load average {summary['machine_load']:.1f}: above ~2 on this machine the figures are a smoke "
                  "test)")
    write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
