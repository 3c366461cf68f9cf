"""From the timed cells to the derived figures, the targets and the tables."""

from __future__ import annotations

import dataclasses
import re
import statistics

from _measure import first_problem

HOST_LINE = re.compile(
    r"container host \((?P<mode>[\w-]+) mode, image (?P<image>[^)]*)\): started in "
    r"(?P<start>[\d.]+)\s*s(?:, (?P<tests>\d+) tests collected)?(?:[^\n]*?RSS (?P<rss>[\d.]+)\s*MiB)?")
PASSED = re.compile(r"(\d+) passed")
FAILED = re.compile(r"(\d+) (?:failed|errors?)\b")


@dataclasses.dataclass
class Cell:
    runner: str
    workload: str
    skipped: str | None = None  # "capped", "" (not applicable) or a reason
    walls: list[float] = dataclasses.field(default_factory=list)
    peaks: list[int] = dataclasses.field(default_factory=list)  # bytes
    errors: list[str] = dataclasses.field(default_factory=list)
    host_starts: list[float] = dataclasses.field(default_factory=list)
    host_rss: list[float] = dataclasses.field(default_factory=list)  # MiB
    test_rss: list[int] = dataclasses.field(default_factory=list)  # KiB, one per test
    test_private: list[int] = dataclasses.field(default_factory=list)  # KiB

    @property
    def median(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def spread(self) -> float | None:
        if len(self.walls) < 2:
            return None
        return (max(self.walls) - min(self.walls)) / statistics.median(self.walls)


def check_output(text: str, expected: int) -> str | None:
    """Why a run's output shows it did not run ``expected`` passing tests, or None."""
    failed = sum(int(n) for n in FAILED.findall(text[-3000:]))
    passed = PASSED.findall(text[-3000:])
    if failed:
        return f"{failed} tests failed or errored, e.g. {first_problem(text)}"
    if not passed or int(passed[-1]) != expected:
        return f"expected {expected} passed, saw {passed[-1] if passed else 'none'}"
    return None


def parse_host_lines(text: str) -> tuple[list[float], list[float]]:
    starts, rss = [], []
    for m in HOST_LINE.finditer(text):
        starts.append(float(m["start"]))
        if m["rss"]:
            rss.append(float(m["rss"]))
    return starts, rss


def med(values):
    return statistics.median(values) if values else None


# -- derived figures -------------------------------------------------------------------

SLOPE_PAIRS = [(100, 1000), (10, 100), (1, 10)]


class Analysis:
    def __init__(self, cells: dict[tuple[str, str], Cell], runners, reps: int) -> None:
        self.cells = cells
        self.runners = runners
        self.reps = reps

    def m(self, runner: str, workload: str) -> float | None:
        cell = self.cells.get((runner, workload))
        return cell.median if cell else None

    def slope(self, runner: str, a: str, b: str, tests: int) -> float | None:
        ma, mb = self.m(runner, a), self.m(runner, b)
        return None if ma is None or mb is None else (mb - ma) / tests

    def per_test(self, runner: str) -> tuple[float | None, float | None, str]:
        """(raw slope, slope minus plain's, which slope) on the trivial suites, seconds."""
        for lo, hi in SLOPE_PAIRS:
            raw = self.slope(runner, f"n{lo}", f"n{hi}", hi - lo)
            base = self.slope("plain", f"n{lo}", f"n{hi}", hi - lo)
            if raw is not None and base is not None:
                return raw, raw - base, f"{lo}→{hi}"
        return None, None, ""

    def heavy_per_test(self, runner: str) -> float | None:
        raw = self.slope(runner, "heavy10", "heavy100", 90)
        base = self.slope("plain", "heavy10", "heavy100", 90)
        return None if raw is None or base is None else raw - base

    def startup(self, runner: str) -> float | None:
        mine, plain = self.m(runner, "n1"), self.m("plain", "n1")
        return None if mine is None or plain is None else mine - plain

    def noise(self) -> tuple[float | None, float | None, float | None]:
        """Median and largest (max-min)/median over all cells, and plain pytest's median."""
        spreads = [c.spread for c in self.cells.values() if c.spread is not None]
        plain = [c.spread for c in self.cells.values() if c.runner == "plain" and c.spread is not None]
        return med(spreads), (max(spreads) if spreads else None), med(plain)

    def host_startups(self, runner: str) -> list[tuple[str, float, float | None]]:
        out = []
        for (r, w), cell in self.cells.items():
            if r == runner and cell.host_starts:
                out.append((w, med(cell.host_starts), med(cell.host_rss)))
        return out

    def targets(self) -> list[tuple[str, str]]:
        """(PASS|FAIL|n/a, text) for each target."""
        ms = lambda s: f"{s * 1000:.1f} ms" if s is not None else "n/a"  # noqa: E731
        out = []
        _, ours, pair = self.per_test("default")
        _, fork, _ = self.per_test("forkonly")
        if ours is None or fork is None:
            out.append(("n/a", "default-mode per-test overhead ≤ 1.5 × fork-only's: not measured"))
        else:
            out.append((_verdict(ours <= 1.5 * fork),
                        f"default-mode per-test overhead ≤ 1.5 × fork-only's: {ms(ours)} vs "
                        f"1.5 × {ms(fork)} = {ms(1.5 * fork)} (slope {pair})"))
        fresh, _, pair = self.per_test("fresh")
        one = self.m("plain", "one-id")
        if fresh is None or one is None:
            out.append(("n/a", "fresh per-test cost ≤ one plain `pytest NODEID` + 15 ms: not measured"))
        else:
            out.append((_verdict(fresh <= one + 0.015),
                        f"fresh per-test cost ≤ one plain `pytest NODEID` + 15 ms: {ms(fresh)} vs "
                        f"{ms(one)} + 15 ms (slope {pair})"))
        heavy, (_, trivial, _) = self.heavy_per_test("default"), self.per_test("default")
        if heavy is None or trivial is None:
            out.append(("n/a", "heavy-imports module: default per-test overhead ≤ trivial + 2 ms: "
                               "not measured"))
        else:
            out.append((_verdict(heavy <= trivial + 0.002),
                        f"heavy-imports module (≈ 150 MB): default per-test overhead ≤ trivial + 2 ms: "
                        f"{ms(heavy)} vs {ms(trivial)}"))
        for n in (1000, 100):
            x2, x0 = self.m("default", f"n{n}-x2"), self.m("default", f"n{n}")
            if x2 is not None and x0 is not None:
                out.append((_verdict(x2 / x0 <= 0.6),
                            f"-n 2 vs -n 0 wall, default mode, N={n}: {x2:.2f} s / {x0:.2f} s = "
                            f"{x2 / x0:.2f} (goal 0.5, PASS ≤ 0.6)"))
                break
        else:
            out.append(("n/a", "-n 2 vs -n 0 wall, default mode: not measured"))
        x2 = self.slope("default", "sleepy20-x2", "sleepy100-x2", 80)
        x0 = self.slope("default", "sleepy20", "sleepy100", 80)
        if x2 is not None and x0 is not None:
            out.append((_verdict(x2 / x0 <= 0.6),
                        f"-n 2 vs -n 0 per-test wall (slope 20→100), default mode, tests sleeping 50 ms "
                        f"(cores free): {ms(x2)} / {ms(x0)} = {x2 / x0:.2f} (goal 0.5, PASS ≤ 0.6)"))
        starts = self.host_startups("default")
        if starts:
            text = ", ".join(f"{w} {s:.2f} s" + (f" (RSS {r:.1f} MiB)" if r else "") for w, s, r in starts)
            out.append(("PASS", f"container host start-up reported: {text}"))
        elif any(c.walls for (r, _), c in self.cells.items() if r == "default"):
            out.append(("FAIL", "container host start-up reported: no `container host (...): "
                                "started in` line found in the default-mode runs"))
        else:
            out.append(("n/a", "container host start-up reported: the default mode did not run"))
        return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
