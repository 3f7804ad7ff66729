"""`chipfuse generate`: one prompt through a model placed over a pool, with a progress line."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from chipfuse.errors import ChipfuseError
from chipfuse.report.output import console, write_json

EMULATED_STEP_S = 0.002
"""Emulated pools: seconds one layer's decode step of one sequence takes on the fastest device."""


def add_engine_arguments(p: argparse.ArgumentParser, *, concurrency: int) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer) "
                   "or a chipfuse checkpoint (RUN_DIR/checkpoints/step_NNNNNN, exported on the fly)")
    p.add_argument("--pool", default="builtin", help="pool TOML file (default: the built-in emulated pool)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--context-len", type=int, default=None, help="tokens per request, prompt + answer "
                   "(default: the model's maximum)")
    p.add_argument("--concurrency", type=int, default=concurrency, help=f"requests in flight (default {concurrency})")
    p.add_argument("--serve-plan", metavar="JSON", help="a plan from `chipfuse plan --serve --json` instead of planning")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS", help="prompt tokens one micro-batch "
                   "carries at most: longer prompts are prefilled in chunks while other requests decode (default 512)")


def open_engine(args: argparse.Namespace):
    """Plan (or read) the placement and start the workers; returns (engine, pool)."""
    from chipfuse.cluster.builtin import default_pool
    from chipfuse.cluster.pool import load_pool
    from chipfuse.plan.serve import ServePlan, plan_serve
    from chipfuse.serve.engine import Engine, ServeConfig
    from chipfuse.serve.hf import model_spec

    pool = default_pool() if args.pool == "builtin" else load_pool(args.pool)
    spec = model_spec(args.model)
    if args.serve_plan:
        plan = ServePlan.from_json(args.serve_plan)
        plan.check(args.serve_plan, pool=pool)
    else:
        ctx = args.context_len or spec.seq_len
        if ctx > spec.seq_len:
            raise ChipfuseError(f"--context-len {ctx}: model {args.model} allows {spec.seq_len}. Fix: lower it")
        plan = plan_serve(pool, spec, context_len=ctx, concurrency=args.concurrency, dtype=args.dtype).best.plan
    placed = ", ".join(f"{s.device} layers {s.first_layer}-{s.first_layer + s.num_layers - 1}"
                       + ("" if s.weight_dtype == plan.dtype else f" ({s.weight_dtype})") for s in plan.stages)
    console.print(f"placed {plan.model.name} on {placed}"
                  + (" [EMULATED devices]" if pool.emulated else ""), highlight=False)
    for e in plan.excluded:
        console.print(f"left out {e.device}: {e.reason}", highlight=False)
    if args.prefill_chunk < 1:
        raise ChipfuseError(f"--prefill-chunk {args.prefill_chunk}. Fix: use at least 1 token")
    cfg = ServeConfig(emulated_step_s=EMULATED_STEP_S if pool.emulated else 0.0, prefill_chunk_tokens=args.prefill_chunk)
    engine = Engine(args.model, pool, plan, cfg).start()
    from chipfuse.serve.quant import quality_report

    engine.quality = quality_report(args.model, plan)  # int8/int4 stages: what they cost, on a fixed text
    if engine.quality:
        q = engine.quality
        console.print(f"quantised layers {sorted(set(q['quantised_layers'].values()))}: perplexity "
                      f"{q['perplexity_quantised']:.4g} vs {q['perplexity_reference']:.4g} unquantised, max logit "
                      f"difference {q['max_abs_logit_diff']:.3g}, next-token agreement {q['next_token_agreement']:.0%} "
                      f"on a fixed {q['text_tokens']}-token text", highlight=False)
    return engine, pool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with a model placed over a pool")
    add_engine_arguments(p, concurrency=1)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", metavar="PATH", help="write the text, tokens and timings as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from chipfuse.serve.hf import model_folder

    source = args.model
    with model_folder(source) as d:
        args.model = str(d)
        return _generate(args, source)


def _generate(args: argparse.Namespace, source: str) -> int:
    from chipfuse.serve.engine import Request
    from chipfuse.serve.hf import load_tokenizer, model_spec

    if args.max_new_tokens < 1:
        raise ChipfuseError(f"--max-new-tokens is {args.max_new_tokens}. Fix: ask for at least 1 token")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ChipfuseError(f"--temperature {args.temperature} / --top-p {args.top_p}. Fix: temperature >= 0, "
                            "0 < top-p <= 1")
    model_spec(args.model)  # a folder without config.json: one line, before anything starts
    tok = load_tokenizer(args.model)
    ids = list(tok(args.prompt)["input_ids"])
    if not ids:
        raise ChipfuseError("--prompt is empty after tokenizing. Fix: give some text")
    if args.context_len is None:
        args.context_len = len(ids) + args.max_new_tokens
    engine, pool = open_engine(args)
    done = threading.Event()
    state: dict = {"tokens": [], "end": None, "first_s": None}
    t0 = time.perf_counter()

    def on(ev: tuple) -> None:
        if ev[0] == "token":
            state["tokens"].append(ev[1])
            state["first_s"] = state["first_s"] or time.perf_counter() - t0
            n, el = len(state["tokens"]), time.perf_counter() - t0
            print(f"\rgenerating: {n}/{args.max_new_tokens} tokens, {n / el:.1f} tokens/s", end="",
                  file=sys.stderr, flush=True)
        else:
            state["end"] = ev
            done.set()

    try:
        eos = tok.eos_token_id
        engine.submit(Request(prompt=ids, max_new=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, on_event=on,
                              stop_ids=(eos,) if isinstance(eos, int) else ()))
        done.wait()
    finally:
        engine.close()
    print(file=sys.stderr)
    if state["end"][0] == "error":
        raise ChipfuseError(state["end"][1])
    total_s = time.perf_counter() - t0
    text = tok.decode(state["tokens"], skip_special_tokens=True)
    print(text)
    n = len(state["tokens"])
    decode_s = total_s - (state["first_s"] or 0.0)
    out = {"model": source, "text": text, "tokens": state["tokens"], "prompt_tokens": len(ids), "finish_reason": state["end"][1],
           "ttft_s": state["first_s"], "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
           "plan": engine.plan.to_dict(), "lost_devices": engine.lost, "quantisation_check": engine.quality, "emulated": pool.emulated,
           "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    write_json(args.json, out)
    return 0
