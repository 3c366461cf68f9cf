"""Units with no kernel in them: the event framing, option merging, image entries."""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
import time

import pytest

from pytest_isolate import images, options
from pytest_isolate.runtime import link, rootfs, tiny_init


class NotJSON:
    def __repr__(self) -> str:
        return "<NotJSON>"


def test_events_survive_any_split_of_the_stream() -> None:
    stream = link.encode("report", {"data": {"x": [1, 2.5, None, "é"]}}) + link.encode("warning", {})
    for cut in range(len(stream) + 1):
        reader = link.Reader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [("report", {"data": {"x": [1, 2.5, None, "é"]}}), ("warning", {})]
        assert reader.leftover() == 0 and reader.problem is None


def test_values_json_cannot_carry_travel_as_their_repr() -> None:
    [(name, data)] = link.Reader().feed(link.encode("report", {"prop": NotJSON(), "ok": (1,)}))
    assert (name, data) == ("report", {"prop": "<NotJSON>", "ok": [1]})


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x03abc",                                   # not JSON
    struct.pack(">I", 1) + b"5",                              # not a [name, {data}] pair
    struct.pack(">I", 6) + b'["a",1]',                        # data not a dict (and a wrong length)
    struct.pack(">I", 0),                                     # an empty frame
    struct.pack(">I", 0xFFFFFFFF),                            # a length over the cap
    struct.pack(">I", 4) + b"\xff\xfe[]",                      # not UTF-8
    struct.pack(">I", 20003) + b"[" * 10001 + b"]" * 10001 + b"\n",  # nested too deep
])
def test_a_corrupt_stream_stops_the_reader_with_a_problem_not_an_exception(garbage: bytes) -> None:
    reader = link.Reader(cap=1 << 20)
    got = reader.feed(link.encode("ok", {}) + garbage + link.encode("after", {}))
    assert got == [("ok", {})]
    assert reader.problem
    assert reader.feed(link.encode("more", {})) == []


def test_the_reader_takes_no_more_than_its_cap() -> None:
    frame = link.encode("x", {"y": "z" * 100})
    reader = link.Reader(cap=len(frame) * 3)
    assert len(reader.feed(frame * 3)) == 3
    assert reader.feed(frame) == [] and "more than" in reader.problem


def test_later_layers_win_env_merges_per_key_and_mounts_per_destination(tmp_path) -> None:
    a = options.Mount(str(tmp_path), "/data", True)
    b = options.Mount(str(tmp_path), "/data", False)
    c = options.Mount(str(tmp_path), "/other", True)
    settings = options.merge([
        {"hostname": "ini", "env": (("A", "1"), ("B", "1")), "mounts": (a, c)},
        {"hostname": "cli", "env": (("B", "2"),)},
        {"timeout": 3.0, "mounts": (b,)},
    ])
    assert settings.hostname == "cli" and settings.timeout == 3.0
    assert dict(settings.env) == {"A": "1", "B": "2"}
    assert {m.dst: m.readonly for m in settings.mounts} == {"/data": False, "/other": True}


@pytest.mark.parametrize("value, expected", [
    (5, 5.0), ("2.5", 2.5), (None, None), ("none", None), ("0", None),
])
def test_timeout_values(value, expected) -> None:
    assert options.parse_timeout(value, "/") == expected


def test_relative_mount_sources_resolve_against_the_given_base(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    [mount] = options.parse_mounts(["./data:/data:rw"], str(tmp_path))
    assert mount == options.Mount(str(tmp_path / "data"), "/data", False)


def test_entries_are_applied_parents_first() -> None:
    entries = [{"type": "bind", "dst": "/tmp/project/sub"}, {"type": "tmpfs", "dst": "/tmp"},
               {"type": "dev", "dst": "/dev/null"}, {"type": "tmpfs", "dst": "/dev"}]
    assert [e["dst"] for e in rootfs.ordered(entries)] == ["/dev", "/tmp", "/dev/null", "/tmp/project/sub"]


def test_the_host_image_binds_system_and_project_read_only_but_never_proc_or_dev(tmp_path) -> None:
    entries = images.host_image([str(tmp_path), "/proc/self", "/dev"])
    binds = {e["dst"]: e for e in entries if e["type"] == "bind"}
    assert binds["/usr"]["ro"] and not binds["/usr"].get("idmap")
    assert binds[str(tmp_path)]["ro"] and binds[str(tmp_path)]["idmap"]
    assert not any(d == "/proc" or d.startswith(("/proc/", "/dev/")) for d in binds)
    assert {e["dst"] for e in entries if e["type"] == "dev"} <= {f"/dev/{d}" for d in images.DEVICES}
    prefix = os.path.realpath(os.__file__)
    assert any(prefix.startswith(d + "/") for d in binds), "the interpreter's stdlib is bound"


def _init_asleep(pid: int, timeout: float = 5) -> list[str]:
    """[name, state] of ``pid`` from /proc/PID/stat, once it is an isolate-init that
    sleeps (or when ``timeout`` is up)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as f:
            seen = f.read().split()[1:3]
        if seen == ["(isolate-init)", "S"] or time.monotonic() > deadline:
            return seen
        time.sleep(0.01)


@pytest.mark.skipif(tiny_init.program() is None, reason="no machine code for this architecture")
def test_the_tiny_init_is_a_static_program_that_sleeps_until_killed(tmp_path) -> None:
    path = tmp_path / "isolate-init"
    path.write_bytes(tiny_init.program())
    path.chmod(0o755)
    pid = os.posix_spawn(str(path), [str(path)], {})
    try:
        assert _init_asleep(pid) == ["(isolate-init)", "S"]
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read().splitlines()
        assert not any(".so" in line for line in maps), maps  # static: no loader, no libc
        assert any(line.split()[1] == "rw-p" and "[stack]" in line for line in maps), maps  # stack not executable
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_no_tiny_init_where_there_is_no_machine_code() -> None:
    assert tiny_init.program("riscv64") is None
    assert tiny_init.program("x86_64")[:4] == b"\x7fELF"


def test_a_host_that_cannot_start_pytest_reports_why_with_the_stage_notes(monkeypatch) -> None:
    """e.g. root on Linux < 6.3 with the project on tmpfs: the bind is not idmapped, so
    container root cannot read the project's pytest.toml; the note says why."""
    from pytest_isolate import remote
    from pytest_isolate.runtime import launch

    def unreadable(*args):
        raise PermissionError(13, "Permission denied", "/project/pytest.toml")

    sent = []

    class Channel:
        def receive(self):
            return link.to_text("start", sys_path=list(sys.path), argv=list(sys.argv), option_dict={}, args=[],
                                workerinput={}, entries=[], collect=True, shared=[], own_stdlib=False,
                                own_packages=False)

        def send(self, message):
            sent.append(message)

    monkeypatch.setattr(remote.reporter, "make_config", unreadable)
    monkeypatch.setattr(remote.reporter, "quiet_session_output", lambda kept=False: 1)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv(launch.LAUNCHED_ENV, link.to_text(
        "launched", error=None, notes=["/project is not idmapped (Invalid argument (errno 22))"],
        factory_fd=None, mounts_unlocked=None))
    remote.serve(Channel())
    assert sent == [("host_error", {"message": "pytest could not start there (Permission denied (errno 13): "
                                               "/project/pytest.toml); /project is not idmapped "
                                               "(Invalid argument (errno 22))"})]


def test_without_the_tiny_init_a_forked_python_sleeper_is_pid_1() -> None:
    """The factory's fallback (no machine code for this CPU, or the exec refused):
    run in a forked child that has a user and pid namespace of its own."""
    from pytest_isolate.runtime import factory, syscalls, user_ns

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            user_ns.enter()
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # as in the factory
            syscalls.unshare(syscalls.CLONE_NEWPID)
            factory._tiny_init_works.clear()
            init = factory._spawn_init()
            asleep = _init_asleep(init)
            with open(f"/proc/{init}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            os.kill(init, signal.SIGKILL)
            code = 0 if asleep == ["(isolate-init)", "S"] and nspid[-1] == "1" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_v1_memory_limit_waits_while_the_group_still_holds_more(tmp_path, monkeypatch) -> None:
    """EBUSY: the previous test's mounts are released by deferred kernel work, their
    pages charged until then; the write is tried again until it holds or time is up."""
    from pytest_isolate.runtime import cgroups

    limit = tmp_path / "memory.limit_in_bytes"
    (tmp_path / "memory.usage_in_bytes").write_text("99999999\n")
    refusals = [3]
    real_write = cgroups._write

    def busy_then_fine(path, value):
        if refusals[0]:
            refusals[0] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", busy_then_fine)
    cgroups._write_memory_limit(str(limit), 67108864)
    assert limit.read_text() == "67108864" and refusals == [0]
    refusals[0] = 10 ** 9
    monkeypatch.setattr(cgroups, "BUSY_DEADLINE", 0.05)
    with pytest.raises(OSError, match="the memory limit 1 is below the 99999999 bytes its group still holds"):
        cgroups._write_memory_limit(str(limit), 1)
