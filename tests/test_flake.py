"""Flakiness (--isolate-flake=N, flake=N): each test runs N times, each run in a fresh
container, and is reported once, with its failure rate, a 95% interval and a
verdict, in the terminal, in junitxml and in a JSON report. The flaky tests here
are deterministic: they count their runs in a writable mount and fail on every
third one, so the rates and intervals are known exactly."""

from __future__ import annotations

import json
import os

import pytest

from conftest import marker_usage_error, read_junit

CORPUS = """
import os, pytest

COUNT = {count!r}

def next_run(name):
    path = os.path.join("/count", name)
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(n))
    return n

@pytest.mark.isolated(mounts=[COUNT + ":/count:rw"])
def test_every_third_run_fails():
    assert next_run("third") % 3 != 0, "the third run"

@pytest.mark.isolated(mounts=[COUNT + ":/count:rw"])
def test_always_fails():
    assert next_run("always") < 0, "never"

@pytest.mark.isolated(mounts=[COUNT + ":/count:rw"])
def test_stable():
    next_run("stable")

@pytest.mark.isolated
@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

state = []

@pytest.mark.isolated
def test_each_run_is_fresh():
    # Nothing of an earlier run is here: not its files, not its module's state.
    assert not os.path.exists("/tmp/earlier-run") and state == []
    open("/tmp/earlier-run", "w").close()
    state.append(1)
"""


@pytest.fixture
def count_dir(tmp_path) -> str:
    path = tmp_path / "count"
    path.mkdir()
    path.chmod(0o777)  # as root, container root is an unprivileged uid
    return str(path)


def runs_of(count_dir: str, name: str) -> int:
    return int(open(os.path.join(count_dir, name)).read())


def test_rates_intervals_and_verdicts(pytester, run, count_dir, tmp_path) -> None:
    pytester.makepyfile(test_corpus=CORPUS.format(count=count_dir))
    report, junit = tmp_path / "flake.json", tmp_path / "junit.xml"
    result = run("--isolate-flake=9", f"--isolate-flake-report={report}", f"--junitxml={junit}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # flaky and broken tests fail the run
    result.assert_outcomes(failed=2, passed=2, skipped=1)
    assert [runs_of(count_dir, n) for n in ("third", "always", "stable")] == [9, 9, 9]
    result.stdout.fnmatch_lines([
        "*pytest-isolate: flakiness (failed runs, 95% interval, verdict)*",
        "test_corpus.py::test_always_fails: 9/9 runs failed = 100% [70%-100%]: broken",
        "test_corpus.py::test_every_third_run_fails: 3/9 runs failed = 33% [12%-65%]: flaky",
        "test_corpus.py::test_skipped: all 9 runs skipped: skipped",
        "test_corpus.py::test_each_run_is_fresh: 0/9 runs failed = 0% [0%-30%]: stable",
        "test_corpus.py::test_stable: 0/9 runs failed = 0% [0%-30%]: stable",
        "1 broken, 1 flaky, 1 skipped, 2 stable",
    ])
    # The flaky test's report is its first failing run's, whole, with the rate.
    result.stdout.fnmatch_lines(["*AssertionError: the third run*", "*pytest-isolate flakiness*",
                                 "3/9 runs failed = 33% [12%-65%]: flaky; the report is run 3's"])
    document = json.loads(report.read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in document["tests"]}
    assert document["counts"] == {"broken": 1, "flaky": 1, "skipped": 1, "stable": 2}
    flaky = tests["test_every_third_run_fails"]
    assert (flaky["verdict"], flaky["runs"], flaky["failures"], flaky["first_failure_run"]) == ("flaky", 9, 3, 3)
    assert flaky["interval"] == pytest.approx([0.1206, 0.6458], abs=1e-4)  # Wilson, as published for 3/9
    assert "AssertionError: the third run" in flaky["first_failure"]
    assert tests["test_stable"]["interval"] == pytest.approx([0.0, 0.2991], abs=1e-4)
    assert tests["test_stable"]["first_failure"] is None
    properties = read_junit(junit).properties()
    assert properties["test_every_third_run_fails"]["isolate_flake_verdict"] == "flaky"
    assert properties["test_every_third_run_fails"]["isolate_flake_interval"] == "0.1206-0.6458"
    assert properties["test_always_fails"]["isolate_flake_failures"] == "9"


def test_all_stable_exits_zero_and_the_marker_sets_one_tests_runs(pytester, run, count_dir) -> None:
    pytester.makepyfile(test_marked=f"""
        import os, pytest

        @pytest.mark.isolated(flake=4, mounts=[{count_dir!r} + ":/count:rw"])
        def test_four_times():
            open("/count/" + str(len(os.listdir("/count"))), "w").close()

        @pytest.mark.isolated
        def test_once():
            pass
    """)
    result = run()
    assert result.ret == pytest.ExitCode.OK
    assert len(os.listdir(count_dir)) == 4
    result.stdout.fnmatch_lines(["test_marked.py::test_four_times: 0/4 runs failed = 0% [0%-49%]: stable",
                                 "1 stable"])
    assert "test_once:" not in result.stdout.str()  # one run: no tally


def test_stop_early_once_flaky(pytester, run, count_dir) -> None:
    pytester.makepyfile(test_corpus=CORPUS.format(count=count_dir))
    result = run("--isolate-flake=30", "--isolate-flake-stop-early", "-k", "third")
    assert runs_of(count_dir, "third") == 3  # passed twice, then failed: the verdict is flaky for good
    result.stdout.fnmatch_lines(["test_corpus.py::test_every_third_run_fails: 1/3 runs failed = 33% [6%-79%]: "
                                 "flaky (stopped early: 3 of 30 runs)"])


def test_under_xdist_the_controller_sums_up_its_workers(pytester, run, count_dir, tmp_path) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_corpus=CORPUS.format(count=count_dir))
    report = tmp_path / "flake.json"
    result = run("-n", "2", "--isolate-flake=6", f"--isolate-flake-report={report}")
    result.assert_outcomes(failed=2, passed=2, skipped=1)
    result.stdout.fnmatch_lines(["test_corpus.py::test_every_third_run_fails: 2/6 runs failed = 33% [10%-70%]: flaky"])
    assert json.loads(report.read_text())["counts"] == {"broken": 1, "flaky": 1, "skipped": 1, "stable": 2}


def test_a_test_cannot_forge_its_tally(pytester, run, tmp_path) -> None:
    """The figures are the controller's: a test's own isolate_flake_* properties are dropped."""
    pytester.makepyfile(test_forge="""
        import pytest

        @pytest.mark.isolated(flake=2)
        def test_forges(record_property):
            record_property("isolate_flake_verdict", "stable")
            record_property("isolate_flake_failures", 0)
            assert False

        @pytest.mark.isolated
        def test_claims_a_tally(record_property):
            record_property("isolate_flake_verdict", "stable")
    """)
    report = tmp_path / "flake.json"
    result = run(f"--isolate-flake-report={report}")
    result.stdout.fnmatch_lines(["test_forge.py::test_forges: 2/2 runs failed = 100% [34%-100%]: broken"])
    assert [t["nodeid"] for t in json.loads(report.read_text())["tests"]] == ["test_forge.py::test_forges"]


@pytest.mark.parametrize(("value", "message"), [
    (0, "invalid 'flake': got 0; accepted: a number of runs from 1 (once, the default) to 100000"),
    ("many", "invalid 'flake': got 'many'; accepted: a number of runs"),
    (True, "invalid 'flake': got True; accepted"),
])
def test_a_bad_flake_is_a_usage_error(pytester, run, value, message) -> None:
    assert message in marker_usage_error(pytester, run, flake=value)
