"""Broken inputs, N per kind: how many are refused cleanly, how many crash, how many hang.

Each input is one of the project's own good ones (examples/*.toml pools, plans as
`Plan.to_dict` writes them, a profile, GPT-2 and Llama configs, a checkpoint manifest) broken in
1-3 places at random (tests/fuzz_inputs.py), then loaded as chipfuse loads it; pools and plans
also go through `chipfuse pool show` and `chipfuse plan --evaluate`. Targets: crashes 0, hangs 0.
A load that takes more than --bound-s seconds counts as a hang. Timings are not the figure here,
so the host's load does not matter.

    .venv/bin/python benchmarks/fuzz.py [--n 500] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fuzz_inputs: the same mutations as the tests

from chipfuse.report.output import console, table, write_json  # noqa: E402
from tests.fuzz_inputs import KINDS, cli, good_inputs, loader, mutate, verdict  # noqa: E402


class _Hang(Exception):
    pass


def _bounded(call, bound_s: float) -> str:  # type: ignore[no-untyped-def]
    def alarm(signum, frame):  # type: ignore[no-untyped-def]
        raise _Hang

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, bound_s)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return verdict(call)
    except _Hang:
        return "hang"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="broken inputs per kind (and per CLI path)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bound-s", type=float, default=20.0, help="a load taking longer is a hang")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    good = good_inputs()
    paths = [(k, "loader") for k in KINDS] + [("pool", "chipfuse pool show"), ("plan", "chipfuse plan --evaluate")]
    res: dict = {"n": args.n, "seed": args.seed, "bound_s": args.bound_s, "kinds": {}}
    t0 = time.perf_counter()
    for kind, how in paths:
        counts: collections.Counter = collections.Counter()
        examples: dict[str, list[str]] = {}
        slowest = 0.0
        for i in range(args.n):
            doc, said = mutate(good[kind][i % len(good[kind])], rnd)
            with tempfile.TemporaryDirectory() as d:
                call = loader(kind, doc, Path(d)) if how == "loader" else cli(kind, doc, Path(d))
                t = time.perf_counter()
                v = _bounded(call, args.bound_s)
                slowest = max(slowest, time.perf_counter() - t)
            key = "crash" if v.startswith("crash") else v
            counts[key] += 1
            if key in ("crash", "hang") and len(examples.setdefault(key, [])) < 5:
                examples[key].append(f"{'; '.join(said)} -> {v[:300]}")
        res["kinds"][f"{kind} ({how})"] = {
            "tried": args.n, "clean_refusals": counts["refused"], "accepted": counts["ok"],
            "crashes": counts["crash"], "hangs": counts["hang"], "slowest_s": slowest,
            "examples": examples,
        }
    res["tried"] = sum(v["tried"] for v in res["kinds"].values())
    res["crashes"] = sum(v["crashes"] for v in res["kinds"].values())
    res["hangs"] = sum(v["hangs"] for v in res["kinds"].values())
    res["clean_refusals"] = sum(v["clean_refusals"] for v in res["kinds"].values())
    res["wall_s"] = time.perf_counter() - t0
    console.print(table(f"broken inputs, {args.n} per kind (targets: 0 crashes, 0 hangs)",
                        ["input", "tried", "refused cleanly", "accepted", "crashes", "hangs", "slowest s"],
                        [[k, v["tried"], v["clean_refusals"], v["accepted"], v["crashes"], v["hangs"],
                          f"{v['slowest_s']:.2f}"] for k, v in res["kinds"].items()]))
    for k, v in res["kinds"].items():
        for what, lines in v["examples"].items():
            for line in lines:
                console.print(f"{what}: {k}: {line}", markup=False)
    write_json(args.json, res)
    sys.exit(1 if res["crashes"] or res["hangs"] else 0)


if __name__ == "__main__":
    main()
