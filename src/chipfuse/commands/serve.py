"""`chipfuse serve`: an OpenAI-compatible HTTP server for a model placed over a pool."""

from __future__ import annotations

import argparse
import time

from chipfuse.commands.generate import add_engine_arguments, open_engine
from chipfuse.errors import ChipfuseError
from chipfuse.report.output import console, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over a pool with an OpenAI-compatible HTTP API")
    add_engine_arguments(p, concurrency=8)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--json", metavar="PATH", help="write the plan and the server's address at start, "
                   "and what happened (lost devices, re-placements) at exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from chipfuse.serve.hf import model_folder

    if not 0 < args.port < 65536:
        raise ChipfuseError(f"--port {args.port}. Fix: use a port in 1..65535")
    if args.concurrency < 1:
        raise ChipfuseError(f"--concurrency {args.concurrency}. Fix: use at least 1")
    source = args.model
    with model_folder(source) as d:  # a checkpoint: exported for as long as the server runs
        args.model = str(d)
        return _serve(args, source)


def _serve(args: argparse.Namespace, source: str) -> int:
    import uvicorn

    from chipfuse.serve.hf import load_tokenizer, model_spec
    from chipfuse.serve.http import make_app

    model_spec(args.model)
    tok = load_tokenizer(args.model)
    engine, pool = open_engine(args)
    name = engine.plan.model.name
    info = {"url": f"http://{args.host}:{args.port}/v1", "model": name, "model_source": source, "plan": engine.plan.to_dict(),
            "emulated": pool.emulated, "quantisation_check": engine.quality, "started_at": time.time()}
    write_json(args.json, info)
    console.print(f"serving {name} at http://{args.host}:{args.port}/v1 (OpenAI API; /health)"
                  + (" on EMULATED devices (a rehearsal: speeds and memory are emulated)" if pool.emulated else ""),
                  highlight=False)
    try:
        uvicorn.run(make_app(engine, tok, model_name=name, api_key=args.api_key), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        engine.close()
        write_json(args.json, {**info, "lost_devices": engine.lost, "notes": engine.notes,
                               "final_plan": engine.plan.to_dict(), "stopped_at": time.time()})
    return 0


def cmd_plan_serve(args: argparse.Namespace, pool) -> int:
    """`chipfuse plan --serve`: the inference placement beside the even and memory-proportional splits."""
    from pathlib import Path

    from chipfuse.cluster.catalog import GiB
    from chipfuse.model.configs import resolve_model
    from chipfuse.plan.serve import plan_serve
    from chipfuse.report.output import table

    if args.model is None:
        raise ChipfuseError("chipfuse plan --serve: --model is missing. Fix: give a preset, a config.json or a "
                            "Hugging Face model folder")
    m = Path(args.model)
    spec = resolve_model(str(m / "config.json") if m.is_dir() else args.model)
    ctx = args.context_len or args.seq_len or spec.seq_len
    res = plan_serve(pool, spec, context_len=ctx, concurrency=args.concurrency, dtype=args.dtype,
                     quantize=args.quantize)
    plan, pred = res.best.plan, res.best.prediction
    rows = [[i, s.device, f"{st.num_layers}", f"{s.first_layer}-{s.first_layer + s.num_layers - 1}", s.weight_dtype,
             f"{st.memory_bytes / GiB:.2f}/{st.capacity_bytes / GiB:.1f}", f"{st.decode_step_s * 1e3:.3g}",
             f"{st.prefill_s * 1e3:.3g}"]
            for i, (s, st) in enumerate(zip(plan.stages, pred.stages, strict=True))]
    console.print(table(f"serving plan for {spec.name} on {pool.name}: {ctx}-token context, {args.concurrency} "
                        "request(s) in flight", ["stage", "device", "n", "layers", "weights", "GiB used/usable",
                                                  "decode step ms", "prefill ms"], rows))
    srows = [["chipfuse", len(plan.stages), f"{pred.ttft_s:.3g}", f"{pred.decode_tokens_per_s:,.1f}", "yes", "1.00"]]
    for name, b in res.baselines.items():
        if b is None:
            srows.append([name, "-", "-", "-", "no plan", "-"])
            continue
        bp = b.prediction
        srows.append([name, len(b.plan.stages), f"{bp.ttft_s:.3g}", f"{bp.decode_tokens_per_s:,.1f}",
                      "yes" if bp.fits else "NO", f"{pred.decode_tokens_per_s / bp.decode_tokens_per_s:.2f}"])
    console.print(table("predicted, chipfuse's placement beside the simple splits (x: chipfuse's tokens/s / its)",
                        ["strategy", "devices", "first token s", "tokens/s", "fits", "x"], srows))
    for e in plan.excluded:
        console.print(f"left out {e.device}: {e.reason}", highlight=False)
    console.print(f"searched {res.candidates} placements; predictions from catalog peak x default efficiency"
                  + ("; the pool is EMULATED: figures describe the emulation" if pool.emulated else ""),
                  highlight=False)
    write_json(args.json, {**res.to_dict(), "emulated": pool.emulated})
    return 0
