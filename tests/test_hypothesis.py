"""Hypothesis in containers: its example database, its warnings.

The project is read-only in a container, so the failing examples Hypothesis finds
there travel back as ``hypothesis_write`` events and the controller writes them into
the project's ``.hypothesis/examples`` (pytest_isolate/hypothesis_support.py). These
runs check that the database is what a plain run would leave (a plain run that may
only consult the database reproduces the failure), that containers read it, that no
"unusable database" warning is shown, that ``-v`` progress lines stay clean, and that
a hostile test's forged writes go nowhere but the project's database.
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("hypothesis")

from hypothesis.database import DirectoryBasedExampleDatabase, _hash  # noqa: E402

from conftest import FIND_CHANNEL  # noqa: E402

MODES = ["fork", "fresh"]

CONFTEST = """
from hypothesis import Phase, settings
# Only the database is consulted: a failure must come from a saved example.
settings.register_profile("reuse", phases=[Phase.explicit, Phase.reuse])
"""

PROPERTY = """
import pytest
from hypothesis import given, strategies as st

@pytest.mark.isolated
@given(st.integers())
def test_small(x):
    assert x < 1000

@pytest.mark.isolated
@given(st.integers())
def test_passes(x):
    assert isinstance(x, int)
"""

@pytest.fixture(autouse=True)
def local_hypothesis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis loads its "ci" profile (no database) when it sees a CI variable;
    these runs compare with a developer's plain run, which has the database."""
    from hypothesis import _settings

    for key in getattr(_settings, "_CI_VARS", {"CI": None}):
        monkeypatch.delenv(key, raising=False)


PROGRESS = re.compile(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)( \(.*\))?\s+\[\s*\d+%\]$")


def _text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


def assert_no_database_warning(result: pytest.RunResult) -> str:
    text = _text(result)
    assert "INTERNALERROR" not in text, text[-6000:]
    for needle in ("HypothesisWarning", "unusable", "in-memory database"):
        assert needle not in text, text[-6000:]
    return text


def assert_clean_progress(result: pytest.RunResult) -> None:
    """With -v every test has one line of its own: nothing printed into it."""
    lines = [line for line in result.outlines if "::" in line and line.startswith("test_")]
    assert lines, _text(result)[-6000:]
    for line in lines:
        assert PROGRESS.match(line), _text(result)[-6000:]
    assert not [line for line in result.errlines if line.strip()], _text(result)[-6000:]


def saved(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", MODES)
def test_failing_example_is_saved_and_replayed(pytester, run, mode: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_property=PROPERTY)
    first = run("-v", f"--isolate-mode={mode}")
    assert_no_database_warning(first)
    assert_clean_progress(first)
    first.assert_outcomes(failed=1, passed=1)
    first.stdout.fnmatch_lines(["*x=1000*"])
    examples = pytester.path / ".hypothesis" / "examples"
    assert saved(examples), "no example was saved"
    assert (pytester.path / ".hypothesis" / ".gitignore").exists()  # Hypothesis's own, as in a plain run

    # A plain run that may only consult the database finds the failure there.
    plain = run("-p", "no:isolate", "--hypothesis-profile=reuse", "--hypothesis-show-statistics",
                "-W", "ignore::pytest.PytestUnknownMarkWarning")
    assert plain.parseoutcomes()["failed"] == 1, _text(plain)[-6000:]  # test_passes: nothing saved, skipped
    plain.stdout.fnmatch_lines(["*x=1000*", "*during reuse phase*"])

    # So does an isolated one: the container reads the database (read-only).
    again = run("-v", f"--isolate-mode={mode}", "--hypothesis-profile=reuse")
    assert_no_database_warning(again)
    assert_clean_progress(again)
    assert again.parseoutcomes()["failed"] == 1, _text(again)[-6000:]
    again.stdout.fnmatch_lines(["*x=1000*"])


def test_an_example_that_passes_again_is_deleted(pytester, run) -> None:
    """Hypothesis deletes a saved example that no longer fails: the container's
    deletes reach the database too."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_property="""
import os
import pytest
from hypothesis import given, strategies as st

LIMIT = open(os.path.join(os.path.dirname(__file__), "limit.txt")).read()

@pytest.mark.isolated
@given(st.integers())
def test_small(x):
    assert LIMIT == "off" or x < int(LIMIT)
""")
    limit = pytester.path / "limit.txt"
    limit.write_text("1000")
    run("--isolate-mode=fork").assert_outcomes(failed=1)
    limit.write_text("off")  # every x passes now (x=1000 too): Hypothesis deletes it
    fixed = run("--isolate-mode=fork", "--hypothesis-profile=reuse")
    assert_no_database_warning(fixed)
    assert fixed.ret == 0 and fixed.parseoutcomes() == {"passed": 1}, _text(fixed)[-6000:]
    limit.write_text("1000")  # had it not been deleted, this would fail from the database
    plain = run("-p", "no:isolate", "--hypothesis-profile=reuse", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    assert "failed" not in plain.parseoutcomes(), _text(plain)[-6000:]


def test_database_from_settings_is_respected(pytester, run) -> None:
    """``@settings(database=...)`` names where examples go; the default stays untouched."""
    pytester.makepyfile(test_custom="""
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

@pytest.mark.isolated
@settings(database=DirectoryBasedExampleDatabase("custom-db"))
@given(st.text())
def test_short(s):
    assert len(s) < 3
""")
    result = run("--isolate-mode=fork")
    assert_no_database_warning(result)
    result.assert_outcomes(failed=1)
    assert saved(pytester.path / "custom-db")
    assert not (pytester.path / ".hypothesis" / "examples").exists()


HOSTILE = """
import base64, os
import pytest
from pytest_isolate.runtime import link

""" + FIND_CHANNEL + """
def b64(data):
    return base64.b64encode(data).decode()

def write(op="save", path=None, key=b"k", value=b"v", dest=None, raw=None):
    fields = raw or {"op": op, "path": path or EXAMPLES, "key": b64(key), "value": b64(value),
                     "dest": None if dest is None else b64(dest)}
    link.send(channel(), "hypothesis_write", fields)

@pytest.mark.isolated
def test_1_forged_writes():
    write(key=b"garbage-key", value=b"garbage")                       # the database: allowed
    write(path=OUTSIDE, key=b"outside", value=b"x")                   # not a database: dropped
    write(path=EXAMPLES + "/../../escape", key=b"escape", value=b"x")  # not a database: dropped
    write(path="/etc", key=b"etc", value=b"x")                        # not a database: dropped
    write(key=b"k" * 100_000, value=b"x")                             # over the key cap: dropped
    write(op="move", key=b"garbage-key", dest=b"moved-key", value=b"garbage")
    for _ in range(200):
        write(key=b"many", value=os.urandom(8))

@pytest.mark.isolated
def test_2_malformed_write():
    write(key=b"dropped-with-the-rest", value=b"x")
    write(raw={"op": "save", "path": EXAMPLES, "key": "!!not base64!!", "value": "", "dest": None})

@pytest.mark.isolated
def test_3_unknown_op():
    write(raw={"op": "unlink", "path": EXAMPLES, "key": "", "value": "", "dest": None})

@pytest.mark.isolated
def test_4_victim():
    pass
"""


@pytest.mark.parametrize("mode", MODES)
def test_hostile_database_writes(pytester, run, mode: str, tmp_path_factory) -> None:
    """Forged writes land only in the project's database (garbage there is what a
    plain run allows too); anything malformed is tampering; the run goes on."""
    outside = tmp_path_factory.mktemp("outside")
    examples = pytester.path / ".hypothesis" / "examples"
    pytester.makepyfile(test_hostile=f"EXAMPLES = {str(examples)!r}\nOUTSIDE = {str(outside)!r}\n" + HOSTILE)
    result = run("-rA", f"--isolate-mode={mode}")
    text = _text(result)
    assert "INTERNALERROR" not in text and result.ret == 1, text[-6000:]
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["PASSED test_hostile.py::test_1_forged_writes",
                                 "PASSED test_hostile.py::test_4_victim"])
    assert text.count("tampered with its report channel") >= 2, text[-6000:]
    assert "not base64" in text and "unknown kind" in text, text[-6000:]

    db = DirectoryBasedExampleDatabase(examples)
    assert list(db.fetch(b"garbage-key")) == []  # moved
    assert list(db.fetch(b"moved-key")) == [b"garbage"]
    assert len(list(db.fetch(b"many"))) == 200
    assert list(db.fetch(b"dropped-with-the-rest")) == []  # its test tampered: all dropped
    for key in (b"outside", b"escape", b"etc"):
        assert list(db.fetch(key)) == []
    assert not list(outside.iterdir())
    assert not os.path.exists(pytester.path / "escape")
    assert not os.path.exists(os.path.join("/etc", _hash(b"etc")))
    for entry in (pytester.path / ".hypothesis").iterdir():
        assert entry.name in ("examples", ".gitignore", "constants"), entry
    assert all(os.path.dirname(p) != "" for p in saved(examples))  # files only in key directories


@pytest.mark.parametrize("mode", MODES)
def test_container_session_warnings_stay_out_of_the_progress_line(pytester, run, mode: str) -> None:
    """A warning that a session shows outside any test (here at its start, as
    Hypothesis's header did about its database) is shown by the controller's own
    session, once, as in a plain run; the container sessions' copies go nowhere."""
    pytester.makeconftest("""
import warnings

def pytest_report_header(config):
    warnings.warn("SESSION-START-WARNING")
""")
    pytester.makepyfile(test_two="""
import pytest

@pytest.mark.isolated
def test_one():
    pass

@pytest.mark.isolated
def test_two():
    pass
""")
    plain = run("-v", "-p", "no:isolate", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    isolated = run("-v", f"--isolate-mode={mode}")
    isolated.assert_outcomes(passed=2)
    assert _text(isolated).count("SESSION-START-WARNING") == _text(plain).count("SESSION-START-WARNING") >= 1
    lines = [line for line in isolated.outlines if "::" in line and line.startswith("test_")]
    assert len(lines) == 2 and all(PROGRESS.match(line) for line in lines), _text(isolated)[-6000:]


def test_database_writes_are_checked() -> None:
    """The controller's checks of one write, without a container."""
    from pytest_isolate import boundary, hypothesis_support as hs

    def write(**fields):
        data = {"op": "save", "path": "/p/.hypothesis/examples", "key": "a2V5", "value": "dg==", "dest": None}
        return hs.check_write(dict(data, **fields))

    assert write() == ("save", "/p/.hypothesis/examples", b"key", None, b"v")
    assert write(path="/p/x/../.hypothesis/examples")[1] == "/p/.hypothesis/examples"
    assert write(op="move", dest="ZA==")[3] == b"d"
    assert write(key="a" * (hs.MAX_KEY * 2)) is None  # over the cap: dropped
    for bad in ({"op": "rm"}, {"path": "relative"}, {"path": 7}, {"key": None}, {"key": "***"},
                {"value": ["x"]}, {"dest": "ZA=="}, {"op": "move"}, {"path": "/p" + "/x" * 4000}):
        with pytest.raises(boundary.Tampering):
            write(**bad)
    with pytest.raises(boundary.Tampering):
        hs.check_write("not a mapping")


def test_a_database_the_controller_cannot_write_warns_as_in_a_plain_run(pytester, run, monkeypatch) -> None:
    """Hypothesis's own warning is not hidden where a plain run shows it."""
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", "/proc/sys/pytest-isolate-nowhere")
    pytester.makepyfile(test_property=PROPERTY)
    plain = run("-p", "no:isolate", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    isolated = run("--isolate-mode=fork")
    assert isolated.parseoutcomes()["failed"] == 1, _text(isolated)[-6000:]
    for result in (plain, isolated):
        result.stdout.fnmatch_lines(["*warnings summary*", "*the default location is unusable*"])
    assert not [line for line in isolated.errlines if line.strip()], _text(isolated)[-6000:]
