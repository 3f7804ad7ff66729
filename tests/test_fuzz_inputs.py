"""Every input kind, broken at random in 1-3 places, ends in success or a one-line refusal: never
another exception, never a hang (benchmarks/fuzz.py runs the same at N >= 500 per kind)."""

import random
import re
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_inputs import KINDS, cli, good_inputs, loader, mutate, verdict

GOOD = good_inputs()
BOUND_S = 10
"""No load may take longer; the slowest good input loads in well under a second."""


def _bounded(call):  # type: ignore[no-untyped-def]
    def alarm(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"took more than {BOUND_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(BOUND_S)
    try:
        return verdict(call)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", KINDS)
def test_every_good_input_loads(kind, tmp_path):
    for doc in GOOD[kind]:
        assert _bounded(loader(kind, doc, tmp_path)) == "ok", (kind, doc)


# Few examples per kind: the suite stays fast; benchmarks/fuzz.py is the long run.
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one(feed, kind: str, rnd: random.Random, which: int) -> None:  # type: ignore[no-untyped-def]
    doc, said = mutate(GOOD[kind][which % len(GOOD[kind])], rnd)
    with tempfile.TemporaryDirectory() as d:
        v = _bounded(feed(kind, doc, Path(d)))
    assert v in ("ok", "refused"), (v, said)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(rnd=st.randoms(use_true_random=False), which=st.integers(0, 10))
def test_broken_input_is_refused_cleanly(kind, rnd: random.Random, which: int):
    _one(loader, kind, rnd, which)


@pytest.mark.parametrize("kind", ["pool", "plan"])
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False), which=st.integers(0, 10))
def test_broken_input_through_the_cli(kind, rnd: random.Random, which: int):
    """`chipfuse pool show` and `chipfuse plan --evaluate` on the same broken files."""
    _one(cli, kind, rnd, which)


def test_absurd_sizes_are_refused_at_once(tmp_path):
    """A count of 2**63, 1e308 GiB, a sequence of 10**9: refused by the range check, in no time."""
    import json

    from chipfuse.cluster.pool import pool_from_dict
    from chipfuse.errors import ChipfuseError
    from chipfuse.plan.plan import Plan

    base = {"node": [{"name": "n", "device": [{"name": "d", "chip": "cpu"}]}]}
    for field, value, msg in (("count", 2**63, "count: found 9223372036854775808, out of range"),
                              ("memory_gib", 1e308, "memory_gib: found 1e+308, out of range"),
                              ("count", float("nan"), "count: found nan, expected a whole number")):
        raw = json.loads(json.dumps(base))
        raw["node"][0]["device"][0][field] = value
        with pytest.raises(ChipfuseError, match=re.escape(f"<pool>: node[0].device[0].{msg}") + ".*Fix"):
            _raise(lambda r=raw: pool_from_dict(r))
    plan = json.loads(json.dumps(GOOD["plan"][0]))
    plan["model"]["seq_len"] = 10**9
    with pytest.raises(ChipfuseError, match=r"<plan>: model.seq_len: found 1000000000, out of range.*Fix"):
        _raise(lambda: Plan.from_dict(plan))


def _raise(call):  # type: ignore[no-untyped-def]
    """Run under the time bound, re-raising what it raised."""
    def alarm(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(2)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_bad_command_line_values_end_in_one_line(capsys):
    from chipfuse.cli import main

    for argv in (["plan", "--pool", "builtin", "--model", "tiny", "--global-batch", str(2**63), "--seq-len", "32"],
                 ["plan", "--pool", "builtin", "--model", "tiny", "--global-batch", "8", "--seq-len", "nan"],
                 ["plan", "--pool", "builtin", "--model", "tiny", "--global-batch", "-3", "--seq-len", "32"],
                 ["train", "--steps", "0"], ["train", "--unit-s", "inf"], ["pool", "show"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "error:" in err and "Fix:" in err, (argv, err)
