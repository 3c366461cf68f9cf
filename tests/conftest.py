"""Shared helpers: every test here runs a real pytest, whose tests run in real
containers on this machine (no mocks of the kernel)."""

from __future__ import annotations

import os
import time

import pytest

pytest_plugins = ["pytester"]

IS_ROOT = os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root: runs only when pytest runs as root")
    config.addinivalue_line("markers", "rootless_lane: re-runs the suite as an unprivileged user")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("needs_root") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs pytest to run as root"))


# The whole suite runs in both modes: PYTEST_ISOLATE_SUITE_MODE=fresh makes "fresh"
# the default mode of every inner run (scripts/test.sh does a second pass so). A test
# that is about one mode says so in its own arguments or marker, which come later
# and win.
SUITE_MODE = os.environ.get("PYTEST_ISOLATE_SUITE_MODE", "")
SUITE_MODE_ARGS = (f"--isolate-mode={SUITE_MODE}",) if SUITE_MODE else ()


@pytest.fixture
def run(pytester: pytest.Pytester):
    """Run pytest in a subprocess in the pytester directory; extra args pass through."""

    def run(*args: str, timeout: float = 180) -> pytest.RunResult:
        mode = SUITE_MODE_ARGS if "no:isolate" not in args else ()  # no plugin, no option
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *mode, *args, timeout=timeout)

    return run


def read_quietly(path: str) -> bytes:
    """The bytes of ``path``, or b"" if it is gone or not ours to read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def find_processes(cmdline_part: str) -> list[int]:
    """Pids whose /proc/PID/cmdline contains ``cmdline_part``."""
    needle = cmdline_part.encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and needle in read_quietly(f"/proc/{p}/cmdline")]


def wait_for(probe, timeout: float):
    """Poll ``probe`` until it returns something falsy or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
