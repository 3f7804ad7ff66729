"""`chipfuse profile`: measure this machine's devices and a model's layers; save a profile that
`chipfuse plan` uses instead of catalog figures (format: chipfuse.plan.profile.Profile)."""

from __future__ import annotations

import argparse
import socket

from chipfuse.report.output import console, human_bytes, table, write_json
from chipfuse.validate import arg_float, arg_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure devices, links and per-layer times; save a profile for the planner")
    p.add_argument("--pool", default="builtin", help="pool TOML file (default: built-in emulated pool)")
    p.add_argument("--model", default="small", help="model preset or Hugging Face config.json")
    p.add_argument("--seq-len", type=arg_int(1, 1 << 20), default=None, help="default: the model's context length")
    p.add_argument("--micro-batch", default="1,4", help="micro-batch sizes to time, comma-separated")
    p.add_argument("--slack", type=arg_float(1, 100), default=1.1, help="emulated pacing slack, as `chipfuse train` uses")
    p.add_argument("--no-links", action="store_true", help="skip the two-process link measurement")
    p.add_argument("--json", metavar="PATH", default="profile.json", help="where to save the profile")
    p.set_defaults(func=cmd_profile)


def measure(pool, spec, *, seq_len: int, micro_batch_sizes: tuple[int, ...], slack: float = 1.1,  # type: ignore[no-untyped-def]
            links: bool = True) -> dict:
    """The profile as a dict (Profile.from_dict reads it; extra keys are for people and reports)."""
    import torch

    from chipfuse.runtime.measure import profiler

    torch.set_num_threads(1)  # as every worker runs
    host = profiler.host_figures()
    layers = profiler.block_and_head_times(spec, pool, micro_batch_sizes=micro_batch_sizes, seq_len=seq_len,
                                           slack=slack)
    fpt = profiler.block_fwd_flops_per_token(spec, seq_len)
    flops = {}
    for dev, m in layers.items():
        # sustained FLOP/s on blocks (the planner's meaning): the best measured size's, since a
        # busy machine only ever slows a measurement down
        rate = max(fpt * b["micro_batch_size"] * b["seq_len"] / b["fwd_s"] for b in m["blocks"])
        # The CPU runtime computes in fp32 whatever the plan's dtype, so both entries are that rate.
        flops[dev] = {"fp32": rate, "bf16": rate}
    link = profiler.link_figures() if links else None
    curve = profiler.gemm_curve("fp32")  # this host's; an emulated device's scales with its speed alike
    nodes = sorted({d.node for d in pool.devices})
    return {
        "flops": flops,
        "layer_times": {d: m["blocks"] for d, m in layers.items()},
        "links": [{"a": n, "b": n, "bandwidth": link["p2p_bandwidth"], "latency_s": link["latency_s"],
                   "curve": link["curve"]} for n in nodes] if link else [],
        "gemm": {d: curve for d in layers},
        # measured on an accelerator host only (its runtime's context and workspaces), for the devices
        # that run on that accelerator; CPU devices hold none
        "runtime_bytes": ({d.name: rt[1] for d in pool.devices if d.runs_as.torch_type == rt[0]}
                          if (rt := profiler.runtime_bytes()) is not None else {}),
        "source": f"chipfuse profile on {socket.gethostname()}",
        "emulated": pool.emulated,
        # extras (not read by the planner yet)
        "model": spec.name,
        "head_times": {d: m["head"] for d, m in layers.items()},
        "host": {"matmul_flops": host.flops, "mem_bw_bytes_s": host.mem_bw,
                 "allreduce_bandwidth": link["allreduce_bandwidth"] if link else None},
        "unmeasured": [d.name for d in pool.devices if d.name not in layers],
    }


def cmd_profile(args: argparse.Namespace) -> int:
    from chipfuse.commands.train import _load_pool
    from chipfuse.model.configs import resolve_model

    pool = _load_pool(args.pool)
    spec = resolve_model(args.model)
    seq_len = args.seq_len or spec.seq_len
    mbs = tuple(int(x) for x in args.micro_batch.split(",") if x)
    prof = measure(pool, spec, seq_len=seq_len, micro_batch_sizes=mbs, slack=args.slack, links=not args.no_links)
    label = " (EMULATED devices: measured under the runtime's pacing)" if pool.emulated else ""
    rows = []
    for d, ts in prof["layer_times"].items():
        for t in ts:
            rows.append([d, t["micro_batch_size"], f"{t['fwd_s'] * 1e3:.2f}", f"{t['bwd_s'] * 1e3:.2f}",
                         f"{prof['flops'][d]['fp32'] / 1e9:.2f}"])
    console.print(table(f"{spec.name}: one block per micro-batch of {seq_len} tokens{label}",
                        ["device", "micro-batch", "fwd ms", "bwd ms", "GFLOP/s"], rows))
    h = prof["host"]
    console.print(f"host: matmul fp32 {h['matmul_flops']['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
                  f"{h['matmul_flops']['bf16'] / 1e9:.1f} GFLOP/s (one thread); copy {human_bytes(h['mem_bw_bytes_s'])}/s")
    if prof["links"]:
        ln = prof["links"][0]
        console.print(f"links (two processes, gloo): p2p {human_bytes(ln['bandwidth'])}/s, latency "
                      f"{ln['latency_s'] * 1e6:.0f} us, all-reduce {human_bytes(h['allreduce_bandwidth'])}/s")
    if prof["unmeasured"]:
        console.print(f"not measurable on this host (catalog figures stay): {', '.join(prof['unmeasured'])}")
    write_json(args.json, prof)
    console.print(f"profile saved to {args.json}")
    return 0
