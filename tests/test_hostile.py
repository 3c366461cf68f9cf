"""Hostile tests: an isolated test is hostile code; the boundary behind its container must hold.

Each probe is an inner test that attacks the controlling pytest from inside a real
container -- through its report channel (the memfd ``pytest-isolate-events``: forged,
garbled, oversized frames), its timeout, its ``:rw`` mounts (planted modules, sources
swapped for symlinks) or its capabilities -- and the outer test checks that the attack
failed: the attacker fails ("tampered with its report channel" where it broke the
protocol), every other test keeps its own outcome, nothing runs in the controller or
changes outside the container, and the run ends in time, exit code 1, no INTERNALERROR.
Both modes, root and rootless: the suite's lanes (conftest.py, test_rootless.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import FIND_CHANNEL, IS_ROOT, SUITE_MODE_ARGS

MODES = ("fork", "fresh")
TAMPERED = "tampered with its report channel"

# The attacker's toolkit, at the top of every inner file: how a test finds its channel
# and writes frames with the plugin's own encoder (or raw bytes).
COMMON = '''
import ctypes, errno, os, site, stat, struct, sys, time
import pytest
from pytest_isolate.runtime import link

''' + FIND_CHANNEL + '''
def me():
    return os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]

def send(name, data):
    link.send(channel(), name, data)

def raw(data):
    os.write(channel(), data)

def frame(body):
    return struct.pack(">I", len(body)) + body

def report(when="call", outcome="passed", **fields):
    nodeid = fields.get("nodeid", me())
    path, _, name = str(nodeid).partition("::")
    data = {"$report_type": "TestReport", "nodeid": nodeid, "location": [path, 1, name], "keywords": {},
            "outcome": outcome, "longrepr": None, "when": when, "user_properties": [], "sections": [],
            "duration": 0.0, "start": 0.0, "stop": 0.0}
    data.update(fields)
    return {"data": data}

def warning(module, name):
    return {"warning": {"message": "probe", "category_module": module, "category_name": name,
                        "filename": __file__, "lineno": 1}, "when": "runtest", "nodeid": me(), "location": None}

def forge_finished():
    send("finished", {"usage": {}})
'''
VICTIM = """
@pytest.mark.isolated
def test_victim():  # after the attacker: its outcome must be its own
    pass
"""


def inner(pytester: pytest.Pytester, name: str, body: str, **constants) -> None:
    header = "".join(f"{key} = {value!r}\n" for key, value in constants.items())
    pytester.makepyfile(**{name: header + COMMON + body + VICTIM})


def assert_sane(result: pytest.RunResult, ret: int | tuple = 1) -> str:
    """No INTERNALERROR, the expected exit code; the whole output."""
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text, text[-6000:]
    assert result.ret in (ret if isinstance(ret, tuple) else (ret,)), text[-6000:]
    return text


def assert_tampered(result: pytest.RunResult, attacker: str, victims: tuple[str, ...]) -> str:
    text = assert_sane(result)
    assert result.parseoutcomes().get("failed") == 1, text[-6000:]
    result.stdout.fnmatch_lines([f"FAILED {attacker} - *"])
    assert TAMPERED in text, text[-6000:]
    for victim in victims:
        assert text.count(f"PASSED {victim}") == 1 and f"FAILED {victim}" not in text, text[-6000:]
    return text


def kill_writers(path: Path) -> None:
    """SIGKILL every process holding ``path`` open (a container that outlived its test)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), os.stat(path))
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


# -- 1. code execution in the controller -----------------------------------------------

def test_warning_category_is_never_imported(pytester, run) -> None:
    """A warning naming category ``venv.__main__`` must not run venv in the controller."""
    inner(pytester, "test_venv", """
@pytest.mark.isolated
def test_attacker():
    send("warning", warning("venv.__main__", "x"))
""")
    text = assert_sane(run("-rA", timeout=120), ret=(0, 1))
    assert "PASSED test_venv.py::test_victim" in text and "usage: venv" not in text, text[-6000:]
    assert not list(pytester.path.rglob("pyvenv.cfg"))


def test_module_planted_on_sys_path_is_never_imported(pytester, run, tmp_path_factory) -> None:
    """Through a :rw mount of a directory on the controller's sys.path (the test
    directory, via PYTHONPATH and rootdir insertion), a test plants ``evil_*.py`` and
    names it as a warning category; importing it would create a sentinel in a host
    directory no container can write."""
    sentinel = tmp_path_factory.mktemp("outside") / "ran-in-the-controller"
    module = f"evil_{uuid.uuid4().hex[:12]}"
    os.chmod(pytester.path, 0o777)  # as root, :rw mounts are written by an unprivileged uid
    inner(pytester, "test_plant", """
@pytest.mark.isolated(mounts=[f"{HERE}:/mnt/d:rw"])
def test_attacker():
    with open(f"/mnt/d/{MODULE}.py", "w") as f:
        f.write(f"open({SENTINEL!r}, 'w').close()\\n")
    send("warning", warning(MODULE, "x"))
""", HERE=str(pytester.path), MODULE=module, SENTINEL=str(sentinel))
    text = assert_sane(run("-rA", timeout=120), ret=(0, 1))
    assert (pytester.path / f"{module}.py").exists(), "the attack did not even plant its module"
    assert not sentinel.exists(), "the controller imported a module the test wrote"
    assert "PASSED test_plant.py::test_victim" in text, text[-6000:]


# -- 2. forged and erased outcomes -------------------------------------------------------

def test_report_for_another_test_is_refused(pytester, run) -> None:
    inner(pytester, "test_forge", """
@pytest.mark.isolated
def test_a():
    send("report", report(nodeid="test_forge.py::test_victim", outcome="failed", longrepr="forged"))
""")
    assert_tampered(run("-rA", timeout=120), "test_forge.py::test_a", ("test_forge.py::test_victim",))


def test_forged_pass_does_not_beat_a_strict_xfail(pytester, run) -> None:
    inner(pytester, "test_xpass", """
@pytest.mark.isolated
@pytest.mark.xfail(strict=True)
def test_attacker():
    send("report", report(outcome="passed"))
    assert False
""")
    result = run("-rA", timeout=120)
    text = assert_sane(result, ret=(0, 1))
    assert "PASSED test_xpass.py::test_attacker" not in text, text[-6000:]
    assert result.parseoutcomes().get("xfailed", 0) + result.parseoutcomes().get("failed", 0) == 1
    assert text.count("PASSED test_xpass.py::test_victim") == 1


def test_forged_finished_then_exit_1_is_a_failure(pytester, run) -> None:
    inner(pytester, "test_exit", """
@pytest.mark.isolated
def test_attacker():
    forge_finished()
    os._exit(1)
""")
    result = run("-rA", timeout=120)
    text = assert_sane(result)
    assert "no tests ran" not in text and result.parseoutcomes().get("failed") == 1, text[-6000:]
    result.stdout.fnmatch_lines(["FAILED test_exit.py::test_attacker - *"])
    assert "exited with status 1" in text or TAMPERED in text, text[-6000:]


# -- 3. timeouts -------------------------------------------------------------------------

HANG = """
@pytest.mark.isolated(timeout=5)
def test_attacker():
    forge_finished()
    while True:  # until the timeout ends it: the only clock
        if CHATTY:  # valid, harmless frames all along
            send("testsuite_property", {"name": "probe", "value": 1})
            send("warning", warning("builtins", "UserWarning"))
        time.sleep(0.2)
"""


@pytest.mark.parametrize("chatty", [False, True], ids=["silent", "chatty"])
@pytest.mark.parametrize("mode", MODES)
def test_forged_finished_does_not_stop_the_timeout(pytester, run, mode: str, chatty: bool) -> None:
    """After a forged "finished" the test sleeps (or keeps writing frames) for ever: its
    host still kills it at its 5 s timeout, and says so (the controller's watchdog, 30 s
    later, would report a lost link instead)."""
    inner(pytester, "test_hang", HANG, CHATTY=chatty)
    result = run(f"--isolate-mode={mode}", "-rA", timeout=180)
    text = assert_sane(result)
    result.stdout.fnmatch_lines(["FAILED test_hang.py::test_attacker - *"])
    assert "lost the link" not in text, text[-6000:]
    assert "Timeout: the test ran longer than timeout=5s" in text or TAMPERED in text, text[-6000:]
    assert text.count("PASSED test_hang.py::test_victim") == 1, text[-6000:]


GROW = """
@pytest.mark.isolated(timeout=5, mounts=[f"{SHARED}:/mnt/d:rw"])
def test_1_attacker():
    log = open("/mnt/d/grow.log", "a")
    log.write("start\\n")
    log.flush()
    forge_finished()
    while True:
        log.write("x\\n")
        log.flush()
        time.sleep(0.1)

@pytest.mark.isolated(mounts=[f"{SHARED}:/mnt/d:rw"])
def test_2_next():
    size = os.stat("/mnt/d/grow.log").st_size
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        assert os.stat("/mnt/d/grow.log").st_size == size, "the previous test's container still runs"
        time.sleep(0.05)
"""


@pytest.mark.parametrize("mode", MODES)
def test_timed_out_container_is_gone_before_the_next_test(pytester, run, mode: str) -> None:
    shared = pytester.mkdir("shared")
    os.chmod(shared, 0o777)
    log = shared / "grow.log"
    inner(pytester, "test_grow", GROW, SHARED=str(shared))
    try:
        result = run(f"--isolate-mode={mode}", "-rA", timeout=60)
        text = assert_sane(result)
        assert log.read_text().count("x\n") >= 2, "the attacker's writer never ran"
        result.stdout.fnmatch_lines(["PASSED test_grow.py::test_2_next"])
        result.stdout.fnmatch_lines(["FAILED test_grow.py::test_1_attacker - *"])
        size, deadline = log.stat().st_size, time.monotonic() + 1
        while time.monotonic() < deadline:  # and nothing writes on once the run is over
            assert log.stat().st_size == size, "a container of the run outlived it"
            time.sleep(0.05)
        assert "Timeout" in text or TAMPERED in text, text[-6000:]
    finally:
        kill_writers(log)


# -- 4. malformed frames -----------------------------------------------------------------

MALFORMED = {
    "garbage": r'raw(b"\x00\x00\x00\x10" + b"\xff\xfe\xfd\xfc" * 4)',
    "length_ffffffff": r'raw(b"\xff\xff\xff\xff" + b"\x00" * 16)',
    "truncated": 'raw(link.encode("report", report())[:-5])',
    "not_a_frame": "raw(frame(b'\"report\"'))",
    "data_is_a_list": 'send("report", [1, 2, 3])',
    "nodeid_int": 'send("report", report(nodeid=7))',
    "when_bogus": 'send("report", report(when="bogus"))',
    "outcome_weird": 'send("report", report(outcome="weird"))',
    "location_string": 'send("report", report(location="test_frames.py"))',
    "longrepr_number": 'send("report", report(outcome="failed", longrepr=42))',
    "phase_out_of_order": 'send("report", report(when="teardown"))',
    "phase_twice": 'send("report", report(when="setup"))',
    "unknown_event": 'send("no_such_event", {"x": 1})',
    "deeply_nested": "raw(frame(b'[\"report\",{\"data\":' + b'[' * 200000 + b']' * 200000 + b'}]'))",
    "huge_integer": "raw(frame(b'[\"report\",{\"data\":{\"nodeid\":' + b'9' * 100000 + b'}}]'))",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_frame_fails_only_its_own_test(pytester, run, kind: str) -> None:
    inner(pytester, "test_frames", f"""
@pytest.mark.isolated
def test_attacker():
    {MALFORMED[kind]}
""")
    assert_tampered(run("-rA", timeout=120), "test_frames.py::test_attacker", ("test_frames.py::test_victim",))


# -- 5. memory DoS through sparse files --------------------------------------------------

BALLOON = """
@pytest.mark.isolated(memory="64m")
def test_attacker():
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if ATTACK and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 1 << 40)  # 1 TiB, sparse: costs the test nothing
        except OSError:
            pass
"""
# Runs pytest, then prints its exit code and the peak RSS (KiB) of every process the
# run waited for: the controller, its container hosts and what they reaped.
WRAPPER = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out:
    code = subprocess.run([sys.executable, "-m", "pytest", *sys.argv[2:]], stdout=out,
                          stderr=subprocess.STDOUT, timeout=240).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_sparse_files_do_not_balloon_the_run(pytester) -> None:
    peaks, texts = {}, {}
    for attack in (False, True):
        inner(pytester, "test_balloon", BALLOON, ATTACK=attack)
        out = pytester.path / f"output-{attack}.txt"
        done = subprocess.run([sys.executable, "-c", WRAPPER, str(out), "-p", "no:cacheprovider", *SUITE_MODE_ARGS,
                               "--isolate-limits=best-effort", "-rA", "test_balloon.py"],
                              cwd=pytester.path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        code, peaks[attack] = map(int, done.stdout.split())
        size = out.stat().st_size  # read no further than this: the file may be a sparse TiB
        assert size < 16 << 20, f"the run's output file is {size} bytes (a container held it open: see below)"
        texts[attack] = out.read_text(errors="replace")
        assert "\x00" * 1000 not in texts[attack] and "\\x00" * 1000 not in texts[attack]
        assert "INTERNALERROR" not in texts[attack] and code in (0, 1), texts[attack][-6000:]
        assert "PASSED test_balloon.py::test_victim" in texts[attack], texts[attack][-6000:]
    assert "PASSED test_balloon.py::test_attacker" not in texts[True], texts[True][-6000:]
    growth = peaks[True] - peaks[False]
    assert growth < 64 << 10, f"peak RSS grew by {growth} KiB ({peaks})"


def test_no_fd_of_the_controllers_output_reaches_the_test(pytester, tmp_path_factory) -> None:
    """The output of the run (here a log file, outside any mount) is not writable from a
    container: no fd of the test leads to it (with one, a test can write anything into
    the log or terminal, or ftruncate the log to a sparse TiB)."""
    log = tmp_path_factory.mktemp("log") / "pytest.log"
    with open(log, "wb") as out:
        info = os.fstat(out.fileno())
        inner(pytester, "test_fds", """
@pytest.mark.isolated
def test_attacker():
    held = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == LOG:
                held.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass
    assert not held, f"the test holds the controller's output: {held}"
""", LOG=(info.st_dev, info.st_ino))
        code = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SUITE_MODE_ARGS, "-rA",
                               "test_fds.py"], cwd=pytester.path, stdout=out, stderr=out, timeout=120).returncode
    text = log.read_text(errors="replace")
    assert code == 0 and "INTERNALERROR" not in text, text[-6000:]
    assert "PASSED test_fds.py::test_attacker" in text and "PASSED test_fds.py::test_victim" in text


# -- 6. mount sources swapped for symlinks ------------------------------------------------

SWAP_A = """
@pytest.mark.isolated(mode="fork", mounts=[f"{D}:/mnt/a:rw"])
def test_a_swaps_the_source():
    os.rename("/mnt/a/sub", "/mnt/a/sub-orig")
    os.symlink(TARGET, "/mnt/a/sub")
"""
SWAP_B = """
def test_b0_waits_for_the_swap():  # not isolated: on the host, in B's worker, before B's host starts
    deadline = time.monotonic() + 30
    while not os.path.islink(f"{D}/sub"):
        assert time.monotonic() < deadline, "A never swapped the source"
        time.sleep(0.05)

@pytest.mark.isolated(mounts=[f"{D}/sub:/mnt/b:ro"], **B_MODE)
def test_b1_sees_its_own_source():
    names = sorted(os.listdir("/mnt/b"))
    contents = []
    for name in names:
        try:
            contents.append(open(os.path.join("/mnt/b", name), "rb").read(1 << 16))
        except OSError:
            pass
    leaked = {"passwd", "shadow", "secret.txt"} & set(names) or any(SECRET.encode() in c for c in contents)
    assert not leaked, "LEA" + f"KED: {names}"
    assert names == ["harmless.txt"]
"""


@pytest.mark.parametrize("variant", ["fresh-host", "xdist"])
@pytest.mark.parametrize("target", ["etc", "secret"])
def test_swapped_mount_source_is_never_followed(pytester, run, tmp_path_factory, target: str, variant: str) -> None:
    """A (``:rw`` mount of D) swaps D/sub for a symlink to /etc or to a private
    directory (700, a 600 file of known content: the user's home, rootless; as root,
    read-only sources are idmapped, so it would be readable). B mounts D/sub and must
    see the harmless file or fail naming its source. B's host must open the sources
    after the swap: B is in mode "fresh" (a host of its own, started with B), or, with
    ``-n 2 --dist=loadfile`` and A and B in two files, on the other worker, behind a
    plain test that waits on the host for the symlink. (``--dist=loadgroup`` does not
    group under pytest 9.2.)"""
    if variant == "xdist":
        pytest.importorskip("xdist")
    secret_dir = tmp_path_factory.mktemp("private")
    secret = f"TOP-SECRET-{uuid.uuid4().hex}"
    (secret_dir / "secret.txt").write_text(secret)
    os.chmod(secret_dir / "secret.txt", 0o600)
    os.chmod(secret_dir, 0o700)
    d = pytester.mkdir("d")
    (d / "sub").mkdir()
    (d / "sub" / "harmless.txt").write_text("harmless")
    for path in (d, d / "sub"):
        os.chmod(path, 0o777)
    constants = dict(D=str(d), TARGET="/etc" if target == "etc" else str(secret_dir), SECRET=secret)
    inner(pytester, "test_swap_a", SWAP_A, **constants)
    inner(pytester, "test_swap_b", SWAP_B, B_MODE={"mode": "fresh"} if variant == "fresh-host" else {}, **constants)
    args = ("-n", "2", "--dist=loadfile") if variant == "xdist" else ("-p", "no:xdist")
    text = assert_sane(run(*args, "-rA", timeout=180), ret=(0, 1))
    assert "LEAKED" not in text, text[-6000:]
    assert "PASSED test_swap_a.py::test_a_swaps_the_source" in text and os.path.islink(d / "sub"), text[-6000:]
    b = "test_swap_b.py::test_b1_sees_its_own_source"  # a container that cannot start is an ERROR at setup
    assert f"PASSED {b}" in text or (re.search(f"(FAILED|ERROR) {b}", text) and str(d / "sub") in text), text[-6000:]


# -- 7. cap_add=SYS_ADMIN and the read-only image ----------------------------------------

REMOUNT = """
@pytest.mark.isolated(cap_add=["SYS_ADMIN"])
def test_attacker():
    libc = ctypes.CDLL(None, use_errno=True)
    for directory in [PROJECT, *filter(os.path.isdir, site.getsitepackages())]:
        result = libc.mount(None, directory.encode(), None, ctypes.c_ulong(0x20 | 0x1000), None)  # MS_REMOUNT|MS_BIND
        got = (result, ctypes.get_errno())
        try:
            os.close(os.open(os.path.join(directory, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as exc:
            assert exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM), (directory, got, exc)
        else:
            pytest.fail(f"created a file in {directory} after remount {got}")
"""


def test_cap_sys_admin_cannot_make_the_image_writable(pytester, run) -> None:
    """Holds as root today; rootless (the rootless lane runs this file as the user)
    the remount must fail or leave the image read-only."""
    import site

    marker = f"remount-probe-{uuid.uuid4().hex}"
    inner(pytester, "test_remount", REMOUNT, PROJECT=str(pytester.path), MARKER=marker)
    directories = [pytester.path, *map(Path, filter(os.path.isdir, site.getsitepackages()))]
    try:
        result = run("-rA", timeout=120)
    finally:
        created = [d / marker for d in directories if (d / marker).exists()]
        for path in created:
            path.unlink()
    assert not created, f"{created} appeared on the host{'' if IS_ROOT else ' (rootless)'}"
    assert_sane(result, ret=0)
    result.assert_outcomes(passed=2)


# -- 8. a destination that passes through an absolute symlink of the image ----------------

@pytest.mark.skipif(not os.path.islink("/etc/localtime"), reason="/etc/localtime is not a symlink here")
def test_mount_on_an_absolute_symlink_lands_in_the_tests_root(pytester, run) -> None:
    source = pytester.path / "localtime-probe"
    source.write_bytes(b"probe-localtime")
    inner(pytester, "test_localtime", """
@pytest.mark.isolated(mounts=[f"{SOURCE}:/etc/localtime:ro"])
def test_reads_the_mounted_file():
    assert open("/etc/localtime", "rb").read() == b"probe-localtime"
""", SOURCE=str(source))
    result = run("-rA", timeout=120)
    assert_sane(result, ret=0)
    result.assert_outcomes(passed=2)
