"""allow=["HOST:PORT[/tcp|udp]"]: exactly these services of this machine are reachable
from inside, through the relay; everything else fails at once. The relay serves only
what the run allows and is gone after the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import SUITE_MODE_ARGS, find_processes_named, marker_usage_error, wait_for

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Upper:
    """A TCP and a UDP server on this machine's loopback that answer in capitals, and
    count who came."""

    def __init__(self, family=socket.AF_INET, host="127.0.0.1") -> None:
        self.tcp = socket.socket(family)
        self.tcp.bind((host, 0))
        self.tcp.listen()
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((host, 0))
        self.tcp_port, self.udp_port = self.tcp.getsockname()[1], self.udp.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve_tcp, daemon=True).start()
        threading.Thread(target=self._serve_udp, daemon=True).start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(conn.recv(100).upper())

    def _serve_udp(self) -> None:
        while True:
            try:
                data, sender = self.udp.recvfrom(100)
            except OSError:
                return
            self.udp.sendto(data.upper(), sender)

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


@pytest.fixture
def upper():
    server = Upper()
    yield server
    server.close()


def test_allowed_ports_are_reached_and_nothing_else(pytester, run, upper) -> None:
    pytester.makepyfile(test_allow=f"""
        import errno, socket, time, pytest

        @pytest.mark.isolated(allow=["127.0.0.1:{upper.tcp_port}", "localhost:{upper.udp_port}/udp"])
        def test_reach():
            with socket.create_connection(("127.0.0.1", {upper.tcp_port}), timeout=10) as conn:
                conn.sendall(b"hello")
                assert conn.recv(100) == b"HELLO"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(10)
                udp.sendto(b"ping", ("127.0.0.1", {upper.udp_port}))
                assert udp.recv(100) == b"PING"
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError):  # another port of the same address
                socket.create_connection(("127.0.0.1", {upper.tcp_port + 1 if upper.tcp_port < 65535 else 1}),
                                         timeout=10)
            with pytest.raises(OSError) as raised:  # another address
                socket.create_connection(("192.0.2.1", {upper.tcp_port}), timeout=10)
            assert raised.value.errno == errno.ENETUNREACH
            assert time.monotonic() - started < 5, "refused at once, not by a timeout"

        @pytest.mark.isolated
        def test_not_allowed():
            socket.create_connection(("127.0.0.1", {upper.tcp_port}), timeout=10)
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*ConnectionRefusedError*", "*- pytest-isolate hint -*"])
    assert upper.connections == 1  # the allowed test's, and only it


def test_ipv6_and_a_private_network(pytester, run) -> None:
    server = Upper(socket.AF_INET6, "::1")
    try:
        pytester.makepyfile(test_v6=f"""
            import socket, pytest

            @pytest.mark.isolated(network="backend", allow=["[::1]:{server.tcp_port}"])
            def test_reach():
                with socket.create_connection(("::1", {server.tcp_port}), timeout=10) as conn:
                    conn.sendall(b"six")
                    assert conn.recv(100) == b"SIX"
        """)
        run().assert_outcomes(passed=1)
    finally:
        server.close()


def test_a_closed_destination_resets_the_connection_at_once(pytester, run) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        pytester.makepyfile(test_closed=f"""
            import socket, pytest

            @pytest.mark.isolated(allow=["127.0.0.1:{port}"])
            def test_it():
                # Reset at once: an error at connect (EPIPE when the reset comes before the
                # connect returns) or at the first read, or end-of-file; never a timeout.
                try:
                    conn = socket.create_connection(("127.0.0.1", {port}), timeout=10)
                    assert conn.recv(10) == b""
                except ConnectionError:
                    pass
        """)
        run().assert_outcomes(passed=1)


@pytest.mark.parametrize(("value", "message"), [
    ("8080", "invalid 'allow': got '8080'; accepted: 'HOST:PORT[/tcp|udp]' strings"),
    ("bad_name!:80", "invalid 'allow': got 'bad_name!:80': 'bad_name!' is neither an IP address nor a host name"),
    ("no-such-host.invalid:80", "invalid 'allow': got 'no-such-host.invalid:80': no-such-host.invalid does not "
                                "resolve on this machine"),
    ("::1:80", "invalid 'allow': got '::1:80': write an IPv6 address in brackets, e.g. '[::1]:80'"),
    ("0.0.0.0:80", "invalid 'allow': got '0.0.0.0:80': name the address the service listens on, not 0.0.0.0"),
    ("127.0.0.1:80/sctp", "invalid 'allow': got '127.0.0.1:80/sctp'; accepted: 'HOST:PORT[/tcp|udp]'"),
])
def test_a_bad_allow_entry_is_a_usage_error(pytester, run, value, message) -> None:
    assert message in marker_usage_error(pytester, run, allow=[value])


def _machine_name() -> tuple[str, str]:
    """This machine's host name and the address it resolves to here (as allow= resolves it)."""
    name = socket.gethostname()
    try:
        return name, socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError as exc:
        pytest.skip(f"this machine's name {name!r} does not resolve here ({exc})")


@pytest.mark.parametrize("network", ["none", "backend"])
def test_a_host_name_is_resolved_once_and_named_in_the_containers_hosts(pytester, run, network) -> None:
    """allow=["NAME:PORT"]: the name is resolved by the controller; inside, the
    container's own /etc/hosts names it (the machine's is not there on a private
    network, and a container cannot resolve names otherwise), and it reaches the port."""
    name, address = _machine_name()
    server = Upper(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    try:
        pytester.makepyfile(test_name=f"""
            import socket, pytest

            @pytest.mark.isolated(network={network!r}, allow=["{name}:{server.tcp_port}"])
            def test_by_name():
                assert "{address}\t{name.lower()}" in open("/etc/hosts").read().splitlines()
                with socket.create_connection(("{name}", {server.tcp_port}), timeout=10) as conn:
                    conn.sendall(b"by name")
                    assert conn.recv(100) == b"BY NAME"
        """)
        run().assert_outcomes(passed=1)
        assert server.connections == 1
    finally:
        server.close()


def _new_relays(before: list[int]) -> list[int]:
    return [pid for pid in find_processes_named("isolate-relay") if pid not in before]


def test_the_relay_is_gone_after_the_run_and_after_a_sigkilled_pytest(pytester, upper) -> None:
    before = find_processes_named("isolate-relay")
    pytester.makepyfile(test_relay=f"""
        import os, signal, socket, pytest

        @pytest.mark.isolated(allow=["127.0.0.1:{upper.tcp_port}"])
        def test_reach():
            socket.create_connection(("127.0.0.1", {upper.tcp_port}), timeout=10).close()

        def test_kill_pytest_if_asked():
            if os.environ.get("KILL_PYTEST"):
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *SUITE_MODE_ARGS,
            "test_relay.py"]
    done = subprocess.run(args, cwd=pytester.path, capture_output=True, text=True, timeout=300)
    assert "2 passed" in done.stdout, done.stdout + done.stderr
    assert wait_for(lambda: _new_relays(before), 30) == []
    killed = subprocess.run(args, cwd=pytester.path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, KILL_PYTEST="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert wait_for(lambda: _new_relays(before), 30) == []


RELAY_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, threading
    sys.path.insert(0, sys.argv[1])
    from pytest_isolate.runtime import link, relay, syscalls

    allowed_port, other_port = int(sys.argv[2]), int(sys.argv[3])
    factory_end, relay_end = link.Channel.pair()
    if os.fork() == 0:
        factory_end.close()
        relay.serve(relay_end, {("127.0.0.1", allowed_port, "tcp")})
        os._exit(0)
    relay_end.close()

    # A "container": a network namespace of its own, where the listeners are made.
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    syscalls.unshare(syscalls.CLONE_NEWNET)
    from pytest_isolate.runtime import network
    network.bring_up_loopback()
    init = os.fork()  # before the listeners, as the factory's init: it holds none of them
    if init == 0:
        import time; time.sleep(600)
    pidfd = os.pidfd_open(init)
    listeners = relay.listen_inside([["127.0.0.1", allowed_port, "tcp"], ["127.0.0.1", other_port, "tcp"],
                                     ["10.9.9.9", 4000, "tcp"]], None)
    # What a subverted host might send: a target the run does not allow.
    factory_end.send("relay", listeners[1:2] + [os.dup(pidfd)], targets=[["127.0.0.1", other_port, "tcp"]])
    factory_end.send("relay", listeners[0:1] + [pidfd], targets=[["127.0.0.1", allowed_port, "tcp"]])
    for fd in listeners[:2]:
        os.close(fd)  # as the factory does: the relay holds them now (or dropped them)
    results = {}
    for name, port in (("allowed", allowed_port), ("other", other_port)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"x")
                conn.settimeout(5)
                results[name] = conn.recv(10).decode()
        except OSError as exc:
            results[name] = type(exc).__name__
    results["10.9.9.9 bound"] = socket.socket(fileno=listeners[2]).getsockname()[0]
    print(json.dumps(results))
    os.kill(init, 9)
""")


def test_the_relay_serves_only_what_the_run_allows(tmp_path, upper) -> None:
    """The relay's own check, as a subverted container host would probe it: a
    listener for a target outside the run's allow-list is dropped, not served."""
    script = tmp_path / "relay.py"
    script.write_text(RELAY_SCRIPT)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        other.settimeout(0)
        command = ["unshare", "--user", "--map-root-user", sys.executable, str(script), PROJECT,
                   str(upper.tcp_port), str(other.getsockname()[1])]
        # The relay must stay in this machine's network namespace: only the "container" unshares it.
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])
        assert results["allowed"] == "X"
        assert results["other"] in ("ConnectionRefusedError", "ConnectionResetError", ""), results
        assert results["10.9.9.9 bound"] == "10.9.9.9"  # an address added to the container's lo
        with pytest.raises(BlockingIOError):
            other.accept()  # nothing reached the port that was not allowed
