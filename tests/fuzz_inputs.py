"""Broken inputs made from the project's own good ones, and the loaders they are fed to.

Shared by tests/test_fuzz_inputs.py (hypothesis drives the choices) and benchmarks/fuzz.py (a
seeded random.Random does, N per kind). Each good input is broken in 1-3 places: a field set to a
wrong or absurd value (a list where a number goes, NaN, inf, 2**63, 1e308, negative, empty
string...), a key removed, or an unknown key added. The verdict of one load is "ok" (accepted),
"refused" (a ChipfuseError of one line) or "crash: ..." (anything else, the bug being hunted);
a load that outlasts its time bound is a "hang".
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("pool", "plan", "profile", "model_config", "manifest")

BAD_VALUES: tuple[Any, ...] = (
    None, "", "x", "1", [], [1, 2], {}, {"a": 1}, -1, 0, 1, 2**63, 10**9, -(2**63), 1e308, -1e308, 0.5,
    float("nan"), float("inf"), float("-inf"), True, False, [[1]], "A100", 1e-300,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON-like tree (dict keys and list indices), the root excluded."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _containers(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if isinstance(doc, dict) else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out += _containers(v, (*prefix, k))
    return out


def _at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate(doc: Any, rnd: random.Random) -> tuple[Any, list[str]]:
    """A copy of `doc` broken in 1-3 places, and a description of each break."""
    doc = copy.deepcopy(doc)
    said = []
    for _ in range(rnd.randint(1, 3)):
        op = rnd.choice(("set", "set", "set", "delete", "unknown"))
        paths = _paths(doc)
        if op == "unknown" or not paths:
            where = rnd.choice(_containers(doc) or [()])
            if isinstance(_at(doc, where), dict):
                _at(doc, where)["bogus_field"] = rnd.choice(BAD_VALUES)
                said.append(f"unknown key at {where}")
            continue
        path = rnd.choice(paths)
        parent = _at(doc, path[:-1])
        if op == "delete":
            del parent[path[-1]]
            said.append(f"deleted {path}")
        else:
            value = copy.deepcopy(rnd.choice(BAD_VALUES))
            parent[path[-1]] = value
            said.append(f"{path} = {value!r}")
    return doc, said


# ------------------------------------------------------------------------------------------------
# The good inputs


def good_inputs() -> dict[str, list[dict]]:
    from chipfuse.cluster.builtin import default_pool
    from chipfuse.model.spec import SPEC_PRESETS
    from chipfuse.plan.plan import Plan, Replica, Stage, SyncPlan, data_parallel_plan

    pools = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "examples").glob("*.toml"))]
    builtin = default_pool()
    small = SPEC_PRESETS["small"]
    dp = data_parallel_plan(small, {"fast": 32, "mid": 16, "slow": 8}, seq_len=128, micro_batch_size=8,
                            strategy="chipfuse", pool=builtin.name)
    pipe = Plan(model=small, global_batch=8, seq_len=64, replicas=(
        Replica(stages=(Stage(devices=("fast",), first_layer=0, num_layers=3),
                        Stage(devices=("mid",), first_layer=3, num_layers=1)), batch_share=6, micro_batch_size=2),
        Replica(stages=(Stage(devices=("slow",), first_layer=0, num_layers=4),), batch_share=2, micro_batch_size=2)),
        sync=SyncPlan(islands=(("fast", "mid"), ("slow",)), outer_every=4), pool=builtin.name)
    plans = [json.loads(dp.to_json()), json.loads(pipe.to_json())]
    profile = {
        "flops": {"fast": {"fp32": 2e10, "bf16": 2e10}, "slow": {"fp32": 5e9, "bf16": 5e9}},
        "layer_times": {"fast": [{"micro_batch_size": 1, "seq_len": 128, "fwd_s": 0.002, "bwd_s": 0.004}]},
        "links": [{"a": "host0", "b": "host0", "bandwidth": 2e9, "latency_s": 5e-5}],
        "source": "test", "emulated": True,
    }
    configs = [
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 64},
        {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 64},
    ]
    manifest = {"format": 1, "step": 3, "written_unix_s": 1.7e9, "world_size": 2, "plan": plans[0],
                "extra": {"shares": {"fast": 32}}, "files": {"weights.bin": {"sha256": "", "bytes": 0}}}
    return {"pool": pools, "plan": plans, "profile": [profile], "model_config": configs, "manifest": [manifest]}


# ------------------------------------------------------------------------------------------------
# Feeding one to its loader


def _write_manifest_checkpoint(tmp: Path, manifest: Any) -> Path:
    """A checkpoint directory whose one data file matches the good manifest's entry."""
    import hashlib

    ck = tmp / "step_000003"
    ck.mkdir(exist_ok=True)
    data = b"weights"
    (ck / "weights.bin").write_bytes(data)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        entry = manifest["files"].get("weights.bin")
        if isinstance(entry, dict) and entry.get("sha256") == "":
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            if entry.get("bytes") == 0:
                entry["bytes"] = len(data)
    (ck / "manifest.json").write_text(json.dumps(manifest))
    return ck


def loader(kind: str, doc: Any, tmp: Path) -> Callable[[], Any]:
    """A call that loads `doc` as `kind` the way chipfuse does (from a file in `tmp`)."""
    if kind == "pool":
        from chipfuse.cluster.pool import load_pool

        f = tmp / "pool.toml"
        f.write_text(to_toml(doc))
        return lambda: load_pool(f)
    if kind == "plan":
        from chipfuse.plan.plan import Plan

        f = tmp / "plan.json"
        f.write_text(json.dumps(doc))
        return lambda: Plan.from_json(f)
    if kind == "profile":
        from chipfuse.plan.profile import Profile

        f = tmp / "profile.json"
        f.write_text(json.dumps(doc))
        return lambda: Profile.load(f)
    if kind == "model_config":
        from chipfuse.model.configs import from_hf_config

        d = tmp / "cfg"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(doc))
        return lambda: from_hf_config(d / "config.json")
    if kind == "manifest":
        from chipfuse.runtime.endure.checkpoint import verify

        ck = _write_manifest_checkpoint(tmp, doc)
        return lambda: verify(ck)
    raise ValueError(kind)


def cli(kind: str, doc: Any, tmp: Path) -> Callable[[], Any]:
    """`chipfuse pool show` on a broken pool, `chipfuse plan --evaluate` on a broken plan."""
    from chipfuse.cli import main

    if kind == "pool":
        f = tmp / "pool.toml"
        f.write_text(to_toml(doc))
        return lambda: main(["pool", "show", str(f), "--json", str(tmp / "out.json")])
    if kind == "plan":
        f = tmp / "plan.json"
        f.write_text(json.dumps(doc))
        return lambda: main(["plan", "--pool", "builtin", "--evaluate", str(f), "--json", str(tmp / "out.json")])
    raise ValueError(kind)


def to_toml(doc: Any) -> str:
    """TOML text for a pool dict; what TOML cannot say (null, a non-table root, ints past 64 bits)
    becomes a string so the loader still sees a wrong value."""
    import tomli_w

    def clean(v: Any) -> Any:
        if v is None:
            return "null"
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    body = clean(doc)
    return tomli_w.dumps(body if isinstance(body, dict) else {"value": body})


def verdict(call: Callable[[], Any]) -> str:
    """'ok', 'refused' (a one-line ChipfuseError or a CLI exit 2 with one line) or 'crash: ...'."""
    from chipfuse.errors import ChipfuseError

    try:
        rc = call()
    except ChipfuseError as e:
        return "refused" if "\n" not in str(e) else f"crash: multi-line error {str(e)!r}"
    except SystemExit as e:  # argparse
        return "refused" if e.code == 2 else f"crash: exit {e.code}"
    except Exception as e:  # noqa: BLE001 - what the fuzzing hunts
        return f"crash: {type(e).__name__}: {e}"
    if isinstance(rc, int) and not isinstance(rc, bool):
        return "ok" if rc == 0 else "refused" if rc == 2 else f"crash: exit {rc}"
    return "ok"


def finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
