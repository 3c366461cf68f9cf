"""A test killed by its timeout or by a crash reports the time it really ran, in
``--durations`` and in junitxml: those are the tests --durations exists for."""

from __future__ import annotations

import re

import pytest

from conftest import read_junit


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_killed_and_crashed_tests_report_how_long_they_ran(pytester, run, mode) -> None:
    pytester.makepyfile(test_slow="""
        import os, time
        import pytest

        @pytest.mark.isolated(timeout=2)
        def test_hangs():
            time.sleep(3600)

        def test_crashes_late():
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                pass
            os.kill(os.getpid(), 11)
    """)
    result = run("--isolate", f"--isolate-mode={mode}", "--durations=0", "-vv", "--junitxml=out.xml")
    result.assert_outcomes(failed=2)
    durations = {m["nodeid"]: float(m["seconds"]) for m in re.finditer(
        r"^(?P<seconds>[\d.]+)s call +(?P<nodeid>\S+)$", result.stdout.str(), re.MULTILINE)}
    # Lower bounds only: the timeout counts from the container's start, and the busy
    # loop ran 0.5 s by the test's own clock; a loaded machine only adds to both.
    assert durations["test_slow.py::test_hangs"] >= 2.0
    assert durations["test_slow.py::test_crashes_late"] >= 0.5
    times = {case.name: float(case.element.get("time")) for case in read_junit(pytester.path / "out.xml").cases}
    assert times["test_hangs"] >= 2.0
    assert times["test_crashes_late"] >= 0.5
