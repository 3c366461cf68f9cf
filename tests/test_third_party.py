"""Real third-party suites give exactly the same outcomes with ``--isolate`` as without.

As a new user would: the sdists of more-itertools and toolz come from PyPI with pip,
the plugin is installed (a regular, non-editable install) with pytest into a fresh
virtual environment, and each suite runs in its unpacked sdist twice, with
``-p no:isolate`` and with ``--isolate``. The per-test outcomes from ``--junitxml``, the
final summary counts and the exit codes must be identical, and the isolated run must
really have run in containers (its header and its "pytest-isolate" summary section).
A small subset runs again in mode "fresh" (about 0.4 s a test).

toolz is a good probe: its pyproject sets ``filterwarnings = error``, ``xfail_strict``,
``--strict-markers``, ``--strict-config`` and ``log_cli_level``; more-itertools has
unittest TestCases with about 21,000 ``subTest`` reports.

Skipped when PyPI cannot be reached (pip's own failure says so).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import read_junit

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# name on PyPI -> (-k expression for the "fresh" subset, minimum plain passes expected)
PROJECTS = {
    "more-itertools": ("LastTests", 500),  # 10 tests, 3 with subTests
    "toolz": ("test_package or test_curried_doctests or test_tlz or test_compose_annotations", 150),
}

# What pip prints when the index cannot be reached (as opposed to any other failure).
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|ConnectTimeout|"
    r"Read timed out|ProxyError|SSLError|Max retries exceeded|No route to host"
)


def _network_error(output: str) -> str:
    """pip's line that says why the index could not be reached."""
    line = next(line for line in output.splitlines() if NETWORK_ERRORS.search(line))
    return NETWORK_ERRORS.search(line).group(0) + " (" + line.strip()[:300] + ")"


def _env() -> dict[str, str]:
    """The environment without anything of the outer pytest run that could leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "PYTHON")) and k not in ("VIRTUAL_ENV", "COV_CORE_SOURCE")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - Pythons without the extraction filters
            tar.extractall(into)
        top = {Path(name).parts[0] for name in tar.getnames()}
    assert len(top) == 1, f"{archive.name}: expected one top directory, got {sorted(top)}"
    return into / top.pop()


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{"python": venv python, "more-itertools": unpacked sdist dir, "toolz": ...}."""
    root = tmp_path_factory.mktemp("third_party")
    downloads = root / "sdists"
    pip = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--timeout", "20", "--retries", "1", "-d", str(downloads), *PROJECTS],
               cwd=root, timeout=300)
    if pip.returncode != 0:
        if NETWORK_ERRORS.search(pip.stdout):
            pytest.skip(f"PyPI is unreachable: `pip download` of the sdists failed: {_network_error(pip.stdout)}")
        pytest.fail(f"`pip download` of the sdists failed (exit {pip.returncode}):\n{pip.stdout[-3000:]}")

    sources: dict = {}
    for archive in sorted(downloads.glob("*.tar.gz")):
        name = re.sub(r"[-_.]+", "-", archive.name.rsplit("-", 1)[0]).lower()
        if name in PROJECTS:
            sources[name] = _extract(archive, root / "src")
    assert set(sources) == set(PROJECTS), f"downloaded {sorted(p.name for p in downloads.iterdir())}"

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=root, timeout=300)
    assert made.returncode == 0, made.stdout
    python = venv / "bin" / "python"
    # A regular install, as a user gets it from an index: not editable.
    installed = _run([str(python), "-m", "pip", "install", "--timeout", "20", str(PROJECT_ROOT), "pytest"],
                     cwd=root, timeout=600)
    if installed.returncode != 0 and NETWORK_ERRORS.search(installed.stdout):
        pytest.skip(f"PyPI is unreachable: installing the plugin and pytest failed: {_network_error(installed.stdout)}")
    assert installed.returncode == 0, installed.stdout[-3000:]
    return {"python": python, "root": root, **sources}


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, junit: Path) -> None:
        self.ret = proc.returncode
        self.output = proc.stdout
        self.junit = junit

    def outcomes(self) -> dict[str, collections.Counter]:
        """test id -> Counter of (outcome, type[, skip reason]) from the junit xml."""
        assert self.junit.exists(), f"no junit xml was written; output:\n{self.output[-3000:]}"
        result: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for case in read_junit(self.junit).cases:
            key = f"{case.classname}::{case.name}"
            marks = [(child.tag, child.get("type") or "", child.get("message") if child.tag == "skipped" else "")
                     for child in case.outcomes]
            for mark in marks or [("passed", "", "")]:
                result[key][mark] += 1
        return dict(result)

    def suite_counts(self) -> dict[str, str | None]:
        suite = read_junit(self.junit).suite
        return {k: suite.get(k) for k in ("tests", "errors", "failures", "skipped")}

    def summary_counts(self) -> dict[str, int]:
        """The final summary line's counts, e.g. {'passed': 765, 'subtests passed': 21194}."""
        for line in reversed(self.output.splitlines()):
            if line.startswith("=") and re.search(r" in \d+(\.\d+)?s\b", line):
                return {word: int(n) for n, word in re.findall(r"(\d+) ((?:subtests )?\w+)", line.split(" in ")[0])}
        raise AssertionError(f"no summary line in:\n{self.output[-3000:]}")


def run_suite(third_party: dict, project: str, label: str, *args: str, timeout: float = 300) -> Run:
    """The project's suite as its sdist configures it (testpaths, addopts), plus ``args``."""
    junit = third_party["root"] / f"{project}-{label}.xml"
    proc = _run([str(third_party["python"]), "-m", "pytest", "-p", "no:cacheprovider",
                 f"--junitxml={junit}", *args], cwd=third_party[project], timeout=timeout)
    return Run(proc, junit)


def assert_same_outcomes(plain: Run, isolated: Run) -> None:
    want, got = plain.outcomes(), isolated.outcomes()
    differing = {key: (dict(want.get(key, {})), dict(got.get(key, {})))
                 for key in sorted(set(want) | set(got)) if want.get(key) != got.get(key)}
    shown = "\n".join(f"  {key}\n    plain:    {a}\n    isolated: {b}" for key, (a, b) in list(differing.items())[:15])
    assert not differing, (f"{len(differing)} of {len(want)} tests differ with --isolate:\n{shown}\n\n"
                           f"isolated run's output (end):\n{isolated.output[-3000:]}")
    assert isolated.suite_counts() == plain.suite_counts()
    assert isolated.summary_counts() == plain.summary_counts()
    assert isolated.ret == plain.ret, isolated.output[-3000:]


def assert_really_isolated(isolated: Run, mode: str, tests: int) -> None:
    assert "isolate: every test in a container" in isolated.output
    assert "- pytest-isolate -" in isolated.output, isolated.output[-3000:]
    hosts = re.findall(rf"container host \({mode} mode, image host\): started in [\d.]+s, (\d+) tests? collected",
                       isolated.output)
    assert hosts, isolated.output[-3000:]
    if mode == "fork":  # the host collected the selection, as the controller did
        assert int(hosts[0]) == tests


@pytest.mark.parametrize("project", list(PROJECTS))
def test_suite_gives_the_same_outcomes_isolated(third_party: dict, project: str) -> None:
    plain = run_suite(third_party, project, "plain", "-p", "no:isolate")
    passed = plain.summary_counts().get("passed", 0)
    assert passed >= PROJECTS[project][1], f"the plain run is not a real run:\n{plain.output[-3000:]}"
    assert "container host" not in plain.output and "isolate: every test" not in plain.output

    isolated = run_suite(third_party, project, "isolated", "--isolate")
    assert_same_outcomes(plain, isolated)
    assert_really_isolated(isolated, "fork", tests=len(plain.outcomes()))


@pytest.mark.parametrize("project", list(PROJECTS))
def test_subset_gives_the_same_outcomes_in_fresh_mode(third_party: dict, project: str) -> None:
    select = PROJECTS[project][0]
    plain = run_suite(third_party, project, "plain-subset", "-p", "no:isolate", "-k", select)
    assert 3 <= len(plain.outcomes()) <= 40, plain.output[-3000:]

    fresh = run_suite(third_party, project, "fresh-subset", "--isolate", "--isolate-mode=fresh", "-k", select)
    assert_same_outcomes(plain, fresh)
    assert_really_isolated(fresh, "fresh", tests=len(plain.outcomes()))
