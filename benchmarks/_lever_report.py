"""The levers benchmark's report: its tables, in text and in markdown."""

from __future__ import annotations

import datetime
import os
import platform
import statistics


def fmt(samples: list, unit: str = "time") -> str:
    value = statistics.median(samples)
    if unit == "count":
        return f"{value:,.1f}" if value < 10 else f"{value:,.0f}"
    if abs(value) < 1e-3:
        return f"{value * 1e6:.0f} µs"
    return f"{value * 1e3:.{2 if abs(value) < 0.01 else 1 if abs(value) < 0.1 else 0}f} ms"

def spread(samples: list, unit: str) -> str:
    """median (p10–p90)"""
    deciles = statistics.quantiles(samples, n=10)
    low, high = fmt([deciles[0]], unit), fmt([deciles[-1]], unit)
    if unit == "time" and low.split()[1] == high.split()[1]:
        low = low.split()[0]
    return f"{fmt(samples, unit)} ({low}–{high})"

def describe(lever) -> dict[str, str]:
    """title, A, B and the rest, from a lever's docstring."""
    lines = [" ".join(line.split()) for line in lever.__doc__.strip().splitlines()]
    parts = {"title": lines[0], "A": "", "B": "", "more": ""}
    for line in lines[1:]:
        key = line[0] if line[:2] in ("A:", "B:") else "more"
        parts[key] = (parts[key] + " " + line.removeprefix(f"{key}:")).strip()
    return parts

def table(results: list) -> list[list[str]]:
    cells = []
    for number, lever, outcome in results:
        title = f"{number}. {describe(lever)['title']}"
        if isinstance(outcome, str):
            cells.append([title, "—", "—", "—", f"not run: {outcome}"])
        for r in outcome if isinstance(outcome, list) else []:
            ma, mb = statistics.median(r["a"]), statistics.median(r["b"])
            cells.append([f"{title}: {r['metric']}", spread(r["a"], r["unit"]), spread(r["b"], r["unit"]),
                          f"{mb / ma:.2f}×" if ma > 0 else "—", r["note"]])
    return cells

def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/self/mounts") as f:
        types = {m.split()[1]: m.split()[2] for m in f}
    cgroups = ("v2" if types.get("/sys/fs/cgroup") == "cgroup2" else
               "v1 (hybrid: cgroup2 also mounted)" if "/sys/fs/cgroup/unified" in types else "v1")
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return (f"{cpu}, {os.cpu_count()} cores, kernel {platform.release()}, cgroups {cgroups}, "
            f"as {who}, python {platform.python_version()}")

def markdown(results: list, took: float) -> str:
    lines = [f"Run on {datetime.datetime.now():%Y-%m-%d %H:%M} with `python benchmarks/levers.py` "
             f"(took {took:.0f} s) on {machine()}. Each cell: median (p10–p90) per operation, "
             "A and B interleaved.", "",
             "| lever | A (without) | B (with) | B vs A | notes |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table(results)]
    lines += ["", "What A and B are:", ""]
    for number, lever, _ in results:
        d = describe(lever)
        lines.append(f"{number}. **{d['title']}**. A: {d['A']} B: {d['B']}" + (f" {d['more']}" if d["more"] else ""))
    return "\n".join(lines)

def text(cells: list[list[str]]) -> str:
    cells = [["lever", "A (without)", "B (with)", "B/A", "notes"]] + cells
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in cells)
