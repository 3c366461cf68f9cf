"""What a test sees from inside its container (run with ``pytest --isolate``)."""

import os
import socket


def test_sees_only_its_own_processes():
    # A fresh PID namespace with its own /proc: the host's processes (pytest
    # itself, your shell, systemd, ...) are not there. At most an init/reaper,
    # the test process and whatever it starts itself.
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    assert len(pids) <= 3, pids


def test_only_loopback_network():
    # A fresh network namespace: only `lo`, and it is up. No route to the host's
    # network, but servers on 127.0.0.1 work.
    names = [name for _, name in socket.if_nameindex()]
    assert names == ["lo"]

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def _status_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise KeyError(name)


def test_no_capabilities_and_no_new_privs():
    # Every capability dropped (effective, permitted, bounding set), and
    # no_new_privs set: setuid binaries cannot give any privilege back.
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(_status_field(field), 16) == 0, field
    assert _status_field("NoNewPrivs") == "1"


def test_host_secrets_stay_unreadable():
    # The host's files are visible read-only, but not with the host's root
    # privileges: even when pytest runs as root, /etc/shadow cannot be read.
    try:
        with open("/etc/shadow", "rb"):
            pass
    except FileNotFoundError:
        return  # nothing to protect on this host
    except PermissionError:
        return
    raise AssertionError("/etc/shadow was readable inside the container")
