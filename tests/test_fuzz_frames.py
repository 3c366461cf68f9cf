"""Fuzzing the trust boundary: random and mutated event frames, as a hostile test
would write them to its events file.

The decoder and the checks must never raise anything but their own "tampered"
verdict, and whatever a test writes must never change another test's outcome:
in-process against a real collected item (many examples), and end to end in real
containers (a few batches).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FIND_CHANNEL
from pytest_isolate import boundary
from pytest_isolate.options import Settings
from pytest_isolate.replay import Replay
from pytest_isolate.runtime import link

ITEM = "test_item.py::test_x"
VICTIM = "test_item.py::test_victim"
NAMES = ("report", "warning", "testsuite_property", "session_exit", "container_error", "not_collected",
         "finished", "bogus", "")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)


def report(nodeid: str, when: str, outcome: str, **extra) -> dict:
    data = {"$report_type": "TestReport", "nodeid": nodeid, "location": ["test_item.py", 0, "test_x"],
            "keywords": {"test_x": 1}, "outcome": outcome, "longrepr": None, "when": when,
            "user_properties": [], "sections": [], "duration": 0.01, "start": 1.0, "stop": 1.01}
    data.update(extra)
    return data


report_frames = st.builds(
    lambda nodeid, when, outcome, extra: link.encode("report", {"data": report(nodeid, when, outcome, **extra)}),
    st.sampled_from([ITEM, ITEM, VICTIM, ""]),
    st.sampled_from(["setup", "call", "teardown", "bogus"]),
    st.sampled_from(["passed", "failed", "skipped", "rerun", "weird"]),
    st.dictionaries(st.sampled_from(["longrepr", "sections", "location", "duration", "wasxfail", "toterminal",
                                     "keywords", "user_properties", "_subtest.context", "head_line"]),
                    json_values, max_size=2),
)
event_frames = st.builds(lambda name, data: link.encode(name, data), st.sampled_from(NAMES),
                         st.dictionaries(st.sampled_from(["data", "warning", "nodeid", "when", "name", "value",
                                                          "reason", "returncode", "message", "step", "location"]),
                                         json_values, max_size=4))


@st.composite
def streams(draw) -> bytes:
    parts = draw(st.lists(st.one_of(report_frames, event_frames, st.binary(max_size=24)), max_size=8))
    stream = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):  # flip some bytes
        if stream:
            stream[draw(st.integers(0, len(stream) - 1))] = draw(st.integers(0, 255))
    if stream and draw(st.booleans()):  # cut it short
        del stream[draw(st.integers(0, len(stream) - 1)):]
    return bytes(stream)


# Generation is slow on a busy CI machine: only correctness is checked here.
SLOW_OK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.function_scoped_fixture])


@given(st.binary(max_size=512) | streams())
@SLOW_OK
def test_the_reader_never_raises_on_any_bytes(data: bytes) -> None:
    reader = link.Reader(cap=1 << 16)
    for cut in (0, len(data) // 3, len(data)):
        for name, payload in reader.feed(data[:cut]) + reader.feed(data[cut:]) if cut else reader.feed(data):
            assert isinstance(name, str) and isinstance(payload, dict)
        reader = link.Reader(cap=1 << 16)
    assert reader.problem is None or isinstance(reader.problem, str)


@given(json_values)
@settings(SLOW_OK, max_examples=300)
def test_checks_raise_nothing_but_tampering(value) -> None:
    checks = (
        lambda v: boundary.check_report(v, ITEM, ("f.py", 0, "t"), pytest.TestReport),
        lambda v: boundary.check_warning(v, ITEM),
        boundary.check_property, boundary.check_session_exit,
        lambda v: boundary.check_problem(v, "x"),
        lambda v: boundary.check_done(v, 1 << 20, 1 << 16),
    )
    for check in checks:
        try:
            check(value)
        except boundary.Tampering:
            pass


class Recorder:
    def __init__(self) -> None:
        self.reports: list = []

    def pytest_runtest_logreport(self, report) -> None:
        self.reports.append(report)


@pytest.fixture
def item_and_recorder(pytester):
    [item] = pytester.getitems(pytester.makepyfile(test_item="def test_x():\n    pass\n"))
    assert item.nodeid == ITEM
    recorder = Recorder()
    item.config.pluginmanager.register(recorder)
    return item, recorder


@given(stream=streams(), status=st.sampled_from([0, 0, 1, 9, None]))
@settings(SLOW_OK, max_examples=400)
def test_any_stream_ends_in_one_outcome_of_its_own_test(item_and_recorder, stream: bytes, status) -> None:
    item, recorder = item_and_recorder
    recorder.reports.clear()
    replay = Replay(item, Settings(), 1 << 20, 1 << 16)
    half = len(stream) // 2  # the first half as a long test's relay, the rest with "done"
    replay.host_events({"chunk": stream[:half]})
    replay.host_done({"status": status, "duration": 0.5, "events": stream[half:]})
    try:
        replay.finish(None)
    except pytest.exit.Exception:  # a well-formed pytest.exit() of a test that exited 0
        assert status == 0 and replay.session_exit is not None
        return
    assert recorder.reports, "no outcome at all"
    assert {r.nodeid for r in recorder.reports} == {item.nodeid}
    assert [r.when for r in recorder.reports].count("teardown") == 1
    assert recorder.reports[-1].when == "teardown"
    assert all(r.duration <= 0.5 for r in recorder.reports)
    if replay.tampered:
        assert any(boundary.TAMPERED in str(r.longrepr) for r in recorder.reports)
    if status != 0:  # the host saw it crash: never a plain pass
        assert any(r.failed or r.skipped for r in recorder.reports)


ATTACKERS = """
import json, os, pytest
STREAMS = json.load(open(os.path.join(os.path.dirname(__file__), "streams.json")))

""" + FIND_CHANNEL + """
@pytest.mark.isolated
@pytest.mark.parametrize("n", range(len(STREAMS)))
def test_attacker(n):
    os.write(channel(), bytes.fromhex(STREAMS[n]))

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(len(STREAMS)))
def test_victim(n):
    pass
"""


@given(st.lists(streams(), min_size=12, max_size=12))
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
def test_in_real_containers_no_stream_touches_another_test(pytester, run, batch) -> None:
    (pytester.path / "streams.json").write_text(json.dumps([s.hex() for s in batch]))
    pytester.makepyfile(test_item=ATTACKERS)
    result = run("-rA", "-p", "no:randomly", timeout=300)
    output = result.stdout.str()
    assert "INTERNALERROR" not in output
    assert result.ret in (0, 1), output[-3000:]
    for n in range(12):
        assert f"PASSED test_item.py::test_victim[{n}]" in output, output[-3000:]
