"""The picture of a simulated step: one row per stage group, forward / backward / sync / optimizer."""

from __future__ import annotations

from pathlib import Path

from chipfuse.sim.pipeline import SimResult

COLORS = {"fwd": "#4C72B0", "bwd": "#DD8452", "sync": "#55A868", "optimizer": "#8C8C8C"}


def save_timeline(sim: SimResult, path: str | Path, *, title: str = "", max_rows: int = 40) -> int:
    """Draw the first `max_rows` stage groups; returns how many rows were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, ...]] = []
    for e in sim.events:
        if e.devices not in rows:
            rows.append(e.devices)
    rows = rows[:max_rows]
    index = {r: k for k, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.5))
    spans: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in sim.events:
        k = index.get(e.devices)
        if k is not None and e.kind in COLORS and e.end_s > e.start_s:
            spans.setdefault((k, e.kind), []).append((e.start_s, e.end_s - e.start_s))
    for (k, kind), xs in spans.items():
        ax.broken_barh(xs, (k - 0.4, 0.8), facecolors=COLORS[kind], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] if len(r) == 1 else f"{r[0]} +{len(r) - 1}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds into the step")
    ax.set_title(title or f"simulated step: {sim.step_s:.3g} s")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(rows)
