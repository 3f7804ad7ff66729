"""Writing results: every command that produces figures writes them as JSON too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False, highlight=False)


def write_json(path: str | Path | None, obj: Any) -> None:
    """Write atomically: a reader never sees half a file, and a failed write keeps the old one."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)


MAX_ROWS = 200
"""Rows a terminal table shows; the rest are counted in a last row (--json has them all). A pool of
65,536 devices must not take minutes to print."""


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows[:MAX_ROWS]:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r])
    if len(rows) > MAX_ROWS:
        t.add_row(f"... {len(rows) - MAX_ROWS} more rows (all in --json)", *[""] * (len(columns) - 1))
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
