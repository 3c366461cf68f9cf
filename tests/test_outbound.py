"""outbound=True: a container reaches the outside through slirp4netns.

"The outside" here is a network namespace this test makes, with a server on an
address of a veth pair inside it; pytest runs in that namespace, so nothing leaves
it. As root: ``unshare --net``. As a user: ``unshare --map-root-user --net`` to make
it, then ``unshare --map-user`` back to the user's own uid for pytest, which then
takes its rootless paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import SUITE_MODE_ARGS, find_processes_named, marker_usage_error, wait_for

pytestmark = pytest.mark.skipif(shutil.which("slirp4netns") is None,
                                reason="needs slirp4netns (Debian: apt install slirp4netns)")

SERVER = """
import socket, sys
s = socket.socket()
s.bind(("198.18.0.1", 9999))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"outside")
    c.close()
"""

SETUP = """
set -e
ip link set lo up
ip link add out0 type veth peer name out1
ip addr add 198.18.0.1/24 dev out0
ip link set out0 up
ip link set out1 up
{python} -c '{server}' > server.log 2>&1 &
server=$!
while ! grep -q listening server.log 2>/dev/null; do sleep 0.01; done
set +e
{inner} {python} -m pytest -p no:cacheprovider -p no:randomly {args}
status=$?
kill $server
exit $status
"""

TESTS = """
import socket, pytest

@pytest.mark.isolated(outbound=True)
def test_reaches_the_outside():
    with socket.create_connection(("198.18.0.1", 9999), timeout=10) as conn:
        assert conn.recv(7) == b"outside"
    assert open("/etc/resolv.conf").read() == "nameserver 10.0.2.3\\n"

@pytest.mark.isolated(outbound=True, network="backend")
def test_reaches_it_from_a_private_network_too(isolated_container):
    assert isolated_container.network == "backend"
    with socket.create_connection(("198.18.0.1", 9999), timeout=10) as conn:
        assert conn.recv(7) == b"outside"

@pytest.mark.isolated
def test_without_it_nothing_is_reached():
    with pytest.raises(OSError):
        socket.create_connection(("198.18.0.1", 9999), timeout=10)
"""


def run_in_a_private_world(pytester: pytest.Pytester, *args: str) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        outer, inner = ["unshare", "--net"], ""
    else:
        outer = ["unshare", "--map-root-user", "--net"]
        inner = f"unshare --map-user={os.getuid()} --map-group={os.getgid()}"
    script = SETUP.format(python=sys.executable, server=SERVER, inner=inner,
                          args=" ".join([*SUITE_MODE_ARGS, *args]))
    return subprocess.run([*outer, "bash", "-c", script], cwd=pytester.path, capture_output=True, text=True,
                          timeout=300)


def test_outbound_reaches_a_server_outside_and_only_with_it(pytester) -> None:
    pytester.makepyfile(test_out=TESTS)
    done = run_in_a_private_world(pytester, "-q", "test_out.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout


def test_outbound_is_gone_with_the_run(pytester) -> None:
    """slirp4netns lives as long as its container: none is left after the run."""
    pytester.makepyfile(test_out=TESTS)
    before = find_processes_named("slirp4netns")
    done = run_in_a_private_world(pytester, "-q", "test_out.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert wait_for(lambda: [p for p in find_processes_named("slirp4netns") if p not in before], 30) == []


@pytest.mark.parametrize("value", ["maybe", 2])
def test_a_bad_outbound_is_a_usage_error(pytester, run, value) -> None:
    error = marker_usage_error(pytester, run, outbound=value)
    assert "invalid 'outbound'" in error and "accepted: True or False" in error


def test_outbound_is_gone_after_a_sigkilled_pytest(pytester, tmp_path) -> None:
    """A SIGKILLed pytest takes its relay with it (parent-death signals), and the
    relay's slirp4netns follows through its exit fd: none is left on the machine."""
    gate = tmp_path / "gate"
    gate.mkdir()
    gate.chmod(0o777)  # as root, container root is an unprivileged uid
    pytester.makepyfile(test_kill=f"""
        import select, pytest

        @pytest.mark.isolated(outbound=True, mounts=["{gate}:/gate:rw"])
        def test_waits():
            open("/gate/started", "w").close()
            select.select([], [], [])  # until pytest is killed
    """)
    before = find_processes_named("slirp4netns")
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SUITE_MODE_ARGS],
                             cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert not wait_for(lambda: not (gate / "started").exists() and inner.poll() is None, 120)
        assert (gate / "started").exists(), "the test never started"
        assert [p for p in find_processes_named("slirp4netns") if p not in before], "no slirp4netns ran"
    finally:
        inner.kill()
        inner.wait()
    assert wait_for(lambda: [p for p in find_processes_named("slirp4netns") if p not in before], 30) == []
