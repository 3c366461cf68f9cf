"""The typed link every process boundary speaks (runtime/link.py), and the namespace
table (runtime/namespaces.py): unit tests, no container."""

from __future__ import annotations

import os
import re

import pytest

from pytest_isolate.runtime import link, namespaces, syscalls


def test_a_registered_message_passes_with_exactly_its_fields() -> None:
    assert link.check(("reap", {"pid": 7}), ("reap",)) == ("reap", {"pid": 7})
    fields = {"id": 1, "mounts": [], "hostname": "h", "network": "none", "hosts": [], "host_number": None,
              "watch_ports": False, "allow": [], "netem": [], "outbound": False, "snapshot": None}
    assert link.message("build", **fields) == ("build", fields)


@pytest.mark.parametrize("message, expected, why", [
    (("forked", {"pid": 3}), ("reap",), "expected reap, got 'forked'"),
    (("reap", {}), ("reap",), "reap with fields missing ['pid']"),
    (("reap", {"pid": 1, "extra": 2}), ("reap",), "unknown ['extra']"),
    (("reap", {"pid": "1"}), ("reap",), "reap with a str for pid"),
    (("reap", {"pid": True}), ("reap",), "reap with a bool for pid"),
    (["reap"], ("reap",), "not (name, {fields})"),
    (("reap", [1]), ("reap",), "not (name, {fields})"),
])
def test_anything_else_is_unexpected_and_says_what_came(message, expected, why) -> None:
    with pytest.raises(link.Unexpected, match=re.escape(why)):
        link.check(message, expected)


def test_a_message_of_ours_that_breaks_its_registry_entry_is_refused_before_it_leaves() -> None:
    with pytest.raises(link.Unexpected):
        link.message("job", nodeid="x")


def test_text_carries_one_message_and_names_the_one_it_expects() -> None:
    text = link.to_text("spec", entries=[{"type": "tmpfs", "dst": "/tmp"}], sources=[], cwd="/", hostname="h",
                        env=None, python_path=[], library_path=None, allow=[], networks=[], outbound=None)
    assert link.from_text(text, "spec")["entries"] == [{"type": "tmpfs", "dst": "/tmp"}]
    with pytest.raises(link.Unexpected, match="expected launched, got 'spec'"):
        link.from_text(text, "launched")
    with pytest.raises(link.Unexpected, match="not JSON"):
        link.from_text("{", "spec")


def test_the_job_pipe_carries_one_frame_or_nothing() -> None:
    r, w = os.pipe()
    link.send(w, *link.message("job", nodeid="t.py::x", fresh_arg="/t.py::x", deadline=None, capture_cap=4096,
                               services={}, container={}))
    os.close(w)
    assert link.read_one(r, "job") == {"nodeid": "t.py::x", "fresh_arg": "/t.py::x", "deadline": None,
                                       "services": {}, "container": {},
                                       "capture_cap": 4096}
    r, w = os.pipe()
    os.close(w)
    assert link.read_one(r, "job") is None  # "never mind"


def test_a_channel_passes_fds_and_closes_those_of_an_unexpected_message() -> None:
    one, two = link.Channel.pair()
    r, w = os.pipe()
    try:
        one.send("built", [r], id=4, addresses=[])
        name, fields, fds = two.receive("built", "build_failed")
        assert (name, fields, len(fds)) == ("built", {"id": 4, "addresses": []}, 1)
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe, passed by the kernel
        os.close(fds[0])
        before = set(os.listdir("/proc/self/fd"))
        one.send("built", [r], id=5, addresses=[])
        with pytest.raises(link.Unexpected, match="expected reaped, got 'built'"):
            two.receive("reaped")
        assert set(os.listdir("/proc/self/fd")) == before  # the passed fd was closed
        one.close()
        assert two.receive("built") is None  # the other end is gone
    finally:
        for fd in (r, w):
            os.close(fd)
        two.close()


def test_the_reader_takes_frames_split_anywhere_and_stops_at_the_first_broken_one() -> None:
    stream = link.encode("report", {"data": {"x": "é"}}) + link.encode("warning", {})
    for cut in range(len(stream) + 1):
        reader = link.Reader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [name for name, _ in got] == ["report", "warning"] and reader.problem is None
    reader = link.Reader()
    assert reader.feed(b"\x00\x00\x00\x02{]" + link.encode("report", {})) == []
    assert reader.problem == "a message that is not JSON (JSONDecodeError)"


def test_the_namespace_table_orders_what_each_maker_makes() -> None:
    names = [ns.name for ns in namespaces.ORDERED]
    assert names[0] == "user"  # it grants the right to make the others rootless
    assert sorted(names) == sorted(set(names))
    assert [ns.name for ns in namespaces.JOINED] == ["mnt", "net", "uts", "ipc"]
    assert namespaces.FILES == ("pid", "mnt", "net", "uts", "ipc")
    assert namespaces.HOST_LATE_FLAGS == (syscalls.CLONE_NEWNET | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
                                          | syscalls.CLONE_NEWPID)
    assert namespaces.TEST_FLAGS == syscalls.CLONE_NEWCGROUP
