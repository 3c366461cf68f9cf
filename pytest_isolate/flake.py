"""Flakiness: a test run N times (``--isolate-flake=N``, or ``flake=N`` in its marker),
each run in a fresh container, reported once with its failure rate and a verdict.

- A run failed when any of its phases failed; a run that skipped counts apart.
- Verdict: stable (no run failed), broken (every run failed), flaky (both), or
  skipped (every run skipped).
- The rate comes with its 95% Wilson score interval: with few runs it is wide, as
  it should be (3/50 failed = 6% [2-16%]).
- The test's report is the first failing run's, whole (or the last run's when none
  failed), with a section saying the rate; its teardown report carries the figures
  as user properties, which junitxml writes as <properties> and which the summary
  and the JSON report (``--isolate-flake-report``) read, under xdist too.
- ``--isolate-flake-stop-early``: stop a test's runs once it both passed and failed
  (the verdict, flaky, cannot change any more).
"""

from __future__ import annotations

import json
import math
import os

import pytest

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
PREFIX = "isolate_flake_"
FIRST_FAILURE_CAP = 64 << 10  # of the first failure's text in the JSON report
SEVERITY = {"broken": 0, "flaky": 1, "skipped": 2, "stable": 3}


def wilson(failures: int, runs: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a failure rate: sound at 0 and at N of N."""
    if runs <= 0:
        return 0.0, 1.0
    rate = failures / runs
    z2 = Z95 * Z95
    centre = (rate + z2 / (2 * runs)) / (1 + z2 / runs)
    half = Z95 * math.sqrt(rate * (1 - rate) / runs + z2 / (4 * runs * runs)) / (1 + z2 / runs)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_outcome(reports: list[pytest.TestReport]) -> str:
    """passed, failed or skipped: one run's, from its reports (an xfail is a pass)."""
    if any(report.failed for report in reports):
        return "failed"
    if any(report.skipped and not hasattr(report, "wasxfail") for report in reports if report.when != "teardown"):
        return "skipped"
    return "passed"


class Tally:
    def __init__(self, asked: int) -> None:
        self.asked = asked
        self.runs = 0  # runs that did not skip
        self.failures = 0
        self.skipped = 0
        self.first_failure: int | None = None  # its run's number, from 1

    def add(self, outcome: str, number: int) -> None:
        if outcome == "skipped":
            self.skipped += 1
            return
        self.runs += 1
        if outcome == "failed":
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = number

    @property
    def verdict(self) -> str:
        if not self.runs:
            return "skipped"
        if not self.failures:
            return "stable"
        return "broken" if self.failures == self.runs else "flaky"

    def properties(self) -> list[tuple[str, object]]:
        low, high = wilson(self.failures, self.runs)
        return [(PREFIX + "verdict", self.verdict), (PREFIX + "runs", self.runs),
                (PREFIX + "failures", self.failures), (PREFIX + "skipped", self.skipped),
                (PREFIX + "rate", f"{self.failures / self.runs if self.runs else 0:.4f}"),
                (PREFIX + "interval", f"{low:.4f}-{high:.4f}"), (PREFIX + "asked", self.asked),
                (PREFIX + "first_failure", self.first_failure or 0)]


def describe(props: dict) -> str:
    """One line: 3/50 runs failed = 6% [2-16%]: flaky (of its properties)."""
    runs, failures = int(props[PREFIX + "runs"]), int(props[PREFIX + "failures"])
    skipped, asked = int(props[PREFIX + "skipped"]), int(props[PREFIX + "asked"])
    if not runs:
        return f"all {skipped} runs skipped: skipped"
    low, high = (float(x) for x in str(props[PREFIX + "interval"]).split("-"))
    text = (f"{failures}/{runs} runs failed = {_percent(failures / runs if runs else 0)} "
            f"[{_percent(low)}-{_percent(high)}]: {props[PREFIX + 'verdict']}")
    if skipped:
        text += f", {skipped} skipped"
    if runs + skipped < asked:
        text += f" (stopped early: {runs + skipped} of {asked} runs)"
    return text


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%" if value * 100 >= 1 or value == 0 else f"{value * 100:.1g}%"


def run(controller, item: pytest.Item, nextitem: pytest.Item | None, settings, services: list[dict],
        stop_early: bool) -> None:
    """Run ``item`` settings.flake times, each in a fresh container; log one run's
    reports with the tally (the first failing run's, else the last run's)."""
    from .replay import with_controller_teardown

    tally = Tally(settings.flake)
    kept: list[pytest.TestReport] = []
    for number in range(1, settings.flake + 1):
        reports: list[pytest.TestReport] = []
        # nextitem=item: the pytest process keeps what plain tests set up until the last run.
        controller.run(item, item, settings, services, log=reports.append)
        outcome = run_outcome(reports)
        tally.add(outcome, number)
        if tally.first_failure == number or tally.first_failure is None:
            kept = reports
        if stop_early and tally.verdict == "flaky":
            break
    if not kept or kept[-1].when != "teardown":  # cannot happen: every run ends with its teardown
        raise RuntimeError(f"pytest-isolate: the runs of {item.nodeid} left no teardown report")
    teardown = with_controller_teardown(item, kept[-1], nextitem)
    figures = tally.properties()
    teardown.user_properties = list(teardown.user_properties) + figures
    props = dict(figures)
    section = ("pytest-isolate flakiness", describe(props) + (
        f"; the report is run {tally.first_failure}'s" if tally.first_failure else ""))
    failed = next((report for report in kept[:-1] + [teardown] if report.failed), teardown)
    failed.sections.append(section)
    for report in kept[:-1] + [teardown]:
        item.ihook.pytest_runtest_logreport(report=report)


class Summary:
    """What the runs of each test came to, read from the logged reports (so the
    controller of an xdist run sees its workers' tests too)."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}
        self.first_failures: dict[str, str] = {}

    def logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.nodeid not in self.first_failures:
            self.first_failures[report.nodeid] = report.longreprtext[:FIRST_FAILURE_CAP]
        if report.when == "teardown":
            props = {name: value for name, value in report.user_properties if str(name).startswith(PREFIX)}
            if PREFIX + "verdict" in props:
                self.tests[report.nodeid] = props

    def lines(self) -> list[str]:
        ordered = sorted(self.tests.items(), key=lambda kv: (SEVERITY.get(kv[1][PREFIX + "verdict"], 9), kv[0]))
        counts = self.counts()
        lines = [f"{nodeid}: {describe(props)}" for nodeid, props in ordered]
        lines.append(", ".join(f"{counts[v]} {v}" for v in SEVERITY if counts[v]))
        return lines

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SEVERITY, 0)
        for props in self.tests.values():
            counts[props[PREFIX + "verdict"]] = counts.get(props[PREFIX + "verdict"], 0) + 1
        return counts

    def write(self, path: str) -> None:
        """The JSON report: every test's figures and its first failure's text."""
        tests = []
        for nodeid, props in sorted(self.tests.items()):
            low, high = (float(x) for x in str(props[PREFIX + "interval"]).split("-"))
            tests.append({
                "nodeid": nodeid, "verdict": props[PREFIX + "verdict"], "runs": int(props[PREFIX + "runs"]),
                "failures": int(props[PREFIX + "failures"]), "skipped": int(props[PREFIX + "skipped"]),
                "asked": int(props[PREFIX + "asked"]), "rate": float(props[PREFIX + "rate"]),
                "interval": [low, high], "first_failure_run": int(props[PREFIX + "first_failure"]) or None,
                "first_failure": self.first_failures.get(nodeid)})
        document = {"version": 1, "confidence": 0.95, "counts": self.counts(), "tests": tests}
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
