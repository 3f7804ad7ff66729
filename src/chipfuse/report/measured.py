"""What happened next to what the planner said would: step time, and the per-device timeline.

The prediction is the planner's own (chipfuse.plan.cost.predict, chipfuse.sim.pipeline.simulate)
for the same plan and pool, with a measured profile when one is given (`chipfuse profile`),
else catalog figures. The measured timeline comes from the workers: each forward and backward of
each micro-batch (paced to the emulated speed), the gradient sync and the optimizer step; the
gaps between them are time spent sending activations or waiting for a neighbour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chipfuse.cluster.pool import Pool
from chipfuse.plan.plan import Plan
from chipfuse.plan.profile import Profile
from chipfuse.report.figures import Checked, checked_fields, checked_ratio

COLORS = {"fwd": "#4C72B0", "bwd": "#DD8452", "compute": "#8172B2", "sync": "#55A868", "optimizer": "#8C8C8C"}
"""compute: forward and backward together, where a run records only per-step totals (data parallel)."""
WAIT_COLOR = "#E8E8E8"


def prediction_fields(plan: Plan, pool: Pool, profile: Profile | None, measured_step_s: float) -> dict[str, Any]:
    """predicted_step_s, measured_step_s and their relative error, for a run's summary."""
    from chipfuse.plan.cost import predict

    try:
        pred = predict(plan, pool, profile).step_s
    except Exception as e:  # a run that trained must still report; say why there is no prediction
        return {"predicted_step_s": None, "measured_step_s": measured_step_s, "prediction_error": None,
                "prediction_source": f"none ({type(e).__name__}: {e})"}
    # predicted / measured is a ratio of two times: never negative (report/figures.py).
    ratio = checked_ratio(pred, measured_step_s, what="predicted / measured step time", lo=0.0,
                          why="a step time is never negative")
    return {"predicted_step_s": pred, "measured_step_s": measured_step_s,
            **checked_fields("prediction_error", Checked(value=None if ratio.value is None else ratio.value - 1,
                                                         fault=ratio.fault)),
            "prediction_source": "profile" if profile is not None else "catalog"}


def measured_rows(summary: dict, metrics_rows: list[dict] | None = None) -> dict[str, list[tuple[str, float, float]]]:
    """Per device, (kind, start_s, end_s) of the last recorded step, from the step's start.

    Pipeline runs record every micro-batch; data-parallel runs record per-step totals only, so
    their row is compute from the start, then the gradient sync at the end of the step."""
    tl = summary.get("timeline")
    if tl:
        last = {d: steps[-1] for d, steps in tl.items() if steps}
        t0 = min((e[1] for evs in last.values() for e in evs), default=0.0)
        return {d: [(k, a - t0, b - t0) for k, a, b in evs] for d, evs in last.items()}
    if not metrics_rows:
        return {}
    row = metrics_rows[-1]
    out = {}
    for d, v in row["devices"].items():
        out[d] = [("compute", 0.0, v["compute_s"]), ("sync", row["step_s"] - v["comm_s"], row["step_s"])]
    return out


def save_measured_vs_predicted(measured: dict[str, list[tuple[str, float, float]]], plan: Plan, pool: Pool,
                               profile: Profile | None, path: str | Path, *, emulated: bool) -> None:
    """Two panels on one time axis: the measured step (top) and the simulator's (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chipfuse.sim.pipeline import simulate

    sim = simulate(plan, pool, profile)
    predicted: dict[str, list[tuple[str, float, float]]] = {}
    for e in sim.events:
        if e.kind in COLORS:
            for d in e.devices:
                predicted.setdefault(d, []).append((e.kind, e.start_s, e.end_s))
    devices = list(plan.devices)
    end_m = max((b for evs in measured.values() for _, _, b in evs), default=0.0)
    horizon = max(end_m, sim.step_s)
    fig, axes = plt.subplots(2, 1, figsize=(12, 0.5 * len(devices) * 2 + 2.5), sharex=True)
    label = " (EMULATED devices)" if emulated else ""
    for ax, rows, title in ((axes[0], measured, f"measured step: {end_m:.3g} s{label}"),
                            (axes[1], predicted, f"predicted by the simulator: {sim.step_s:.3g} s")):
        for k, d in enumerate(devices):
            evs = rows.get(d, [])
            span = max((b for _, _, b in evs), default=0.0)
            ax.broken_barh([(0.0, span)], (k - 0.4, 0.8), facecolors=WAIT_COLOR)
            for kind, color in COLORS.items():
                bars = [(a, b - a) for kk, a, b in evs if kk == kind and b > a]
                if bars:
                    ax.broken_barh(bars, (k - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(devices)))
        ax.set_yticklabels(devices, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, horizon * 1.02)
    axes[1].set_xlabel("seconds into the step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in [*COLORS.values(), WAIT_COLOR]]
    axes[0].legend(handles, [*COLORS, "sending / waiting"], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_run(plan: Plan, pool: Pool, summary: dict, *, summary_path: str | Path, profile_path: str | None,
               timeline_path: str | None, metrics_path: str | None) -> dict:
    """Add the prediction to a finished run's summary (rewritten at summary_path); draw the timeline."""
    import json

    from chipfuse.report.output import write_json

    profile = Profile.load(profile_path) if profile_path else None
    summary = {**summary, **prediction_fields(plan, pool, profile, summary["measured_step_s"])}
    write_json(summary_path, summary)
    if timeline_path:
        rows = None
        if metrics_path and Path(metrics_path).exists():
            rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
        save_measured_vs_predicted(measured_rows(summary, rows), plan, pool, profile, timeline_path,
                                   emulated=bool(summary.get("emulated")))
    return summary


def prediction_line(s: dict) -> str:
    label = " (EMULATED devices)" if s.get("emulated") else ""
    err = s.get("prediction_error")
    if s.get("predicted_step_s") is None:
        return f"step time: measured {s['measured_step_s'] * 1e3:.1f} ms{label}; no prediction: {s['prediction_source']}"
    return (f"step time: predicted {s['predicted_step_s'] * 1e3:.1f} ms ({s['prediction_source']}), measured "
            f"{s['measured_step_s'] * 1e3:.1f} ms{label}, relative error "
            + (f"{err:+.1%}" if err is not None else f"n/a ({s.get('prediction_error_fault', 'not measured')})"))
