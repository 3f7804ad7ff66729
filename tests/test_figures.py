"""Figures that cannot lie: a ratio past its limit is a fault with a reason, and the standalone
throughput behind fusion efficiency is measured as the job runs a micro-batch."""

import time

import pytest

from chipfuse.report.figures import checked_fields, checked_ratio
from chipfuse.runtime.emulate import Pacer
from chipfuse.runtime.standalone import standalone_tokens_per_s


def test_a_ratio_above_its_limit_is_a_fault_not_a_result():
    ok = checked_ratio(0.9, 1.0, hi=1.0, what="fusion efficiency")
    assert ok.value == pytest.approx(0.9) and ok.fault is None and checked_fields("e", ok) == {"e": ok.value}
    bad = checked_ratio(8330, 5094 + 1400, hi=1.0, what="fusion efficiency", why="a job cannot outrun its devices")
    assert bad.value is None
    assert "measurement fault: fusion efficiency came out 1.283, above its limit 1" in bad.fault
    assert "a job cannot outrun its devices" in bad.fault and "not a result" in bad.fault
    assert checked_fields("e", bad) == {"e": None, "e_fault": bad.fault} and bad.text().startswith("n/a (")
    assert checked_ratio(1.0, 0.0, what="x").value is None  # nothing measured: no figure, not a crash
    assert checked_ratio(float("nan"), 1.0, what="x").value is None


def test_standalone_throughput_is_warmed_paced_and_a_median():
    calls = []

    def micro_batch(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            time.sleep(0.2)  # a cold first call: must not count
        elif len(calls) == 4:
            time.sleep(0.1)  # one descheduled micro-batch: the median ignores it

    pacer = Pacer(speed=0.5, unit_s=0.002, slack=1.0)  # 4 ms per sample, as the job pads it
    tps = standalone_tokens_per_s(micro_batch, micro_batch_size=2, seq_len=100, samples=4, pacer=pacer)
    assert calls == [2] * 6  # one warm-up, then max(5, 4 / 2) timed micro-batches of the job's size
    # 100 tokens per 4 ms-sample = 25,000 tok/s; sleep overshoot makes it a little slower, never faster.
    assert 18_000 < tps <= 25_000
