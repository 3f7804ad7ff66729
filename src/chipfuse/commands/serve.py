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
    import uvicorn

    from chipfuse.serve.hf import load_tokenizer
    from chipfuse.serve.http import make_app

    if not 0 < args.port < 65536:
        raise ChipfuseError(f"--port {args.port}. Fix: use a port in 1..65535")
    if args.concurrency < 1:
        raise ChipfuseError(f"--concurrency {args.concurrency}. Fix: use at least 1")
    tok = load_tokenizer(args.model)
    engine, pool = open_engine(args)
    name = engine.plan.model.name
    info = {"url": f"http://{args.host}:{args.port}/v1", "model": name, "plan": engine.plan.to_dict(),
            "emulated": pool.emulated, "started_at": time.time()}
    write_json(args.json, info)
    console.print(f"serving {name} at http://{args.host}:{args.port}/v1 (OpenAI API; /health)", highlight=False)
    try:
        uvicorn.run(make_app(engine, tok, model_name=name, api_key=args.api_key), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        engine.close()
        write_json(args.json, {**info, "lost_devices": engine.lost, "notes": engine.notes,
                               "final_plan": engine.plan.to_dict(), "stopped_at": time.time()})
    return 0
