"""Modes "fork" and "fresh", pytest-xdist, and unittest subtests: what each test sees
from inside its container, and that outcomes equal those of a plain run."""

from __future__ import annotations

import os

import pytest

from conftest import section
from test_options import OBSERVE, observations

STATE = OBSERVE + """
import os, sys
import pytest

# The pid namespace of the process that imported this module.
IMPORT_NS = os.readlink("/proc/self/ns/pid")
COUNTER = []

@{marker}
def test_1_mutates_module_state():
    import helper_state
    helper_state.VALUE = "changed"
    COUNTER.append(1)
    open("/written-by-t1", "w").close()
    observe("t1", import_ns=IMPORT_NS, ns=os.readlink("/proc/self/ns/pid"), counter=len(COUNTER))

@{marker}
def test_2_sees_none_of_it():
    observe("t2", import_ns=IMPORT_NS, ns=os.readlink("/proc/self/ns/pid"), counter=len(COUNTER),
            helper_loaded="helper_state" in sys.modules, t1_file=os.path.exists("/written-by-t1"))
"""


def run_state(pytester, run, marker: str, *args: str) -> tuple[pytest.RunResult, dict[str, dict]]:
    """Two isolated tests: the second sees neither the first's module global nor the
    module it imported; each ran in a container of its own."""
    pytester.makepyfile(test_state=STATE.replace("{marker}", marker), helper_state="VALUE = 'initial'")
    result = run("-rP", *args)
    result.assert_outcomes(passed=2)
    seen = observations(result)
    assert sorted(seen) == ["t1", "t2"]
    assert {data["hostname"] for data in seen.values()} == {"isolated"}
    assert seen["t1"]["counter"] == 1
    assert seen["t2"]["counter"] == 0 and seen["t2"]["helper_loaded"] is False
    # Two containers (namespace inode numbers are recycled once a container is gone,
    # so compare with the outer pid namespace, which is alive, and use a file instead).
    assert seen["t2"]["t1_file"] is False
    assert OUTER_PID_NS not in (seen["t1"]["ns"], seen["t2"]["ns"])
    return result, seen


OUTER_PID_NS = os.readlink("/proc/self/ns/pid")


FRESH = [
    pytest.param("pytest.mark.isolated(mode='fresh')", [], id="marker"),
    pytest.param("pytest.mark.isolated", ["--isolate-mode=fresh"], id="command-line"),
]


@pytest.mark.parametrize("marker, args", FRESH)
def test_fresh_mode_imports_the_test_module_in_each_container(pytester, run, marker, args) -> None:
    result, seen = run_state(pytester, run, marker, *args)
    # Each container imported the module itself: a fresh interpreter per test.
    for data in seen.values():
        assert data["import_ns"] == data["ns"]
    result.stdout.fnmatch_lines(["container host (fresh mode, image host)*"])


@pytest.mark.parametrize("marker, args", FRESH)
def test_fresh_mode_test_process_is_pid_2(pytester, run, marker, args) -> None:
    _, seen = run_state(pytester, run, marker, *args)
    assert [data["pid"] for data in seen.values()] == [2, 2]


def test_fork_mode_forks_each_test_from_a_host_that_imported_once(pytester, run) -> None:
    _, seen = run_state(pytester, run, "pytest.mark.isolated", "--isolate-mode=fork")
    # Imported once, by the container host, in a pid namespace of its own (neither
    # the outer one nor a test's).
    assert seen["t1"]["import_ns"] == seen["t2"]["import_ns"] != OUTER_PID_NS
    assert seen["t1"]["import_ns"] not in (seen["t1"]["ns"], seen["t2"]["ns"])
    assert [data["pid"] for data in seen.values()] == [2, 2]


MIXED = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_pass():
    print("out of pass")

def test_fail():
    assert 1 == 2

def test_skip():
    pytest.skip("skipped here")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="strict", strict=True)
def test_xpass_strict():
    pass

@pytest.mark.xfail(reason="lenient")
def test_xpass():
    pass

def test_setup_error(broken):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1
"""


def summary(result: pytest.RunResult) -> list[str]:
    """The ``-rA`` short summary lines, sorted."""
    return sorted(section(result, "short test summary info")[1:])


def test_outcomes_in_fork_and_fresh_mode_equal_the_plain_run(pytester, run) -> None:
    pytester.makepyfile(test_mixed=MIXED)
    plain = run("-rA")
    fork = run("-rA", "--isolate", "--isolate-mode=fork")
    fresh = run("-rA", "--isolate", "--isolate-mode=fresh")
    expected = {"passed": 2, "failed": 3, "skipped": 1, "xfailed": 1, "xpassed": 1, "errors": 1}
    assert plain.parseoutcomes() == expected
    assert fork.parseoutcomes() == fresh.parseoutcomes() == expected
    assert summary(fork) == summary(fresh) == summary(plain)
    assert fork.ret == fresh.ret == plain.ret == pytest.ExitCode.TESTS_FAILED
    fork.stdout.fnmatch_lines(["container host (fork mode, image host)*"])
    fresh.stdout.fnmatch_lines(["container host (fresh mode, image host)*"])


# -- pytest-xdist -------------------------------------------------------------------------

XDIST = OBSERVE + """
import os, socket, pytest

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(6))
def test_each_in_its_own_container(n):
    assert (os.getpid(), socket.gethostname()) == (2, "isolated")
    open(f"/tmp/only-mine-{n}", "x").close()
    assert [f for f in os.listdir("/tmp") if f.startswith("only-mine-")] == [f"only-mine-{n}"]
"""


def test_xdist_workers_run_isolated_tests_in_containers(pytester, run) -> None:
    pytester.makepyfile(test_x=XDIST)
    result = run("-n", "2", "-v")
    result.assert_outcomes(passed=6)
    out = result.stdout.str()
    assert "[gw0]" in out and "[gw1]" in out


XDIST_FAILURES = """
import os, signal, time, pytest

@pytest.mark.isolated
def test_crash():
    print("before the crash")
    os.kill(os.getpid(), signal.SIGSEGV)

@pytest.mark.isolated(timeout=5)  # from the container's start: ample for a fresh one
def test_timeout():
    time.sleep(3600)  # the timeout is the only clock

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(4))
def test_pass(n):
    assert os.getpid() == 2
"""


def test_xdist_reports_crash_and_timeout_and_completes(pytester, run) -> None:
    pytester.makepyfile(test_xf=XDIST_FAILURES)
    result = run("-n", "2", "-rf")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines_random([
        "*Crashed: the test's process was killed by signal 11 (SIGSEGV) during call.*",
        "*Timeout: the test ran longer than timeout=5s*",
        "FAILED test_xf.py::test_crash*",
        "FAILED test_xf.py::test_timeout*",
    ])
    assert "before the crash" in result.stdout.str()


# -- unittest subtests ----------------------------------------------------------------------

SUBTESTS = """
import unittest

class Sub(unittest.TestCase):
    def test_some_subtests_fail(self):
        for i in range(4):
            with self.subTest(i=i):
                self.assertEqual(i % 2, 0)

    def test_all_subtests_pass(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 3)

    def test_subtest_skips(self):
        with self.subTest(k=1):
            self.skipTest("not here")

    def test_plain(self):
        pass
"""


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_unittest_subtests_outcomes_equal_the_plain_run(pytester, run, mode) -> None:
    pytester.makepyfile(test_sub=SUBTESTS)
    plain = run("-rA")
    isolated = run("-rA", "--isolate", f"--isolate-mode={mode}")
    # pytest >= 9 reports each failing subtest (two); before, the test fails once
    expected = 2 if int(pytest.__version__.split(".")[0]) >= 9 else 1
    assert plain.parseoutcomes()["failed"] == expected
    assert isolated.parseoutcomes() == plain.parseoutcomes()
    assert summary(isolated) == summary(plain)
    assert "container host" in isolated.stdout.str()
