"""The runners compared: how each runs a workload, and whether it can run here."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

from _workloads import Workload, module_name

HERE = os.path.dirname(os.path.abspath(__file__))
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]


@dataclasses.dataclass(frozen=True)
class Runner:
    key: str
    label: str
    per_process: bool  # a fresh interpreter per test: slow, capped
    args: tuple[str, ...] = ()  # pytest options (in-process runners)
    sandbox: str | None = None  # bwrap | crun | podman: driven by _pertest.py
    tool: str | None = None  # executable that must be installed
    xdist: bool = False  # also timed under -n 2
    root_only: bool = False


RUNNERS = [
    Runner("plain", "plain pytest", False, xdist=True),
    Runner("forkonly", "fork only (benchmarks/forkonly.py)", False, ("-p", "forkonly"), xdist=True),
    Runner("default", "pytest-isolate, default (fork) mode", False, ("--isolate",), xdist=True),
    Runner("fresh", "pytest-isolate, fresh mode", True,
           ("--isolate", "--isolate-mode=fresh"), xdist=True),
    Runner("bwrap", "bwrap, one pytest per test", True, sandbox="bwrap", tool="bwrap"),
    Runner("crun", "crun, one container per test", True, sandbox="crun", tool="crun",
           root_only=True),
    Runner("podman", "podman run, one per test", True, sandbox="podman", tool="podman"),
]


def unavailable(runner: Runner, python: str) -> str | None:
    """Why ``runner`` cannot run here (for the table), or None."""
    if runner.tool and not shutil.which(runner.tool):
        return "not installed"
    if runner.root_only and os.geteuid() != 0:
        return "not run: needs root here (rootless crun needs a user-namespace bundle)"
    if runner.key in ("default", "fresh"):
        probe = subprocess.run([python, "-c", "import pytest_isolate"], capture_output=True,
                               timeout=60)
        if probe.returncode != 0:
            return f"not run: pytest-isolate-container is not installed for {python}"
    return None


def applies(runner: Runner, w: Workload, cap: int, full: bool) -> str | None:
    """None if ``runner`` runs workload ``w``, else the footnote mark why not."""
    if w.kind == "one-id":
        return "" if runner.key != "plain" else None
    if w.workers and not runner.xdist:
        return ""  # xdist is not this runner's business: an empty cell
    if runner.per_process:
        if w.kind in ("heavy", "sleepy") and not full:
            return "capped"
        if w.tests > cap:
            return "capped"
        if w.workers and w.tests > min(cap, 100):
            return "capped"
    return None


def command(runner: Runner, w: Workload, python: str, suite: str, scratch: str,
            junit: str | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``w`` (in directory ``suite``)."""
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    env["COLUMNS"] = "300"  # untruncated short-summary lines, for the failure notes
    if runner.sandbox:
        cmd = [python, os.path.join(HERE, "_pertest.py"), "--sandbox", runner.sandbox,
               "--python", python, "--dir", suite, "--bundle", os.path.join(scratch, "bundle")]
        if junit:
            cmd += ["--junit-dir", junit]
        return cmd, env
    cmd = [python, *PYTEST, *runner.args]
    if runner.key == "forkonly":
        env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if w.workers:
        cmd += ["-n", str(w.workers)]
    if w.kind == "one-id":
        cmd.append(f"{module_name(w)}::test_0")
    if junit:
        cmd.append(f"--junitxml={os.path.join(junit, 'junit.xml')}")
    return cmd, env
