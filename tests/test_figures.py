"""Figures that cannot lie: a ratio past its limit is a fault with a reason, and the standalone
throughput behind fusion efficiency is measured as the job runs a micro-batch."""


import pytest

from chipfuse.report.figures import checked_fields, checked_ratio


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


