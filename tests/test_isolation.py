"""Each isolation property, proven from inside a real container.

The inner tests assert the property themselves; every check is also run once
without the plugin (`-p no:isolate`), where each one that the bare host lacks fails, so
none of them can pass vacuously (see bare_host_outcomes() for the few that a host can
pass on its own, and why).
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from conftest import IS_ROOT

PROPERTIES = textwrap.dedent(
    """
    import errno, os, socket, pytest

    MARKER = {marker!r}
    PORT = {port}
    SHM_KEY = {shm_key}

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()

    @pytest.mark.isolated
    def test_sees_only_its_own_processes():
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        assert pids == [1, 2] and os.getpid() == 2

    @pytest.mark.isolated
    def test_host_process_is_invisible():
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                assert MARKER.encode() not in f.read()
        with pytest.raises(ProcessLookupError):
            os.kill({host_pid}, 0)

    @pytest.mark.isolated
    def test_hostname_is_not_the_hosts():
        assert socket.gethostname() == "isolated" != {host_name!r}

    @pytest.mark.isolated
    def test_only_loopback_and_it_is_up():
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=2):
                pass

    @pytest.mark.isolated
    def test_host_loopback_service_is_unreachable():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", PORT), timeout=2).close()

    @pytest.mark.isolated
    def test_host_sysv_ipc_is_invisible():
        with open("/proc/sysvipc/shm") as f:  # closed: a failure keeps no fd for the next check
            assert str(SHM_KEY) not in f.read().split()

    @pytest.mark.isolated
    def test_no_capabilities_and_no_new_privs():
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status(field), 16) == 0, field
        assert status("NoNewPrivs") == "1"

    @pytest.mark.isolated
    def test_own_session_without_terminal():
        assert os.getsid(0) == os.getpid()
        with pytest.raises(OSError):
            open("/dev/tty")

    @pytest.mark.isolated
    def test_no_inherited_directory_or_socket_fds():
        fds = os.listdir("/proc/self/fd")
        for fd in fds:
            try:
                target = os.readlink(f"/proc/self/fd/{{fd}}")
            except FileNotFoundError:  # listdir's own fd
                continue
            assert not os.path.isdir(f"/proc/self/fd/{{fd}}"), target
            # pytest's capture files, the event pipe, the crash log, /dev/null, stdio
            assert target.startswith(("pipe:", "/memfd:", "/dev/", "/tmp/")), target
        assert len(fds) <= 20, fds  # fresh mode: its own files, pytest's capture and faulthandler
        assert not os.getcwd().startswith("(unreachable)")

    @pytest.mark.isolated
    def test_1_writes_anywhere_but_to_a_copy():
        with open("/tmp/" + MARKER, "w") as f:
            f.write("x")
        with open("/" + MARKER, "w") as f:
            f.write("x")

    @pytest.mark.isolated
    def test_2_writes_of_the_previous_test_are_gone():
        assert not os.path.exists("/tmp/" + MARKER)
        assert not os.path.exists("/" + MARKER)

    @pytest.mark.isolated
    def test_host_system_and_project_are_read_only():
        for path in ("/usr/pytest-isolate-probe", os.path.join(os.getcwd(), "probe")):
            with pytest.raises(OSError) as exc:
                open(path, "w")
            assert exc.value.errno in (errno.EROFS, errno.EACCES), path
    """
)


@pytest.fixture
def host_fixtures(pytester: pytest.Pytester):
    """A marked host process, a loopback service and a SysV shm segment on the host."""
    marker = f"pytest-isolate-probe-{uuid.uuid4().hex}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    server = socket.create_server(("127.0.0.1", 0))
    libc = ctypes.CDLL(None, use_errno=True)
    shm_key = 0x1500_0000 + os.getpid() % 0xFFFF
    shm_id = libc.shmget(shm_key, 4096, 0o1600)  # IPC_CREAT | 0600
    assert shm_id >= 0, os.strerror(ctypes.get_errno())
    pytester.makepyfile(test_properties=PROPERTIES.format(
        marker=marker, port=server.getsockname()[1], shm_key=shm_key,
        host_pid=sleeper.pid, host_name=socket.gethostname(),
    ))
    yield marker
    libc.shmctl(shm_id, 0, None)  # IPC_RMID
    server.close()
    sleeper.kill()
    sleeper.wait()


def test_every_property_holds_inside_a_container(host_fixtures, run) -> None:
    result = run("-v")
    result.assert_outcomes(passed=12)
    assert not os.path.exists("/" + host_fixtures) and not os.path.exists("/tmp/" + host_fixtures)


def host_status(field: str) -> str:
    with open("/proc/self/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field + ":"))


def bare_host_outcomes() -> dict[str, str]:
    """What each of the twelve checks gives without the plugin, on this host: FAILED
    where the bare host lacks the property; the three that can pass there say why."""
    expected = {name: "FAILED" for name in (
        "sees_only_its_own_processes", "host_process_is_invisible", "hostname_is_not_the_hosts",
        "host_loopback_service_is_unreachable", "host_sysv_ipc_is_invisible",
        "own_session_without_terminal",  # the inner pytest is no session leader
        "2_writes_of_the_previous_test_are_gone", "host_system_and_project_are_read_only")}
    # A host whose only interface is lo, and one without capabilities and with
    # no_new_privs, have these properties of their own: the check passes there.
    only_lo = [name for _, name in socket.if_nameindex()] == ["lo"]
    expected["only_loopback_and_it_is_up"] = "PASSED" if only_lo else "FAILED"
    no_caps = all(int(host_status(f), 16) == 0 for f in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    expected["no_capabilities_and_no_new_privs"] = "PASSED" if no_caps and host_status("NoNewPrivs") == "1" \
        else "FAILED"
    # Not a check but test_2's set-up: root writes to / on the bare host, a user cannot.
    expected["1_writes_anywhere_but_to_a_copy"] = "PASSED" if IS_ROOT else "FAILED"
    # The bare run has no fd of a container runtime to leak: this one passes there, and
    # shows only that the check itself accepts a clean process.
    expected["no_inherited_directory_or_socket_fds"] = "PASSED"
    return expected


def test_every_property_check_fails_on_the_bare_host(host_fixtures, run) -> None:
    """Each of the twelve checks, run without the plugin: every property the bare host
    lacks fails (eight always, two more unless the host has them itself); the outcome of
    each of the twelve is the one bare_host_outcomes() names."""
    try:
        result = run("-p", "no:isolate", "-v", "-W", "ignore::pytest.PytestUnknownMarkWarning")
        outcomes = dict(re.findall(r"^test_properties\.py::test_(\w+) (PASSED|FAILED)", result.stdout.str(), re.M))
        assert outcomes == bare_host_outcomes()
    finally:
        for leftover in ("/tmp/" + host_fixtures, "/" + host_fixtures):
            if os.path.exists(leftover):
                os.unlink(leftover)


@pytest.mark.needs_root
def test_as_root_container_root_is_an_unprivileged_host_uid(pytester, run) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated
        def test_mapping_and_shadow():
            assert open("/proc/self/uid_map").read().split() == ["0", "1000000000", "65536"]
            with pytest.raises(PermissionError):
                open("/etc/shadow").read()
        """
    )
    run().assert_outcomes(passed=1)


@pytest.mark.skipif(IS_ROOT, reason="the rootless mapping")
def test_rootless_container_root_is_the_user(pytester, run) -> None:
    from pytest_isolate.runtime import subids

    mapping = subids.rootless_mapping()
    # A second namespace, inside the one mapping the user, maps every id onto itself:
    # "0 0 1", and with a subordinate range (subids.py) "1 1 N" for ids 1..N.
    expected = ["0", "0", "1"] + (["1", "1", str(mapping.uids[1])] if mapping.ranged else [])
    pytester.makepyfile(
        f"""
        import os, pytest

        @pytest.mark.isolated
        def test_mapping():
            # The user's own files are container root's; host root's are unmapped.
            assert os.stat(__file__).st_uid == 0 and os.getuid() == 0
            assert open("/proc/self/uid_map").read().split() == {expected!r}
            assert os.stat("/").st_uid in (0, 65534) and os.stat("/usr").st_uid == 65534
        """
    )
    assert os.stat(pytester.path).st_uid == os.getuid() != 0
    run().assert_outcomes(passed=1)


def test_each_container_is_fresh_even_when_forked_from_one_host(pytester, run) -> None:
    """Namespaces and the copy-on-write layer are new for every test.

    (Namespace inode numbers are recycled once a namespace dies, so sequential
    containers may show the same number: compare with the outer process instead.)"""
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(3))
        def test_namespaces(n):
            print("NS", n, *(os.readlink(f"/proc/self/ns/{k}") for k in ("mnt", "net", "pid", "uts", "ipc")))
            assert not os.path.exists("/marker")
            open("/marker", "w").close()
        """
    )
    result = run("-s")
    result.assert_outcomes(passed=3)
    lines = [line.split()[2:] for line in result.errlines + result.outlines if line.startswith("NS ")]
    assert len(lines) == 3
    outer = [os.readlink(f"/proc/self/ns/{k}") for k in ("mnt", "net", "pid", "uts", "ipc")]
    for line in lines:
        assert not set(line) & set(outer), "a container shares a namespace with the host"


def test_python_version_inside_matches_the_controller(pytester, run) -> None:
    pytester.makepyfile(
        f"""
        import sys, pytest

        @pytest.mark.isolated
        def test_same_interpreter():
            assert sys.version == {sys.version!r}
        """
    )
    run().assert_outcomes(passed=1)


def test_pid_1_is_a_sleeping_init_that_reaps_orphans_and_ignores_signals(pytester, run) -> None:
    """The container's init (runtime/tiny_init.py): not a copy of pytest, immune to
    the test's signals, and no orphan of the test stays a zombie."""
    pytester.makepyfile(
        """
        import os, platform, signal, subprocess, time, pytest

        def status(pid, field):
            for line in open(f"/proc/{pid}/status"):
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].split()

        @pytest.mark.isolated
        def test_init():
            assert open("/proc/1/comm").read() == "isolate-init\\n"
            assert status(1, "State")[0] == "S"
            if platform.machine() == "x86_64":  # the static program, not a Python
                assert int(status(1, "VmRSS")[0]) < 1024
            # an orphan: the shell exits at once, its sleep is left to pid 1
            subprocess.run(["sh", "-c", "sleep 0.2 & exit 0"], check=True)
            os.kill(1, signal.SIGTERM)
            os.kill(1, signal.SIGINT)
            # until init has taken the signals (none pending) and the orphan is gone (an
            # unreaped one would stay a zombie for ever)
            deadline = time.monotonic() + 120  # a safety net only
            while True:
                pending = int(status(1, "SigPnd")[0], 16) | int(status(1, "ShdPnd")[0], 16)
                left = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
                if (left == [1, os.getpid()] and not pending) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert not pending, hex(pending)
            assert left == [1, os.getpid()], [(p, open(f"/proc/{p}/stat").read()) for p in left]
            assert open("/proc/1/comm").read() == "isolate-init\\n"  # alive after the signals
        """
    )
    run().assert_outcomes(passed=1)
