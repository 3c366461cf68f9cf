"""Nothing leaks: after a pass, a crash, an ``os._exit``, a timeout or a SIGKILLed
pytest, no process, mount, temporary file or /dev/shm entry a container made is left
on the host.

Processes are found through /proc. Other pytest runs may share this machine, so ours
are told apart by a unique token in the inner pytest's environment (every process of
the container tree inherits it) and a unique argv[0] for the ``sleep`` processes the
inner tests start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import IS_ROOT, find_processes, read_quietly, wait_for
from pytest_isolate.runtime import user_ns

TOKEN_VAR = "PYTEST_ISOLATE_LEAK_TOKEN"
GRACE = 60.0  # how long a leftover may take to go: a safety net, not a bound (one stays for ever)

SPAWN = """
import os, shutil, signal, time
import pytest

MARK = {mark!r}
SLEEP = shutil.which("sleep")

def spawn_sleepers():
    \"\"\"A child `sleep` and a daemonized one (double fork, new session), both with
    argv[0] == MARK; returns once both are running. Also leaves files in /tmp and /dev/shm.\"\"\"
    for path in ("/tmp/" + MARK, "/dev/shm/" + MARK):
        open(path, "w").close()
    if os.fork() == 0:
        os.execv(SLEEP, [MARK, "1000"])
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(SLEEP, [MARK, "1000"])
        os._exit(0)
    deadline = time.monotonic() + 10
    while len(find(MARK)) < 2:
        assert time.monotonic() < deadline, "the sleepers did not start"
        time.sleep(0.01)

def find(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found
"""

ENDINGS = SPAWN + """
@pytest.mark.isolated
def test_pass():
    spawn_sleepers()

@pytest.mark.isolated
def test_crash():
    spawn_sleepers()
    os.kill(os.getpid(), signal.SIGSEGV)

@pytest.mark.isolated
def test_exit():
    spawn_sleepers()
    os._exit(3)

@pytest.mark.isolated(timeout=5)  # from the container's start: ample for a fresh one
def test_timeout():
    spawn_sleepers()
    time.sleep(3600)  # the timeout is the only clock
"""

KILLED = SPAWN + """
@pytest.mark.isolated
def test_sleeps_until_pytest_is_killed():
    spawn_sleepers()
    time.sleep(3600)  # until pytest is killed
"""


# -- the host, seen through /proc ---------------------------------------------------------

def ours(token: str, mark: str) -> dict[int, str]:
    """Processes of our inner run: the sleepers (by argv), and everything that inherited
    the token: controller, container hosts, factories, inits, zygotes, tests, and the launchers and
    fresh interpreters with ``pytest_isolate`` on their command line (processes of other
    runs with ``pytest_isolate`` on theirs are not ours to judge)."""
    found = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        cmdline = read_quietly(f"/proc/{pid}/cmdline")
        if mark.encode() in cmdline or token.encode() in read_quietly(f"/proc/{pid}/environ"):
            found[int(pid)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
    return found


def mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


def container_uid(uid: int) -> bool:
    if not IS_ROOT:
        return False
    start, count = user_ns.root_mapping()[0]
    return start <= uid < start + count


def tmp_suspects(before: set[str], ignore: Path, mark: str) -> list[str]:
    """New system-temp entries a container run could have left: owned by a container
    uid, or named after the plugin or the inner tests' mark. (Entries of concurrent
    unrelated runs are ignored.)"""
    tmp = tempfile.gettempdir()
    found = []
    for name in set(os.listdir(tmp)) - before:
        path = os.path.join(tmp, name)
        if ignore.is_relative_to(path):
            continue
        try:
            uid = os.lstat(path).st_uid
        except OSError:
            continue
        named = mark in name or ("isolate" in name and not name.startswith("pytest-isolate-rootless-"))
        if container_uid(uid) or named:
            found.append(name)
    return found


class HostSnapshot:
    """Mounts, /dev/shm and the temp dirs before an inner run, to compare after it."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        self.token = uuid.uuid4().hex
        self.mark = f"leak-sleeper-{uuid.uuid4().hex[:12]}"
        self.basetemp = pytester.path
        self.private_tmp = pytester.path / "private-tmp"
        self.private_tmp.mkdir()
        monkeypatch.setenv(TOKEN_VAR, self.token)
        monkeypatch.setenv("TMPDIR", str(self.private_tmp))
        self.mounts = mounts()
        self.tmp = set(os.listdir(tempfile.gettempdir()))
        self.shm = set(os.listdir("/dev/shm"))

    def assert_nothing_left(self) -> None:
        left = wait_for(lambda: ours(self.token, self.mark), GRACE)
        assert not left, f"processes left: {left}"
        new_mounts = mounts() - self.mounts
        assert not new_mounts, new_mounts
        assert not [line for line in mounts() if ".pytest-isolate" in line]
        assert os.listdir(self.private_tmp) == []
        assert wait_for(lambda: tmp_suspects(self.tmp, self.basetemp, self.mark), GRACE) == []
        assert wait_for(lambda: sorted(set(os.listdir("/dev/shm")) - self.shm), GRACE) == []


# -- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_nothing_left_after_pass_crash_exit_and_timeout(pytester, run, monkeypatch, mode) -> None:
    snapshot = HostSnapshot(pytester, monkeypatch)
    pytester.makepyfile(test_endings=ENDINGS.format(mark=snapshot.mark))
    result = run(f"--isolate-mode={mode}", "-rA")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines_random([
        "*Crashed: the test's process was killed by signal 11 (SIGSEGV) during call.*",
        "*Crashed: the test's process exited with status 3 during call*",
        "*Timeout: the test ran longer than timeout=5s*",
    ])
    snapshot.assert_nothing_left()


def descendants(root: int) -> dict[int, bytes]:
    """Every process below ``root``, with its start time (to tell a reused pid)."""
    children: dict[int, list[int]] = {}
    for p in (p for p in os.listdir("/proc") if p.isdigit()):
        for line in read_quietly(f"/proc/{p}/status").splitlines():
            if line.startswith(b"PPid:"):
                children.setdefault(int(line.split()[1]), []).append(int(p))
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = start_time(child)
            todo.append(child)
    return found


def start_time(pid: int) -> bytes:
    stat = read_quietly(f"/proc/{pid}/stat")
    return stat.rpartition(b")")[2].split()[19] if stat else b""


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_nothing_left_after_pytest_is_sigkilled(pytester, monkeypatch, mode) -> None:
    snapshot = HostSnapshot(pytester, monkeypatch)
    pytester.makepyfile(test_killed=KILLED.format(mark=snapshot.mark))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--isolate-mode={mode}",
               f"--basetemp={pytester.path / 'inner-basetemp'}", "test_killed.py"]
    inner = subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(find_processes(snapshot.mark)) < 2:
            assert inner.poll() is None, inner.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the inner test's sleepers never showed up"
            time.sleep(0.05)
        tree = descendants(inner.pid)
        assert len(tree) >= 5  # launcher, container host, factory, init, zygote, test, sleeper
        inner.kill()
        inner.wait(10)
        alive = lambda: {p: t for p, t in tree.items() if start_time(p) == t}  # noqa: E731
        assert not wait_for(alive, GRACE), f"still running after {GRACE} s: {ours(snapshot.token, snapshot.mark)}"
        snapshot.assert_nothing_left()
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait(10)
        for pid in ours(snapshot.token, snapshot.mark):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        inner.stdout.close()
