"""`chipfuse pool show|detect|catalog|rehearse`."""

from __future__ import annotations

import argparse

from chipfuse.cluster.catalog import GiB, load_catalog
from chipfuse.cluster.pool import load_pool, pool_to_dict
from chipfuse.plan.plan import DTYPES
from chipfuse.plan.rehearse import MAX_DEVICES
from chipfuse.report.output import console, human_bytes, table, write_json
from chipfuse.validate import arg_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="describe a pool of devices")
    psub = p.add_subparsers(dest="pool_command", required=True)
    show = psub.add_parser("show", help="print a pool file as a table")
    show.add_argument("file")
    show.add_argument("--json", metavar="PATH")
    show.set_defaults(func=cmd_show)
    det = psub.add_parser("detect", help="describe this machine's devices")
    det.add_argument("--bench", action="store_true", help="also micro-benchmark each device (a few seconds)")
    det.add_argument("--json", metavar="PATH")
    det.set_defaults(func=cmd_detect)
    cat = psub.add_parser("catalog", help="list the chip catalog")
    cat.add_argument("--json", metavar="PATH")
    cat.set_defaults(func=cmd_catalog)
    reh = psub.add_parser("rehearse", help="a few EMULATED devices and a tiny model that rehearse a pool's plans on "
                          "this machine (docs/planner.md)")
    reh.add_argument("file", help="the real pool's TOML file")
    reh.add_argument("--model", required=True, help="the model you mean to train (preset or Hugging Face config.json)")
    reh.add_argument("--max-devices", type=arg_int(1, 64), default=MAX_DEVICES,
                     help=f"devices to keep (default {MAX_DEVICES}: workers this machine runs at once)")
    reh.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype the speeds follow (default bf16)")
    reh.add_argument("--out", required=True, metavar="FILE", help="write the rehearsal pool here (a Hugging Face "
                     "tiny model goes to FILE's folder, as STEM-model/config.json)")
    reh.add_argument("--json", metavar="PATH")
    reh.set_defaults(func=cmd_rehearse)


def cmd_show(args: argparse.Namespace) -> int:
    pool = load_pool(args.file)
    rows = [[d.name, d.node, d.chip.name, d.vendor, f"{d.memory_bytes / GiB:.1f}",
             f"{d.peak_flops('bf16') / 1e12:.1f}", f"{d.chip.mem_bw / 1e9:.0f}", d.backend,
             f"emulated x{d.emulation.speed:g}" if d.emulation else "real"] for d in pool.devices]
    console.print(table(f"pool {pool.name} ({len(pool.devices)} devices, {len(pool.nodes)} nodes)",
                        ["device", "node", "chip", "vendor", "mem GiB", "bf16 TFLOP/s", "mem GB/s", "backend", "kind"],
                        rows))
    links = [[f"{n.name} (inside)", f"{n.intra_bandwidth / 1e9:.1f}", f"{n.intra_latency_s * 1e6:.1f}"] for n in pool.nodes]
    links += [[f"{ln.a} <-> {ln.b}", f"{ln.bandwidth / 1e9:.2f}", f"{ln.latency_s * 1e6:.0f}"] for ln in pool.links]
    links.append(["other node pairs", f"{pool.default_link.bandwidth / 1e9:.2f}", f"{pool.default_link.latency_s * 1e6:.0f}"])
    for row, ln in zip(links[len(pool.nodes):], [*pool.links, pool.default_link], strict=True):
        row.append(", ".join(f"{b / 1e9:.2f} at {human_bytes(n)}" for n, b in ln.curve) or "-")
    for row in links[:len(pool.nodes)]:
        row.append("-")
    console.print(table("links", ["link", "GB/s", "latency us", "by message size (GB/s)"], links))
    wired = [n for n in pool.nodes if n.wiring is not None]
    if wired:
        console.print(table("wiring (ring bandwidth inside a node follows it: docs/planner.md)",
                            ["node", "PCIe", "peer-to-peer", "bridges", "switches", "NIC Gbit/s"],
                            [[n.name, f"gen {w.pcie_gen}", "yes" if w.p2p else "no (via host)",
                              " ".join("+".join(b) for b in w.bridges) or "-",
                              " | ".join(",".join(g) for g in w.switches) or "-",
                              f"{w.nic_bw * 8 / 1e9:g}" if w.nic_bw else "-"]
                             for n in wired if (w := n.wiring) is not None]))
    catalog = load_catalog()
    own = {d.chip.name: d.chip for d in pool.devices if d.chip.name not in catalog}
    for c in own.values():
        console.print(f"chip {c.name} declared in the pool file: source {c.source}")
    out = pool_to_dict(pool)
    out["wiring"] = {n.name: {"pcie_gen": w.pcie_gen, "p2p": w.p2p, "bridges": [list(b) for b in w.bridges],
                              "bridge_bytes_s": w.bridge_bw, "switches": [list(g) for g in w.switches],
                              "nic_bytes_s": w.nic_bw, "intra_ring_bytes_s": n.intra_bandwidth}
                     for n in wired if (w := n.wiring) is not None}
    out["declared_chips"] = {c.name: {"source": c.source, "has_bf16": c.has_bf16, "tensor_cores": c.tensor_cores}
                             for c in own.values()}
    write_json(args.json, out)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from chipfuse.cluster.detect import detect_devices

    found = detect_devices(bench=args.bench)
    cols = ["device", "kind", "name", "memory GiB", "cores/SMs"] + (["fp32 GFLOP/s", "mem GB/s"] if args.bench else [])
    rows = []
    for d in found:
        row = [d["device"], d["kind"], d["name"], f"{d['memory_bytes'] / GiB:.1f}", d.get("cores", "")]
        if args.bench:
            row += [f"{d['fp32_flops'] / 1e9:.1f}", f"{d['mem_bw'] / 1e9:.1f}"]
        rows.append(row)
    console.print(table("devices on this machine", cols, rows))
    write_json(args.json, {"devices": found})
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    cat = load_catalog()
    rows = [[c.name, c.vendor, f"{c.memory_bytes / GiB:.0f}", f"{c.flops_bf16 / 1e12:g}", f"{c.flops_fp32 / 1e12:g}",
             f"{c.mem_bw / 1e9:g}", f"{c.link_bw / 1e9:g}"] for c in cat.values()]
    console.print(table("chip catalog (dense peaks; sources in catalog.toml)",
                        ["chip", "vendor", "GiB", "bf16 TFLOP/s", "fp32 TFLOP/s", "mem GB/s", "link GB/s"], rows))
    write_json(args.json, {c.name: {"vendor": c.vendor, "memory_bytes": c.memory_bytes, "flops_bf16": c.flops_bf16,
                                    "flops_fp32": c.flops_fp32, "mem_bw": c.mem_bw, "link_bw": c.link_bw,
                                    "source": c.source} for c in cat.values()})
    return 0


def cmd_rehearse(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from chipfuse.model.configs import resolve_model
    from chipfuse.plan.rehearse import rehearse

    r = rehearse(load_pool(args.file), resolve_model(args.model), max_devices=args.max_devices, dtype=args.dtype)
    out = Path(args.out)
    model_arg = r.model_arg
    if r.hf_config is not None:
        folder = out.parent / f"{out.stem}-model"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(r.hf_config, indent=2) + "\n")
        model_arg = str(folder / "config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(r.pool_toml)
    rows = [[k.name, k.node, k.chip, f"{k.ratio:.3g}", f"x{k.speed:.3g}", human_bytes(k.real_memory_bytes),
             human_bytes(k.memory_bytes)] for k in r.kept]
    console.print(table(f"rehearsal of {r.pool_name}: {len(r.kept)} of {r.devices_in_pool} devices, EMULATED on this "
                        "machine's CPU", ["device", "node", "chip", "peak / fastest", "speed", "usable on the chip",
                                          "emulated cap"], rows))
    links = ", ".join(x for x, on in (("inside a node", r.intra_node_link), ("between nodes", r.inter_node_link)) if on)
    console.print(f"kept nodes {list(r.nodes_kept)} (links: {links or 'none'}); chip kinds left out: "
                  f"{', '.join(r.kinds_left_out) or 'none'}")
    console.print(f"model {r.real_model.name} -> {r.model.name} ({r.model.num_layers} layers, width {r.model.dim}, "
                  f"vocabulary {r.model.vocab_size}); memory caps = usable memory x {r.memory_scale:.3g} (tiny / real "
                  f"training state)" + (f" x {r.memory_boost:.3g}" if r.memory_boost > 1 else ""))
    for n in r.notes:
        console.print(f"note: {n}")
    plan = out.with_name(f"{out.stem}-plan.json")
    console.print(f"rehearsal pool written to {out}; next:\n  chipfuse plan --pool {out} --model {model_arg} "
                  f"--global-batch {r.global_batch} --seq-len {r.seq_len} --dtype {r.dtype} --json {plan}\n"
                  f"  chipfuse train --pool {out} --plan {plan} --steps 3\n"
                  "(a rehearsal shows that the plan's shape runs; its times are this machine's, not the fleet's)")
    write_json(args.json, {**r.to_dict(), "pool_file": str(out), "model_arg": model_arg})
    return 0
