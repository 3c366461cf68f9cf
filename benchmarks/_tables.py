"""The result tables, rendered as plain text (stdout) or Markdown (docs/performance.md)."""

from __future__ import annotations

from _report import Analysis, med

MIB = 1024 * 1024


class Notes:
    """Numbered footnotes, shared by all tables of one report."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def build(a: Analysis, workloads, unavailable: dict[str, str], memory_note: str | None,
          cap_note: str) -> tuple[list[tuple[str, list[str], list[list[str]]]], Notes]:
    notes = Notes()
    shown = [w for w in workloads if w.kind != "one-id"]
    tables = []

    def row_start(runner) -> list[str] | None:
        reason = unavailable.get(runner.key)
        if reason:
            return [runner.label, reason]  # a short row: the reason spans the row
        return None

    rows = []
    for r in a.runners:
        row = row_start(r)
        if row is None:
            row = [r.label]
            for w in shown:
                cell = a.cells[(r.key, w.key)]
                if cell.skipped == "capped":
                    row.append("—" + notes.mark(cap_note))
                elif cell.skipped is not None:
                    row.append("")
                elif not cell.walls:
                    row.append("failed" + notes.mark(f"{r.label}, {w.label}: {cell.errors[0]}"))
                else:
                    text = f"{cell.median:.2f} ({min(cell.walls):.2f}–{max(cell.walls):.2f})"
                    if cell.errors:
                        text += notes.mark(f"{r.label}, {w.label}: {len(cell.errors)} of "
                                           f"{a.reps} runs failed, e.g. {cell.errors[0]}")
                    row.append(text)
        rows.append(row)
    tables.append((f"Wall time of the whole run, seconds: median (min–max) of {a.reps} runs",
                   ["runner"] + [w.label for w in shown], rows))

    rows = []
    for r in a.runners:
        if r.key in unavailable:
            continue
        raw, over, pair = a.per_test(r.key)
        heavy = a.heavy_per_test(r.key)
        start = a.startup(r.key)
        mem = a.cells.get((r.key, "memory"))
        rows.append([r.label, _ms(over), _ms(raw), pair, _ms(start), _ms(heavy),
                     f"{med(mem.test_rss) / 1024:.1f}" if mem and mem.test_rss else "",
                     f"{med(mem.test_private) / 1024:.1f}" if mem and mem.test_private else ""])
    tables.append(("Per test and start-up (ms); memory of one test's process (MiB, median)",
                   ["runner", "per-test overhead vs plain", "per-test wall (slope)", "slope over N",
                    "start-up vs plain (N=1)", "per-test overhead, heavy module", "test VmRSS",
                    "test unique (private)"], rows))

    if memory_note is None:
        rows = []
        for r in a.runners:
            if r.key in unavailable:
                continue
            row = [r.label]
            for w in shown:
                cell = a.cells[(r.key, w.key)]
                row.append(f"{med(cell.peaks) / MIB:.0f}" if cell.peaks and cell.walls else "")
            rows.append(row)
        tables.append(("Peak memory of the whole run (its own cgroup, memory.max_usage_in_bytes), "
                       "MiB, median", ["runner"] + [w.label for w in shown], rows))
    return tables, notes


def render_text(tables, notes: Notes) -> str:
    out = []
    for title, header, rows in tables:
        full = [row for row in rows if len(row) == len(header)]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *full)]
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        out.append("")
    out += [f"[{i + 1}] {text}" for i, text in enumerate(notes.items)]
    return "\n".join(out)


def render_markdown(tables, notes: Notes) -> str:
    out = []
    for title, header, rows in tables:
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row + [""] * (len(header) - len(row)))
                + " |" for row in rows]
        out.append("")
    out += [f"- [{i + 1}] {text.replace('|', '/')}" for i, text in enumerate(notes.items)]
    return "\n".join(out)
