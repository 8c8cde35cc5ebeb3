"""What the benchmarks print and keep: tables, ``target`` lines and ``benchmarks/results/*.json``.

Needs neither torch nor ComfyUI, so ``store_memory.py`` (no host) uses it too.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def median(values):
    return statistics.median(values)


def fit_exponent(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def table(header, rows) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def target_line(name: str, measured: float, goal: float, fmt: str = "{:.3f}") -> tuple[str, bool]:
    ok = measured <= goal
    return f"target {name}: {fmt.format(measured)} (goal <= {goal}) {'ok' if ok else 'MISS'}", ok


def write_json(name: str, payload: dict, host_attention: str = "default") -> Path:
    """Write ``benchmarks/results/<name>``; a run with a non-default host attention kernel gets its
    own file (``speed.host-pytorch.json``), so it never replaces the default run's results."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if host_attention != "default":
        stem, _, suffix = name.rpartition(".")
        name = f"{stem}.host-{host_attention}.{suffix}"
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def mb(n) -> str:
    return f"{n / 1e6:,.1f} MB"
