"""Coverage of isolated tests: ``pytest --cov`` (pytest-cov), ``coverage run -m pytest``,
with xdist, per-test contexts and subprocesses, measures the same lines as a plain
run; a test's coverage comes back as a checked event (coverage_support.py)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import SUITE_MODE_ARGS

pytest.importorskip("pytest_cov")
coverage = pytest.importorskip("coverage")

HAS_XDIST = importlib.util.find_spec("xdist") is not None
MODES = ("fork", "fresh")
TAMPERED = "tampered with its report channel"

PKG = '''
def add(a, b):
    if a > 100:
        return "big"
    return a + b


def never():
    return 1


def only_in_setup():
    return "set up"


def only_in_teardown():
    return "torn down"


def only_when_not_covered():
    return "paused"


def sub(a, b):
    return a - b
'''
CLI = '''
import sys


def main():
    if len(sys.argv) > 1:
        print("arguments")
    print("hello")


if __name__ == "__main__":
    main()
'''
TESTS = '''
import subprocess, sys
import pytest
import pkg


@pytest.fixture
def resource():
    pkg.only_in_setup()
    yield
    pkg.only_in_teardown()


def test_add(resource):
    assert pkg.add(1, 2) == 3


def test_sub():
    assert pkg.sub(3, 2) == 1


def test_fails():
    assert pkg.sub(1, 1) == 1


@pytest.mark.no_cover
def test_not_covered():
    assert pkg.only_when_not_covered() == "paused"


def test_subprocess():
    out = subprocess.run([sys.executable, "-m", "pkg.cli"], capture_output=True, text=True, check=True)
    assert out.stdout == "hello\\n"
'''


@pytest.fixture
def project(pytester: pytest.Pytester):
    """A package and its tests; ``patch = subprocess`` measures subprocesses (how
    coverage 7.10+ and pytest-cov 7 do it)."""
    pkg = pytester.mkpydir("pkg")
    (pkg / "__init__.py").write_text(PKG)
    (pkg / "cli.py").write_text(CLI)
    pytester.makepyfile(test_pkg=TESTS)
    (pytester.path / ".coveragerc").write_text("[run]\npatch = subprocess\n")
    return pytester


def measured(pytester: pytest.Pytester, contexts: bool = False) -> dict:
    """The lines (or arcs) of ``pkg`` in the run's .coverage file: {file: sorted}, or
    with ``contexts`` {(file, context): sorted}."""
    data = coverage.CoverageData(basename=str(pytester.path / ".coverage"))
    data.read()
    found = {}
    for path in data.measured_files():
        if "/pkg/" not in path:
            continue
        name = path.rsplit("/pkg/", 1)[1]
        if not contexts:
            found[name] = sorted(data.arcs(path) or []) if data.has_arcs() else sorted(data.lines(path) or [])
            continue
        for line, names in data.contexts_by_lineno(path).items():
            for context in names:
                found.setdefault((name, context), []).append(line)
    leftovers = sorted(p.name for p in pytester.path.glob(".coverage.*"))
    assert not leftovers, leftovers  # combined by pytest-cov, none left over
    return {key: sorted(value) for key, value in found.items()}


def covered(pytester, *args: str, timeout: float = 240) -> tuple[pytest.RunResult, dict]:
    for old in pytester.path.glob(".coverage*"):
        if old.name != ".coveragerc":
            old.unlink()
    mode = SUITE_MODE_ARGS if "no:isolate" not in args else ()  # no plugin, no option
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rf", *mode, *args, timeout=timeout)
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text and "pytest-isolate:" not in text, text[-6000:]
    result.assert_outcomes(passed=4, failed=1)
    return result, measured(pytester, contexts="--cov-context=test" in args)


def line_of(source: str, text: str) -> int:
    return next(n for n, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def plain_runs() -> dict:
    return {}


def plain(project, plain_runs: dict, *args: str) -> dict:
    """The plain run's measurement (once per argument set: the project is the same)."""
    if args not in plain_runs:
        plain_runs[args] = covered(project, "-p", "no:isolate", "--cov=pkg", *args)[1]
    return plain_runs[args]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xdist", [False, True], ids=["one-process", "xdist"])
def test_isolated_lines_equal_the_plain_run(project, plain_runs, mode: str, xdist: bool) -> None:
    if xdist and not HAS_XDIST:
        pytest.skip("pytest-xdist is not installed")
    expected = plain(project, plain_runs)
    result, seen = covered(project, "--cov=pkg", "--isolate", f"--isolate-mode={mode}",
                           *(["-n", "2"] if xdist else []))
    assert seen == expected
    # What only ran inside the containers: the tests, their fixture, a subprocess.
    assert line_of(PKG, 'return "set up"') in seen["__init__.py"]
    assert line_of(PKG, 'return "torn down"') in seen["__init__.py"]
    assert line_of(PKG, "return a - b") in seen["__init__.py"]
    assert line_of(CLI, 'print("hello")') in seen["cli.py"]
    assert line_of(PKG, 'return "paused"') not in seen["__init__.py"]  # no_cover
    assert line_of(PKG, "return 1") not in seen["__init__.py"]
    result.stdout.fnmatch_lines(["*pkg/__init__.py*", "*pkg/cli.py*"])


@pytest.mark.parametrize("mode", MODES)
def test_isolated_branches_equal_the_plain_run(project, plain_runs, mode: str) -> None:
    expected = plain(project, plain_runs, "--cov-branch")
    assert covered(project, "--cov=pkg", "--cov-branch", "--isolate", f"--isolate-mode={mode}")[1] == expected


@pytest.mark.parametrize("mode", MODES)
def test_per_test_contexts_equal_the_plain_run(project, plain_runs, mode: str) -> None:
    expected = plain(project, plain_runs, "--cov-context=test")
    seen = covered(project, "--cov=pkg", "--cov-context=test", "--isolate", f"--isolate-mode={mode}")[1]
    assert seen == expected
    assert seen[("__init__.py", "test_pkg.py::test_add|setup")] == [line_of(PKG, 'return "set up"')]
    assert seen[("__init__.py", "test_pkg.py::test_add|teardown")] == [line_of(PKG, 'return "torn down"')]


def test_coverage_run_counts_lines_run_in_containers(project) -> None:
    def coverage_run(*args: str) -> dict:
        for old in project.path.glob(".coverage*"):
            if old.name != ".coveragerc":
                old.unlink()
        mode = SUITE_MODE_ARGS if "no:isolate" not in args else ()
        result = project.run(sys.executable, "-m", "coverage", "run", "--source=pkg", "-m", "pytest",
                             "-p", "no:cacheprovider", *mode, *args, timeout=240)
        result.assert_outcomes(passed=4, failed=1)
        if list(project.path.glob(".coverage.*")):  # the subprocess's, if coverage run left it
            project.run(sys.executable, "-m", "coverage", "combine", "--append")
        return measured(project)

    expected = coverage_run("-p", "no:isolate", "-p", "no:cov")
    seen = coverage_run("--isolate", "-p", "no:cov")
    # Without pytest-cov there is no no_cover marker: the test runs, measured.
    assert seen == expected
    assert line_of(PKG, "return a - b") in seen["__init__.py"]


def test_the_host_does_not_run_pytest_cov(project) -> None:
    """pytest-cov would write its data file into the read-only project, in the host:
    the tests errored with 'the container host could not be built'."""
    result, _ = covered(project, "--cov=pkg", "--isolate", "--cov-report=term-missing")
    assert "could not be built" not in result.stdout.str()


# -- a hostile test and its coverage event ----------------------------------------------

FORGE = '''
import os
import pytest
import pkg
from pytest_isolate.runtime import link


def send(name, data):
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "pytest-isolate-events" in os.readlink(f"/proc/self/fd/{fd}"):
                return link.send(int(fd), name, data)
        except OSError:
            pass


@pytest.mark.isolated
def test_attacker():
    send("coverage", {"data": DATA})


@pytest.mark.isolated
def test_victim():
    assert pkg.sub(3, 2) == 1
'''
BOGUS = {
    "not_a_mapping": "b64-of-an-sql-script",
    "relative_path": {"arcs": False, "files": {"pkg/__init__.py": {"": [1]}}, "tracers": {}},
    "line_too_far": {"arcs": False, "files": {"/x.py": {"": [1 << 40]}}, "tracers": {}},
    "arcs_not_asked_for": {"arcs": True, "files": {"/x.py": {"": [[1, 2]]}}, "tracers": {}},
    "extra_field": {"arcs": False, "files": {}, "tracers": {}, "sql": "ATTACH DATABASE '/x' AS x"},
}


@pytest.mark.parametrize("kind", sorted(BOGUS))
def test_bogus_coverage_data_fails_only_its_own_test(project, kind: str) -> None:
    project.makepyfile(test_pkg=f"DATA = {BOGUS[kind]!r}\n" + FORGE)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--cov=pkg", *SUITE_MODE_ARGS,
                                          timeout=180)
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text, text[-6000:]
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["PASSED test_pkg.py::test_victim*", "FAILED test_pkg.py::test_attacker - *"])
    assert TAMPERED in text, text[-6000:]
    # The victim's own lines still count.
    assert line_of(PKG, "return a - b") in measured(project)["__init__.py"]


def test_coverage_event_when_nothing_is_measured_is_tampering(project) -> None:
    project.makepyfile(test_pkg="DATA = {'arcs': False, 'files': {}, 'tracers': {}}\n" + FORGE)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *SUITE_MODE_ARGS, timeout=180)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_pkg.py::test_attacker - *"])
    assert f"{TAMPERED}: coverage data that was not asked for" in result.stdout.str()
