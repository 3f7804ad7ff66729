"""A rehearsal of a pool: a few emulated devices and a tiny model that this machine can run, keeping
what the planner decides on (docs/planner.md, "Rehearsing a pool here").

Pure (no torch): a real pool and the model the user means to train in; out come

- up to `max_devices` of the pool's devices, chosen to cover its chip kinds (the kinds with the most
  compute first), and, where the pool has them, two devices of one node (a link inside a node) and
  devices on two nodes (a link between nodes);
- each as an emulated CPU device (docs/emulation.md) whose speed follows its chip's catalog peak in
  the plan's compute dtype (the fastest kept chip runs at `top_speed`; the speeds sum to at most
  `SPEED_BUDGET`, and none is below `MIN_SPEED`, so that the workers fit this machine's cores) and
  whose memory cap is what the planner would let the job use on the real chip (plan.memory.usable)
  times the tiny model's training state over the real model's: the tiny model meets the memory
  pressure the real one meets, so the planner reaches for the same strategies (pipelines, sharded or
  tensor-parallel groups, checkpointing, offload);
- a tiny model of the same family (the built-in GPT's `tiny` preset; a Llama preset or a Hugging Face
  config as a Hugging Face config of its model_type, 64 wide, 4 layers, vocabulary 512).

An emulated device's catalog figures are multiplied by its speed when the planner prices it
(cluster.pool.Device.peak_flops), so a kept chip is declared in the rehearsal's own `[[chip]]` table
with its catalog figures divided by its speed: the planner then sees every kept device at its catalog
figures times one common factor (the real pool's ratios), while the runtime paces each worker to its
speed. Vendor, bf16 support and tensor cores are the catalog chip's, so vendor groups, the gloo bridge
and fp32 compute on chips without bf16 are rehearsed too.

Links keep the real pool's figures (node links over the kept devices, links between kept nodes, NIC
caps applied). A rehearsal shows that the plan's shape runs; its times are this machine's, not the
fleet's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from chipfuse.cluster.catalog import GiB
from chipfuse.cluster.pool import Device, Pool
from chipfuse.errors import ChipfuseError
from chipfuse.model.costs import model_costs
from chipfuse.model.registry import family_of
from chipfuse.model.spec import SPEC_PRESETS, ModelSpec
from chipfuse.plan.hardware import link_between
from chipfuse.plan.memory import compute_dtype, usable

MAX_DEVICES = 4
"""Workers a rehearsal runs by default: more do not fit a 2-core machine (docs/emulation.md)."""
SPEED_BUDGET = 1.4
"""Sum of the kept devices' speeds: every worker really computes, so with more than about 1.6 cores'
worth after the pacer's slack the ratios compress (docs/emulation.md)."""
TOP_SPEED = 0.6
"""Speed of the fastest kept chip when the budget allows it."""
MIN_SPEED = 0.1
"""Slower chips are run at this speed (a CPU next to an H800 would be 1000 times slower: minutes a step;
at 0.1 a tiny model's step still takes well under a second)."""
HEADROOM = 2.5
"""The kept devices' caps hold at least this many times the tiny model's training state (else they are
raised together, and the rehearsal says so): with fewer devices than the pool, a model the whole pool
holds may not fit the kept ones."""
TINY_DIM, TINY_LAYERS, TINY_HEADS, TINY_VOCAB, TINY_POSITIONS = 64, 4, 4, 512, 64
SEQ_LEN = 32
"""Tokens per sample the rehearsal plans and trains."""
KEEP_REAL_PARAMS = 2_000_000
"""A model this small runs here as it is."""


@dataclass(frozen=True, kw_only=True)
class Kept:
    """One device of the real pool, as the rehearsal runs it."""

    name: str
    node: str
    chip: str
    """The real pool's chip."""
    speed: float
    """Emulated speed (docs/emulation.md)."""
    ratio: float
    """The chip's peak over the fastest kept chip's (compute dtype): the speed before clamping."""
    memory_bytes: int
    """Emulated memory cap."""
    real_memory_bytes: int
    """What the planner would let the job use on the real chip (plan.memory.usable)."""


@dataclass(frozen=True, kw_only=True)
class Rehearsal:
    pool_name: str
    kept: tuple[Kept, ...]
    pool_toml: str
    """The rehearsal pool, as a pool file."""
    model: ModelSpec
    """The tiny model."""
    model_arg: str
    """What `chipfuse plan --model` takes for it: a preset name, or "config.json" (write `hf_config`)."""
    hf_config: dict[str, Any] | None
    real_model: ModelSpec
    memory_scale: float
    """Tiny model's training state / real model's (the factor on every usable memory)."""
    memory_boost: float
    """>1 when the kept caps were raised together so that the tiny model fits them (HEADROOM)."""
    devices_in_pool: int
    kinds_left_out: tuple[str, ...]
    nodes_kept: tuple[str, ...]
    intra_node_link: bool
    inter_node_link: bool
    dtype: str
    seq_len: int = SEQ_LEN
    global_batch: int = 8
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "emulated": True, "pool": self.pool_name, "devices_in_pool": self.devices_in_pool,
            "kept": [vars(k) for k in self.kept], "kinds_left_out": list(self.kinds_left_out),
            "nodes_kept": list(self.nodes_kept), "intra_node_link": self.intra_node_link,
            "inter_node_link": self.inter_node_link, "real_model": self.real_model.name,
            "real_params": model_costs(self.real_model).total_params, "model": self.model.to_dict(),
            "model_arg": self.model_arg, "tiny_params": model_costs(self.model).total_params,
            "memory_scale": self.memory_scale, "memory_boost": self.memory_boost, "dtype": self.dtype,
            "seq_len": self.seq_len, "global_batch": self.global_batch, "notes": list(self.notes),
            "pool_toml": self.pool_toml,
        }


# ---------------------------------------------------------------------------------------------- devices


def _kind(d: Device) -> tuple[str, float | None, int]:
    return (d.chip.name, d.emulation.speed if d.emulation else None, d.memory_bytes)


def _rate(d: Device, dtype: str) -> float:
    """Catalog peak in what the chip computes the plan's dtype in; an emulated device: its own speed."""
    return d.peak_flops(compute_dtype(dtype, d.chip))


def choose_devices(pool: Pool, max_devices: int, dtype: str = "bf16") -> list[Device]:
    """Up to `max_devices` devices covering the pool's kinds (most total compute first), with two on
    one node and devices on two nodes where the pool has such pairs."""
    if max_devices < 1:
        raise ChipfuseError(f"--max-devices {max_devices}. Fix: keep at least one device")
    kinds: dict[tuple, list[Device]] = {}
    for d in pool.devices:
        kinds.setdefault(_kind(d), []).append(d)
    ranked = sorted(kinds, key=lambda k: -sum(_rate(d, dtype) for d in kinds[k]))
    pair_possible = any(len(n.devices) > 1 for n in pool.nodes)
    # With three slots or more, one goes to a second device of a kind (a pair inside a node) rather
    # than to the kind with the least compute.
    spare = pair_possible and max_devices >= 3 and len(ranked) >= max_devices
    cover = ranked[:max_devices - 1] if spare else ranked[:max_devices]
    picked: list[Device] = [kinds[k][0] for k in cover]

    def next_of(k: tuple) -> Device | None:
        free = [d for d in kinds[k] if d not in picked]
        if not free:
            return None
        nodes = {d.node for d in picked}
        mine = {d.node for d in picked if _kind(d) == k}
        if len(nodes) == 1 and len({n.name for n in pool.nodes}) > 1:  # no link between nodes yet
            other = [d for d in free if d.node not in nodes]
            if other:
                return other[0]
        same = [d for d in free if d.node in mine]  # a pair inside a node: stage groups live there
        return same[0] if same else free[0]

    while len(picked) < max_devices:
        before = len(picked)
        for k in cover:
            if len(picked) < max_devices and (nxt := next_of(k)) is not None:
                picked.append(nxt)
        if len(picked) == before:
            break
    order = {d.name: i for i, d in enumerate(pool.devices)}
    return sorted(picked, key=lambda d: order[d.name])


# ---------------------------------------------------------------------------------------------- the tiny model


def _scaled_heads(spec: ModelSpec) -> tuple[int, int]:
    """(heads, kv heads) of the tiny model: TINY_HEADS, with the real model's grouping where it divides."""
    group = max(1, spec.num_heads // spec.kv_heads)
    kv = max(1, TINY_HEADS // group)
    return TINY_HEADS, kv


def _ffn(spec: ModelSpec) -> int:
    return max(8, round(TINY_DIM * spec.ffn / spec.dim / 8) * 8)


SHAPE_KEYS = {
    "rotary": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "head_dim"),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "vocab_size", "n_ctx"),
    "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
            "max_position_embeddings", "word_embed_proj_dim"),
}
DROP_KEYS = ("layer_types", "rope_scaling", "architectures", "_name_or_path", "torch_dtype", "dtype",
             "transformers_version", "auto_map")
"""Fields of the real config that describe its size (per-layer lists, long-context rope scaling) or
its files rather than its architecture."""


def tiny_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """A Hugging Face config of the real model's architecture, at the tiny size."""
    fam = family_of(spec)
    assert fam.hf_config is not None and fam.layout is not None, "a family without a rehearsal preset is an HF one"
    mt = str(fam.hf_config(spec)["model_type"])
    kind = fam.layout.kind
    heads, kv = _scaled_heads(spec)
    base = {k: v for k, v in (spec.hf_config or {}).items()
            if k not in DROP_KEYS and k not in SHAPE_KEYS[kind] and not k.startswith("_")}
    base.update(model_type=mt, vocab_size=TINY_VOCAB, tie_word_embeddings=spec.tie_embeddings)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id"):
        if isinstance(base.get(k), int) and base[k] >= TINY_VOCAB:
            base[k] = min(base[k], 2)  # special tokens inside the tiny vocabulary
    if kind == "gpt2":
        base.update(n_embd=TINY_DIM, n_layer=TINY_LAYERS, n_head=heads, n_positions=TINY_POSITIONS,
                    n_inner=_ffn(spec))
    elif kind == "opt":
        proj = TINY_DIM if spec.arch().embed_dim == spec.dim else TINY_DIM // 2
        base.update(hidden_size=TINY_DIM, num_hidden_layers=TINY_LAYERS, num_attention_heads=heads,
                    ffn_dim=_ffn(spec), max_position_embeddings=TINY_POSITIONS, word_embed_proj_dim=proj)
    else:
        base.update(hidden_size=TINY_DIM, num_hidden_layers=TINY_LAYERS, num_attention_heads=heads,
                    num_key_value_heads=kv, intermediate_size=_ffn(spec), max_position_embeddings=TINY_POSITIONS)
        if spec.arch().head_dim * spec.num_heads != spec.dim:  # the real model sets head_dim apart from width
            base["head_dim"] = TINY_DIM // heads * 2
        if isinstance(base.get("sliding_window"), int):
            base["sliding_window"] = min(base["sliding_window"], SEQ_LEN // 2)  # still shorter than a sample
    return base


def tiny_model(spec: ModelSpec) -> tuple[ModelSpec, str, dict[str, Any] | None]:
    """(tiny spec, what `--model` takes for it, its Hugging Face config or None)."""
    if model_costs(spec).total_params <= KEEP_REAL_PARAMS and spec.seq_len >= SEQ_LEN:
        preset = next((n for n, s in SPEC_PRESETS.items() if s == spec), None)
        if preset is not None:
            return spec, preset, None
        if spec.hf_config is not None:  # read from a config.json: rehearsed from that config
            return spec, "config.json", dict(spec.hf_config)
    small = family_of(spec).rehearsal_preset
    if small is not None:
        return SPEC_PRESETS[small], small, None
    from chipfuse.model.configs import spec_from_config_dict

    raw = tiny_hf_config(spec)
    tiny = spec_from_config_dict(raw, name=f"{spec.name}-rehearsal", source=f"rehearsal of {spec.name}")
    return tiny, "config.json", raw


# ---------------------------------------------------------------------------------------------- the pool file


def _q(s: str) -> str:
    return json.dumps(s)  # a TOML basic string (JSON's escapes are TOML's)


def _num(x: float) -> str:
    return f"{x:.9g}"


def rehearse(pool: Pool, model: ModelSpec, *, max_devices: int = MAX_DEVICES, dtype: str = "bf16") -> Rehearsal:
    """The rehearsal of `pool` for training `model` (module docstring)."""
    picked = choose_devices(pool, max_devices, dtype)
    tiny, model_arg, hf_config = tiny_model(model)
    scale = model_costs(tiny).total_params / model_costs(model).total_params
    real = [d for d in picked if not d.emulated]
    top_rate = max((_rate(d, dtype) for d in real), default=1.0)
    ratio = {d.name: _rate(d, dtype) / top_rate for d in real}
    top = min(TOP_SPEED, SPEED_BUDGET / max(1e-9, sum(max(MIN_SPEED / TOP_SPEED, r) for r in ratio.values())))
    speed = {n: max(MIN_SPEED, top * r) for n, r in ratio.items()}
    cap = {d.name: usable(d.memory_bytes) * scale for d in real}
    state = model_costs(tiny).total_params * 16  # fp32 weights and grads, two fp32 Adam moments
    boost = max(1.0, HEADROOM * state / sum(cap.values())) if cap else 1.0
    notes = []
    if boost > 1:
        notes.append(f"the {len(real)} kept devices cannot hold what the pool's {len(pool.devices)} hold: caps raised "
                     f"x{boost:.2f} so that the tiny model fits them {HEADROOM:g} times over (memory pressure is "
                     "lower than on the real pool)")
    clamped = sorted(n for n, r in ratio.items() if top * r < MIN_SPEED)
    if clamped:
        notes.append(f"devices {clamped} run at speed {MIN_SPEED:g}, faster than their peaks' ratio (the planner "
                     "still sees their catalog figures)")
    kept = tuple(Kept(name=d.name, node=d.node, chip=d.chip.name,
                      speed=speed.get(d.name, d.emulation.speed if d.emulation else 1.0),
                      ratio=ratio.get(d.name, 1.0),
                      memory_bytes=int(cap[d.name] * boost) if d.name in cap else d.memory_bytes,
                      real_memory_bytes=usable(d.memory_bytes, emulated=d.emulated)) for d in picked)
    nodes = tuple(dict.fromkeys(d.node for d in picked))
    all_kinds = {_kind(d)[0] for d in pool.devices}
    left_out = tuple(sorted(all_kinds - {d.chip.name for d in picked}))
    intra = any(sum(1 for d in picked if d.node == n) > 1 for n in nodes)
    text = _pool_toml(pool, picked, kept, top, model.name)
    return Rehearsal(pool_name=pool.name, kept=kept, pool_toml=text, model=tiny, model_arg=model_arg,
                     hf_config=hf_config, real_model=model, memory_scale=scale, memory_boost=boost,
                     devices_in_pool=len(pool.devices), kinds_left_out=left_out, nodes_kept=nodes,
                     intra_node_link=intra, inter_node_link=len(nodes) > 1, dtype=dtype,
                     global_batch=max(8, 2 * len(picked)), notes=tuple(notes))


def _pool_toml(pool: Pool, picked: list[Device], kept: tuple[Kept, ...], top: float, model: str) -> str:
    by_name = {k.name: k for k in kept}
    lines = [f"# Rehearsal of pool {pool.name!r} ({pool.source or 'built in'}) for {model}, written by",
             "# `chipfuse pool rehearse`: EMULATED devices (docs/emulation.md). Each kept chip is declared",
             "# with its catalog figures divided by its speed, so that the planner sees every device at its",
             f"# catalog figures x {top:.4g} while the runtime paces it to its speed (docs/planner.md).",
             f"name = {_q(pool.name + '-rehearsal')}",
             f"default_link = {{ bandwidth_gbit_s = {_num(pool.default_link.bandwidth * 8 / 1e9)}, "
             f"latency_ms = {_num(pool.default_link.latency_s * 1e3)} }}", ""]
    declared: dict[str, str] = {}
    """Device name -> the rehearsal's chip for it (one [[chip]] per kept chip)."""
    for d in picked:
        if d.emulated:
            continue
        k = by_name[d.name]
        name = declared[d.name] = f"{d.chip.name}@x{k.speed:.4g}"
        if sum(1 for v in declared.values() if v == name) > 1:
            continue
        f = top / k.speed  # declared x speed = catalog x top
        c = d.chip
        lines += ["[[chip]]", f"name = {_q(name)}", f"vendor = {_q(c.vendor)}",
                  f"memory_gib = {_num(c.memory_bytes / GiB)}", f"tflops_bf16 = {_num(c.flops_bf16 * f / 1e12)}",
                  f"tflops_fp32 = {_num(c.flops_fp32 * f / 1e12)}", f"mem_bw_gbs = {_num(c.mem_bw * f / 1e9)}",
                  f"link_gbs = {_num(c.link_bw / 1e9)}", f"bf16 = {str(c.has_bf16).lower()}",
                  f"tensor_cores = {str(c.tensor_cores).lower()}", f"source = {_q(c.source or 'catalog')}",
                  f"note = {_q(f'rehearsal of {c.name}: catalog figures x {f:.4g} (speed {k.speed:.4g})')}", ""]
    for node in pool.nodes:
        mine = [d for d in picked if d.node == node.name]
        if not mine:
            continue
        bw, lat = node.group_link([d.name for d in mine]) if len(mine) > 1 else (node.intra_bandwidth,
                                                                                   node.intra_latency_s)
        lines += ["[[node]]", f"name = {_q(node.name)}", f"intra_gbs = {_num(bw / 1e9)}",
                  f"intra_latency_us = {_num(lat * 1e6)}"]
        for d in mine:
            k = by_name[d.name]
            chip = declared.get(d.name, d.chip.name)
            cap = "" if d.emulated and d.emulation and d.emulation.memory_bytes is None else \
                f", memory_gib = {_num(k.memory_bytes / GiB)}"
            lines += ["[[node.device]]", f"name = {_q(d.name)}", f"chip = {_q(chip)}",
                      f"emulate = {{ speed = {_num(k.speed)}{cap} }}"]
        lines.append("")
    nodes = [n.name for n in pool.nodes if any(d.node == n.name for d in picked)]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            bw, lat = link_between(pool, a, b)
            ln = pool.link(a, b)
            lines += ["[[link]]", f"nodes = [{_q(a)}, {_q(b)}]", f"bandwidth_gbit_s = {_num(bw * 8 / 1e9)}",
                      f"latency_ms = {_num(lat * 1e3)}"]
            if ln.curve:
                pts = ", ".join(f"[{int(n)}, {_num(min(v, bw) * 8 / 1e9)}]" for n, v in ln.curve)
                lines.append(f"by_size = [{pts}]")
            lines.append("")
    return "\n".join(lines)
