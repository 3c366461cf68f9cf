"""What an isolated test reports: outcomes, sections, warnings, junit XML, -x/--lf,
crashes, timeouts and a lost host, read from a real inner pytest run.

Where a plain run can run the same file, the isolated run's output is compared
line by line with it (after the header, with addresses and durations blanked).
"""

from __future__ import annotations

import re

import pytest

from conftest import read_junit, section

MODES = ["fork", "fresh"]

OUTCOMES = '''
import logging, os, socket, sys, warnings
import pytest

class ReportWarning(UserWarning): pass

@pytest.fixture
def noisy():
    print("SETUP-OUT")
    yield
    print("TEARDOWN-OUT")

@pytest.fixture
def broken_setup(): raise RuntimeError("setup boom")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown boom")

def three(): return 3
def test_pass(): pass
def test_where(): assert (socket.gethostname() == "isolated") == (os.environ["EXPECT_ISOLATED"] == "1")

def test_fail(noisy):
    print("CALL-OUT")
    sys.stderr.write("CALL-ERR\\n")
    logging.getLogger("inner").warning("CALL-LOG")
    assert three() == 4

@pytest.mark.skip(reason="decorated skip")
def test_skip(): pass
def test_runtime_skip(): pytest.skip("runtime skip")
@pytest.mark.skipif("sys.platform == 'linux'", reason="skipif true")
def test_skipif(): pass
@pytest.mark.xfail(reason="expected")
def test_xfail(): assert 0
@pytest.mark.xfail(reason="lenient")
def test_xpass(): pass
@pytest.mark.xfail(reason="strict one", strict=True)
def test_xpass_strict(): pass
def test_runtime_xfail(): pytest.xfail("runtime xfail")
def test_setup_error(broken_setup): pass
def test_teardown_error(broken_teardown): pass
@pytest.mark.parametrize("n", [1, 2])
def test_param(n): assert n == 1

class TestGroup:
    def test_method(self): pass
    def test_method_fails(self): assert [1, 2] == [1, 3]

def test_warns():
    warnings.warn("WARN-CUSTOM", ReportWarning)
    warnings.warn("WARN-DEPRECATED", DeprecationWarning)
'''


def normalized(result: pytest.RunResult) -> list[str]:
    """The output from "collected" on, without pytest-isolate's own summary section."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if "collected " in line)
    kept = []
    for line in lines[start:]:
        if re.fullmatch(r"-+ pytest-isolate -+", line) or line.startswith("container host ("):
            continue
        line = re.sub(r"0x[0-9a-f]+", "0x?", line)
        kept.append(re.sub(r" in \d+\.\d+s", " in ?s", line))
    return kept


def line_of(path, text: str, after: str = "") -> int:
    """The number of the first line of the file containing `text` (below `after`)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(n for n, line in enumerate(lines[start:], start + 1) if text in line)


def tail(lines: list[str], n: int) -> list[str]:
    """The last n lines, with "---- Captured x ----" separators shortened to "-- Captured x"."""
    return [re.sub(r"^-{3,} (.*?) -{3,}$", r"-- \1", line) for line in lines[-n:]]


# -- outcomes, compared with a plain run --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_every_outcome_reads_as_in_a_plain_run(pytester, run, monkeypatch, mode) -> None:
    """pass/fail/skip/skipif/xfail/xpass/strict/setup+teardown errors/params/classes/
    captured sections/warnings: the whole report equals the plain run's."""
    pytester.makepyfile(test_outcomes=OUTCOMES)
    monkeypatch.setenv("EXPECT_ISOLATED", "1")
    isolated = run("--isolate", f"--isolate-mode={mode}", "-rA")
    monkeypatch.setenv("EXPECT_ISOLATED", "0")
    plain = run("-p", "no:isolate", "-rA")
    isolated.stdout.fnmatch_lines([f"container host ({mode} mode, image host): started in *"])
    counts = dict(passed=6, failed=4, skipped=3, xfailed=2, xpassed=1, errors=2, warnings=2)
    isolated.assert_outcomes(**counts)
    plain.assert_outcomes(**counts)
    assert isolated.ret == plain.ret == 1
    assert normalized(isolated) == normalized(plain)
    # The comparison holds; and the report says what it should on its own, too.
    isolated.stdout.fnmatch_lines([
        "*ERROR at setup of test_setup_error*", "E *RuntimeError: setup boom",
        "*ERROR at teardown of test_teardown_error*", "E *RuntimeError: teardown boom",
        "*_ test_fail _*", ">       assert three() == 4", "E       assert 3 == 4",
        "E        +  where 3 = three()",
        "*- Captured stdout setup -*", "SETUP-OUT", "*- Captured stdout call -*", "CALL-OUT",
        "*- Captured stderr call -*", "CALL-ERR", "*- Captured log call -*", "WARNING  inner:*CALL-LOG",
        "*- Captured stdout teardown -*", "TEARDOWN-OUT",
        "*_ test_xpass_strict _*", "[[]XPASS(strict)[]] strict one",
        "*_ test_param?2? _*", "E *assert 2 == 1",
        "*_ TestGroup.test_method_fails _*", "E *assert [[]1, 2[]] == [[]1, 3[]]",
        "*= warnings summary =*", "test_outcomes.py::test_warns",
        "*test_outcomes.py:*: ReportWarning: WARN-CUSTOM",
        "*test_outcomes.py:*: DeprecationWarning: WARN-DEPRECATED",
        "PASSED test_outcomes.py::test_where", "SKIPPED [[]1[]] test_outcomes.py:*: skipif true",
        "XFAIL test_outcomes.py::test_runtime_xfail - *runtime xfail",
        "XPASS test_outcomes.py::test_xpass - lenient",
        "FAILED test_outcomes.py::test_xpass_strict*",
    ])


USAGE_PROPERTIES = {"isolate_peak_memory_bytes", "isolate_cpu_seconds"}


def junit_cases(path) -> list[tuple]:
    """(name, child tags, properties, failure/skip message) for each testcase; the
    usage properties every isolated test gets are checked, then left out."""
    cases = []
    for case in read_junit(path).cases:
        usage = {name for name in case.properties if name.startswith("isolate_")}
        assert usage in (set(), USAGE_PROPERTIES), usage
        props = {name: value for name, value in case.properties.items() if name not in usage}
        messages = [child.get("message") for child in case.outcomes]
        cases.append((case.name, sorted(case.tags), props, messages))
    return cases


def test_junitxml_gets_properties_and_outcomes_as_in_a_plain_run(pytester, run) -> None:
    """record_property reaches the XML; failure/skipped/error elements match a plain run."""
    pytester.makepyfile(test_junit='''
        import pytest

        @pytest.fixture
        def broken(): raise RuntimeError("setup boom")

        def test_prop(record_property): record_property("answer", "42")
        def test_fail(record_property): record_property("before", "failing"); assert 1 == 2
        @pytest.mark.skip(reason="not today")
        def test_skip(): pass
        @pytest.mark.xfail(reason="known")
        def test_xfail(): assert 0
        def test_error(broken): pass
    ''')
    isolated = run("--isolate", "--junitxml=isolated.xml")
    plain = run("-p", "no:isolate", "--junitxml=plain.xml")
    isolated.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    usage = {name for case in read_junit(pytester.path / "isolated.xml").cases for name in case.properties}
    assert USAGE_PROPERTIES <= usage, "every isolated test reports its usage"
    cases = junit_cases(pytester.path / "isolated.xml")
    assert cases == junit_cases(pytester.path / "plain.xml")
    by_name = {name: (tags, props, messages) for name, tags, props, messages in cases}
    assert by_name["test_prop"] == ([], {"answer": "42"}, [])
    assert by_name["test_fail"] == (["failure"], {"before": "failing"}, ["assert 1 == 2"])
    assert by_name["test_skip"] == (["skipped"], {}, ["not today"])
    assert by_name["test_xfail"][0] == ["skipped"]
    assert by_name["test_error"][0] == ["error"]
    suite = read_junit(pytester.path / "isolated.xml").suite
    assert (suite["tests"], suite["failures"], suite["errors"], suite["skipped"]) == ("5", "1", "1", "2")


def test_junitxml_gets_testsuite_properties_of_isolated_tests(pytester, run) -> None:
    """record_testsuite_property called in an isolated test reaches the XML."""
    pytester.makepyfile("def test_suite_prop(record_testsuite_property):\n"
                        "    record_testsuite_property('build', '1234')")
    run("--isolate", "--junitxml=out.xml").assert_outcomes(passed=1)
    assert read_junit(pytester.path / "out.xml").suite_properties == {"build": "1234"}


def test_junitxml_keeps_the_output_a_test_printed_before_it_crashed(pytester, run) -> None:
    """With junit_logging=all, <system-out> of a test killed by SIGSEGV holds what it
    printed before, as it does for an ordinary failure."""
    pytester.makepyfile(test_out="""
        import os, signal
        def test_crash():
            print("PRINTED-BEFORE-THE-CRASH", flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        def test_fail():
            print("PRINTED-BEFORE-THE-FAILURE")
            assert 0
    """)
    run("--isolate", "--junitxml=out.xml", "-o", "junit_logging=all").assert_outcomes(failed=2)
    outs = {case.name: case.text("system-out") for case in read_junit(pytester.path / "out.xml").cases}
    assert "PRINTED-BEFORE-THE-FAILURE" in outs["test_fail"]
    assert "PRINTED-BEFORE-THE-CRASH" in outs["test_crash"]


# -- -x and --lf --------------------------------------------------------------------------

STOPPERS = '''
import ctypes
def test_1_passes(): pass
def test_2_crashes(): ctypes.string_at(0)
def test_3_passes(): pass
def test_4_fails(): assert 1 == 2
def test_5_passes(): pass
'''


def test_exitfirst_and_maxfail_count_isolated_failures_and_crashes(pytester, run) -> None:
    """-x stops right after the first (crashed) isolated test; --maxfail=2 after the second."""
    pytester.makepyfile(test_stop=STOPPERS)
    first = run("--isolate", "-v", "-x")
    first.assert_outcomes(passed=1, failed=1)
    first.stdout.fnmatch_lines(["*test_2_crashes FAILED*", "*stopping after 1 failures*"])
    assert "test_3_passes" not in first.stdout.str()
    second = run("--isolate", "-v", "--maxfail=2")
    second.assert_outcomes(passed=2, failed=2)
    second.stdout.fnmatch_lines(["*test_4_fails FAILED*", "*stopping after 2 failures*"])
    assert "test_5_passes" not in second.stdout.str()


def test_last_failed_reruns_only_the_failed_isolated_tests(pytester) -> None:
    """--lf (the cache provider in the controller) sees isolated failures and crashes."""
    pytester.makepyfile(test_stop=STOPPERS)
    pytester.runpytest_subprocess("--isolate").assert_outcomes(passed=3, failed=2)
    again = pytester.runpytest_subprocess("--isolate", "--lf", "-v")
    again.assert_outcomes(failed=2)
    again.stdout.fnmatch_lines(["run-last-failure: rerun previous 2 failures*"])
    ran = [line.split()[0] for line in again.outlines if line.startswith("test_stop.py::")]
    assert ran == ["test_stop.py::test_2_crashes", "test_stop.py::test_4_fails"]


def test_pytest_exit_in_an_isolated_test_stops_the_session(pytester, run) -> None:
    """pytest.exit("...", returncode=7) stops the whole run, as in a plain run."""
    pytester.makepyfile('''
        import pytest
        def test_a(): pass
        def test_exit(): pytest.exit("stop here", returncode=7)
        def test_b(): pass
    ''')
    result = run("--isolate", "-v")
    assert "could not start" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*Exit: stop here*"])
    assert "test_b" not in result.stdout.str()
    assert result.ret == 7


# -- crashes ------------------------------------------------------------------------------

CRASHES = '''
import ctypes, os, signal, sys
import pytest

@pytest.fixture
def segfaulting():
    print("FIXTURE-MARK")
    ctypes.string_at(0)

def test_segv():
    print("SEGV-MARK")
    sys.stderr.write("SEGV-ERR-MARK\\n")
    ctypes.string_at(0)

def test_after_segv(): print("NEXT1-MARK"); assert 1 == 2
def test_exit(): print("EXIT-MARK", end=""); os._exit(3)
def test_after_exit(): print("NEXT2-MARK"); assert 1 == 2
def test_sigkill(): print("KILL-MARK"); os.kill(os.getpid(), signal.SIGKILL)
def test_after_kill(): print("NEXT3-MARK"); assert 1 == 2
@pytest.mark.xfail(reason="it segfaults")
def test_crash_under_xfail(): ctypes.string_at(0)
def test_setup_crash(segfaulting): pass
def test_last(): pass
'''


@pytest.mark.parametrize("mode", MODES)
def test_crashes_fail_only_their_test_with_reason_output_and_traceback(pytester, run, mode) -> None:
    """SIGSEGV, os._exit(3), SIGKILL: FAILED with the reason and the output printed before;
    under xfail XFAIL; in a fixture ERROR at setup; the output never leaks to the next test."""
    pytester.makepyfile(test_crashes=CRASHES)
    result = run("--isolate", f"--isolate-mode={mode}", "--junitxml=out.xml", "-rA")
    result.assert_outcomes(failed=6, passed=1, xfailed=1, errors=1)
    segv = section(result, "test_segv")
    assert "Crashed: the test's process was killed by signal 11 (SIGSEGV) during call." in segv
    assert "faulthandler traceback:" in segv
    path = pytester.path / "test_crashes.py"
    crash_line = line_of(path, "ctypes.string_at(0)", after="def test_segv")
    assert f'  File "{path}", line {crash_line} in test_segv' in segv
    assert tail(segv, 4) == ["-- Captured stdout call", "SEGV-MARK", "-- Captured stderr call", "SEGV-ERR-MARK"]
    exit_ = section(result, "test_exit")
    assert exit_[1] == ("Crashed: the test's process exited with status 3 during call, "
                        "before pytest finished the test.")
    assert tail(exit_, 2) == ["-- Captured stdout call", "EXIT-MARK"]
    kill = section(result, "test_sigkill")
    assert kill[1] == "Crashed: the test's process was killed by signal 9 (SIGKILL) during call."
    assert tail(kill, 2) == ["-- Captured stdout call", "KILL-MARK"]
    for crashed, after, mark, next_mark in [("test_segv", "test_after_segv", "SEGV-MARK", "NEXT1-MARK"),
                                            ("test_exit", "test_after_exit", "EXIT-MARK", "NEXT2-MARK"),
                                            ("test_sigkill", "test_after_kill", "KILL-MARK", "NEXT3-MARK")]:
        assert result.outlines.count(mark) == 1, mark
        assert mark in section(result, crashed)
        following = section(result, after)
        assert mark not in following and following[-1] == next_mark
        assert any(re.fullmatch(r"E +assert 1 == 2", line) for line in following)
    setup = section(result, "ERROR at setup of test_setup_crash")
    assert setup[1] == "Crashed: the test's process was killed by signal 11 (SIGSEGV) during setup."
    assert any(re.search(r'test_crashes\.py", line \d+ in segfaulting$', line) for line in setup)
    assert "FIXTURE-MARK" in setup
    result.stdout.fnmatch_lines([
        "XFAIL test_crashes.py::test_crash_under_xfail - it segfaults",
        "ERROR test_crashes.py::test_setup_crash - Failed: Crashed: *",
        "FAILED test_crashes.py::test_segv - Failed: Crashed: *",
        "FAILED test_crashes.py::test_exit - Failed: Crashed: *",
    ], consecutive=False)
    cases = read_junit(pytester.path / "out.xml").by_name()
    assert "signal 11 (SIGSEGV)" in cases["test_segv"].element.find("failure").get("message")
    assert "status 3" in cases["test_exit"].element.find("failure").get("message")
    assert "error" in cases["test_setup_crash"].tags
    assert cases["test_last"].tags == [] and cases["test_last"].properties  # usage only


def test_crash_report_is_the_reason_then_the_output(pytester, run) -> None:
    """A crash report holds the reason and the captured output, and nothing else."""
    pytester.makepyfile(test_exit="import os\ndef test_exit(): print('EXIT-MARK'); os._exit(3)")
    result = run("--isolate")
    result.assert_outcomes(failed=1)
    body = section(result, "test_exit")[1:]
    assert tail(body, len(body)) == [
        "Crashed: the test's process exited with status 3 during call, before pytest finished the test.",
        "-- Captured stdout call", "EXIT-MARK"]


# -- timeouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_marker_timeout_kills_the_test_and_the_run_goes_on(pytester, run, mode) -> None:
    """timeout=5 on an hour's sleep: FAILED with the reason and the sleeping line (the
    timeout is the only clock that ends it), and the next test runs. The timeout counts
    from the container's start: 5 s leave a fresh interpreter ample time to start."""
    pytester.makepyfile(test_timeout='''
        import time
        import pytest

        @pytest.mark.isolated(timeout=5)
        def test_sleeps():
            print("SLEEP-MARK")
            time.sleep(3600)

        @pytest.mark.isolated(timeout=60)  # a safety net: it never fires
        def test_next(): pass
    ''')
    result = run(f"--isolate-mode={mode}", "-rA")
    result.assert_outcomes(failed=1, passed=1)
    report = section(result, "test_sleeps")
    assert report[1] == ("Timeout: the test ran longer than timeout=5s (setup, call and teardown "
                         "together); its container was killed during call.")
    result.stdout.fnmatch_lines(["PASSED test_timeout.py::test_next"])
    path = pytester.path / "test_timeout.py"
    assert f'  File "{path}", line {line_of(path, "time.sleep(3600)")} in test_sleeps' in report
    assert tail(report, 2) == ["-- Captured stdout call", "SLEEP-MARK"]


def test_fresh_mode_timeout_keeps_traceback_and_output(pytester, run) -> None:
    """A timed-out test in mode fresh, in a module that takes 0.6 s to import, still gets
    its faulthandler traceback (the timeout is not eaten by the fresh interpreter's
    start-up) and its captured stdout, as in mode fork."""
    pytester.makepyfile(test_slow_import='''
        import time
        import pytest

        time.sleep(0.6)  # a heavy import

        @pytest.mark.isolated(timeout=5, mode="fresh")
        def test_sleeps():
            print("SLEEP-MARK")
            time.sleep(3600)
    ''')
    result = run()
    result.assert_outcomes(failed=1)
    report = section(result, "test_sleeps")
    assert report[1].startswith("Timeout: the test ran longer than timeout=5s")
    assert any(re.search(r'test_slow_import\.py", line \d+ in test_sleeps$', line) for line in report)
    assert tail(report, 2) == ["-- Captured stdout call", "SLEEP-MARK"]


def test_command_line_timeout_applies_to_setup_and_call(pytester, run) -> None:
    """--isolate-timeout=5: a hanging fixture is ERROR at setup, a hanging test FAILED (each
    hangs for an hour: the timeout is the only clock that ends them)."""
    pytester.makepyfile(test_cli_timeout='''
        import time
        import pytest

        @pytest.fixture
        def hangs(): time.sleep(3600)

        def test_setup_hangs(hangs): pass
        def test_call_hangs(): time.sleep(3600)
        def test_quick(): pass
    ''')
    result = run("--isolate", "--isolate-timeout=5")
    result.assert_outcomes(errors=1, failed=1, passed=1)
    assert section(result, "ERROR at setup of test_setup_hangs")[1].endswith(
        "its container was killed during setup.")
    call = section(result, "test_call_hangs")
    assert call[1].startswith("Timeout: the test ran longer than timeout=5s")
    assert any(re.search(r'test_cli_timeout\.py", line \d+ in test_call_hangs$', line) for line in call)


# -- a lost container host ----------------------------------------------------------------

LOST_HOST = '''
import os, signal, threading, time
import pytest

from conftest import SETUP_OF_TEST_3_REPORTED

def descendants():
    """{pid: (comm, state)} of every process below this pytest."""
    parents, seen = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, tail = f.read().rpartition(")")
            fields = tail.split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
            seen[int(entry)] = (head.split("(", 1)[1], fields[0])
        except (OSError, ValueError, IndexError):
            pass
    found, todo = {}, [os.getpid()]
    while todo:
        for kid in parents.get(todo.pop(), []):
            found[kid] = seen.get(kid, ("", ""))
            todo.append(kid)
    return found

def kill_descendants():
    """SIGKILL every process below this pytest; returns once each is dead (a zombie or gone)."""
    killed = list(descendants())
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60  # a safety net only
    while time.monotonic() < deadline:
        now = descendants()
        if all(now.get(pid, ("", "Z"))[1] in ("Z", "X") for pid in killed):
            return
        time.sleep(0.02)
    raise AssertionError(f"not dead after SIGKILL: {now}")

def kill_when_test_3_runs():
    """Wait until this controller has test_3's setup report (test_3 is in its call, which
    never ends by itself), then kill them all."""
    SETUP_OF_TEST_3_REPORTED.wait(120)  # a safety net only
    kill_descendants()

@pytest.mark.isolated
def test_1_starts_the_host(): pass
def test_2_arms(): %s
@pytest.mark.isolated
def test_3_loses_its_host(): time.sleep(3600)  # until its host is killed
@pytest.mark.isolated
def test_4_gets_a_new_host(): pass
'''

# The controller reads each report of an isolated test as it comes: there, test_3's
# setup report says that test_3 is in its call.
LOST_HOST_CONFTEST = '''
import threading

SETUP_OF_TEST_3_REPORTED = threading.Event()

def pytest_report_from_serializable(config, data):
    if data.get("when") == "setup" and str(data.get("nodeid")).endswith("::test_3_loses_its_host"):
        SETUP_OF_TEST_3_REPORTED.set()
'''


def test_host_killed_during_a_test_fails_that_test_and_a_new_host_runs_the_next(pytester, run) -> None:
    """The host dies while a test runs: that test FAILED ("lost the link"), the run goes on."""
    arm = "threading.Thread(target=kill_when_test_3_runs).start()"
    pytester.makeconftest(LOST_HOST_CONFTEST)
    pytester.makepyfile(test_lost=LOST_HOST % arm)
    result = run("-rA")
    result.assert_outcomes(passed=3, failed=1)
    assert section(result, "test_3_loses_its_host")[1].startswith(
        "pytest-isolate: lost the link to the container host: ")
    result.stdout.fnmatch_lines(["PASSED test_lost.py::test_4_gets_a_new_host"], consecutive=False)


def test_host_killed_between_tests_errors_the_next_isolated_test_only(pytester, run) -> None:
    """The host dies between two isolated tests: the next one is ERROR at setup ("lost
    the link"), not an INTERNALERROR, and a new host runs the one after."""
    pytester.makeconftest(LOST_HOST_CONFTEST)
    pytester.makepyfile(test_lost=LOST_HOST % "kill_descendants()")
    result = run("-rA")
    assert "INTERNALERROR" not in result.stdout.str()
    result.assert_outcomes(passed=3, errors=1)
    assert section(result, "ERROR at setup of test_3_loses_its_host")[1].startswith(
        "pytest-isolate: lost the link to the container host: ")
    result.stdout.fnmatch_lines(["PASSED test_lost.py::test_4_gets_a_new_host"], consecutive=False)
