"""Private networks (network="NAME"): eth0 on a bridge of the container host's own,
addresses, /etc/hosts; networks apart from each other and from everything else; the
hint on a refused connection; the option's errors. Real namespaces throughout."""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import IS_ROOT, marker_usage_error

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_a_private_network_gives_eth0_addresses_and_hosts(pytester, run) -> None:
    out = pytester.mkdir("out")
    out.chmod(0o777)  # container root is an unprivileged uid when run as root
    pytester.makepyfile(test_net=f"""
        import errno, ipaddress, json, os, socket, time
        import pytest

        def record(name):
            interfaces = sorted(n for _, n in socket.if_nameindex())
            hosts = open("/etc/hosts").read()
            own = socket.getaddrinfo(socket.gethostname(), None) if name != "none" else []
            with open("/out/" + name, "w") as f:
                json.dump({{"interfaces": interfaces, "hosts": hosts,
                           "own": sorted({{a[4][0] for a in own}})}}, f)

        @pytest.mark.isolated(network="backend", mounts=["{out}:/out:rw"], hostname="web")
        def test_first():
            record("first")
            sock = socket.socket()
            sock.settimeout(5)
            started = time.monotonic()
            with pytest.raises(OSError) as raised:  # no route: nothing is sent
                sock.connect(("192.0.2.1", 80))
            assert raised.value.errno == errno.ENETUNREACH
            assert time.monotonic() - started < 1, "refused at once, not by a timeout"

        @pytest.mark.isolated(network="backend", mounts=["{out}:/out:rw"])
        def test_second():
            record("second")

        @pytest.mark.isolated(network="other", mounts=["{out}:/out:rw"])
        def test_other():
            record("other")

        @pytest.mark.isolated(mounts=["{out}:/out:rw"])
        def test_none():
            record("none")
    """)
    before = machine_links()
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=4)
    seen = {name: json.loads((out / name).read_text()) for name in ("first", "second", "other", "none")}
    assert seen["none"]["interfaces"] == ["lo"]
    for name in ("first", "second", "other"):
        assert seen[name]["interfaces"] == ["eth0", "lo"], seen[name]
    first, second, other = (seen[n]["own"] for n in ("first", "second", "other"))
    v4 = [ip for ip in first + second + other if "." in ip]
    assert len(v4) == 3 and len(set(v4)) == 3, (first, second, other)  # one IPv4 address each, all different
    subnet = lambda ip: ip.rsplit(".", 2)[0]  # noqa: E731
    first4, second4, other4 = ([ip for ip in own if "." in ip][0] for own in (first, second, other))
    assert subnet(first4) == subnet(second4) != subnet(other4)
    assert any(ip.startswith("fd") and ":" in ip for ip in first), first  # and an IPv6 ULA
    assert "\tweb\n" in seen["first"]["hosts"] and f"{first4}\tweb" in seen["first"]["hosts"]
    assert "localhost" in seen["first"]["hosts"]
    # Everything lived in the container host's namespaces: nothing on the machine.
    assert machine_links() == before


SCRIPT = textwrap.dedent("""
    import errno, json, os, socket, sys
    sys.path.insert(0, sys.argv[1])
    from pytest_isolate.runtime import network, syscalls

    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    networks = network.Networks(home)

    def container(name, number):
        # As the factory does: the bridge at home, then a fresh namespace with eth0.
        networks.prepare(name)
        syscalls.unshare(syscalls.CLONE_NEWNET)
        network.bring_up_loopback()
        addresses = networks.attach(name, number)
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        syscalls.setns(home, syscalls.CLONE_NEWNET)
        return fd, addresses

    def inside(fd, job):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            syscalls.setns(fd, syscalls.CLONE_NEWNET)
            try:
                answer = job()
            except OSError as exc:
                answer = errno.errorcode.get(exc.errno, str(exc))
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 65536)
        os.waitpid(pid, 0)
        return json.loads(data)

    server_ns, (server4, server6) = container("a", 1)
    peer_ns, _ = container("a", 2)
    stranger_ns, _ = container("b", 3)

    listener_ready = os.pipe()
    server = os.fork()
    if server == 0:
        syscalls.setns(server_ns, syscalls.CLONE_NEWNET)
        listeners = []
        for family, address in ((socket.AF_INET, server4), (socket.AF_INET6, server6)):
            s = socket.socket(family)
            s.bind((address, 7000))
            s.listen()
            listeners.append(s)
        os.write(listener_ready[1], b"x")
        for s in listeners:
            conn, _ = s.accept()
            conn.sendall(b"hello")
            conn.close()
        os._exit(0)
    os.read(listener_ready[0], 1)

    def talk(address, family):
        def job():
            with socket.socket(family) as s:
                s.settimeout(5)
                s.connect((address, 7000))
                return s.recv(5).decode()
        return job

    result = {
        "peer4": inside(peer_ns, talk(server4, socket.AF_INET)),
        "peer6": inside(peer_ns, talk(server6, socket.AF_INET6)),
        "stranger4": inside(stranger_ns, talk(server4, socket.AF_INET)),
        "stranger6": inside(stranger_ns, talk(server6, socket.AF_INET6)),
    }
    os.kill(server, 9)
    print(json.dumps(result))
""")


def test_containers_of_one_network_reach_each_other_and_no_other_network(tmp_path) -> None:
    """The factory's network code in real namespaces (as the factory uses it): a
    server in one container, a peer on its network reaches it over IPv4 and IPv6, a
    container on another network cannot (at once: no route)."""
    script = tmp_path / "net.py"
    script.write_text(SCRIPT)
    command = ["unshare", "--user", "--map-root-user", "--net", sys.executable, str(script), PROJECT]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"peer4": "hello", "peer6": "hello", "stranger4": "ENETUNREACH", "stranger6": "ENETUNREACH"}


def test_pyroute2_is_not_imported_without_a_network() -> None:
    """pyroute2 costs ~150 ms to import: not on the way of network="none"."""
    code = ("import sys; import pytest_isolate.plugin, pytest_isolate.runtime.factory, pytest_isolate.remote; "
            "print('pyroute2' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_refused_connection_on_no_network_gets_a_hint(pytester, run) -> None:
    with socket.socket() as listener:  # this machine's port: the container has its own lo
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        pytester.makepyfile(test_refused=f"""
            import socket, pytest

            @pytest.mark.isolated
            def test_calls_the_host():
                socket.create_connection(("127.0.0.1", {port}), timeout=5)

            @pytest.mark.isolated(network="backend")
            def test_calls_outside_its_network():
                socket.create_connection(("192.0.2.1", 80), timeout=5)
        """)
        result = run()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*ConnectionRefusedError*", "*- pytest-isolate hint -*",
        "The container has no network but its own lo (network='none'): 127.0.0.1 is the container's, not this "
        "machine's, *@pytest.mark.isolated(network='NAME')*",
    ])
    result.stdout.fnmatch_lines(["*Network is unreachable*", "*- pytest-isolate hint -*",
                                 "The container is on the private network 'backend': only that network's *"])


@pytest.mark.parametrize(("value", "message"), [
    ("host", "*network*'host'; a container on the host's network would not be isolated*"),
    ("no/slash", "*network*accepted: 'none' (only lo, the default) or the name of a private network*"),
    ("", "*network*accepted: 'none'*"),
])
def test_a_bad_network_is_a_usage_error(pytester, run, value, message) -> None:
    assert fnmatch.fnmatch(marker_usage_error(pytester, run, network=value), f"*{message}*")


@pytest.mark.skipif(not IS_ROOT, reason="the rootless lane runs this file as a user")
def test_network_from_the_command_line_and_ini(pytester, run) -> None:
    pytester.makeini("[pytest]\nisolate_network = fromini\n")
    pytester.makepyfile(test_net="""
        import socket, pytest

        @pytest.mark.isolated
        def test_a():
            assert sorted(n for _, n in socket.if_nameindex()) == ["eth0", "lo"]
    """)
    run().assert_outcomes(passed=1)
    result = run("--isolate-network=none")
    result.assert_outcomes(failed=1)


def test_the_isolated_container_fixture_describes_the_container(pytester, run) -> None:
    pytester.makepyfile(test_info="""
        import ipaddress, pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", ["sleep", "600"])

        @pytest.mark.isolated(network="backend", hostname="box", memory="256m", pids=64, timeout=120,
                              ulimits={"nofile": 512})
        def test_described(isolated_container, svc):
            info = isolated_container
            assert info.hostname == "box" and info.network == "backend"
            assert ipaddress.ip_address(info.addresses[0]) in ipaddress.ip_network("10.101.0.0/16")
            assert info.limits["memory"] == 256 << 20 and info.limits["pids"] == 64
            assert info.limits["timeout"] == 120 and info.limits["ulimits"] == {"nofile": [512, 512]}
            assert info.limits["cpus"] is None
            assert info.enforcement, "limits were asked for: it says how they are enforced"
            assert info.services == ("svc",)
            before = info.usage()
            sum(range(3_000_000))
            assert info.usage().cpu_seconds > before.cpu_seconds and before.max_rss > 0

        @pytest.mark.isolated
        def test_plain_none(isolated_container):
            assert isolated_container.network == "none" and isolated_container.addresses == ()
            assert isolated_container.enforcement == "" and isolated_container.hostname == "isolated"

        def test_not_isolated(isolated_container):
            pass
    """)
    result = run("-p", "no:randomly", "--isolate-limits=best-effort")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*isolated_container describes the container of an isolated test: mark the test "
                                 "@pytest.mark.isolated (or run with --isolate)*"])


def _kernel_has_netem() -> bool:
    """Whether a netem qdisc can be made (in a throwaway user and network namespace)."""
    code = ("from pyroute2 import IPRoute\nip = IPRoute()\nip.link('add', ifname='v0', kind='veth', "
            "peer={'ifname': 'v1'})\nip.tc('add', 'netem', index=ip.link_lookup(ifname='v0')[0], delay=1000)\n")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--net", sys.executable, "-c", code],
                          capture_output=True, timeout=60)
    return done.returncode == 0


def test_netem_rate_shapes_eth0_and_faults_need_the_kernels_netem(pytester, run) -> None:
    pytester.makepyfile(test_netem="""
        import socket, sys, time
        import pytest
        import pytest_isolate as isolate

        @pytest.mark.isolated(network="backend", netem={"rate": "8mbit"})
        def test_rate():
            from pyroute2 import IPRoute
            with IPRoute() as ip:
                eth0 = ip.link_lookup(ifname="eth0")[0]
                kinds = [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index=eth0)]
            assert "tbf" in kinds, kinds

        listener = isolate.service("listener", [sys.executable, "-c",
                                   "import socket; s = socket.create_server(('0.0.0.0', 7000)); "
                                   "[s.accept()[0].close() for _ in iter(int, 1)]"], ready=isolate.tcp(7000))

        def connect_seconds(host):
            started = time.monotonic()
            socket.create_connection((host, 7000), timeout=30).close()
            return time.monotonic() - started

        @pytest.mark.isolated(network="backend", netem={"delay": "200ms", "loss": "1%"})
        def test_faults(listener):
            from pyroute2 import IPRoute
            with IPRoute() as ip:
                eth0 = ip.link_lookup(ifname="eth0")[0]
                kinds = [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index=eth0)]
            assert "netem" in kinds, kinds
            # netem holds every packet leaving eth0 200 ms at least: the SYN too.
            assert min(connect_seconds(listener.host) for _ in range(3)) >= 0.2

        @pytest.mark.isolated(network="backend")
        def test_no_faults_without_netem(listener):
            from pyroute2 import IPRoute
            with IPRoute() as ip:
                eth0 = ip.link_lookup(ifname="eth0")[0]
                kinds = [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index=eth0)]
            assert "netem" not in kinds and "tbf" not in kinds, kinds
    """)
    result = run("-p", "no:randomly")
    if _kernel_has_netem():
        result.assert_outcomes(passed=3)
    else:
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(["*netem= needs the kernel's netem queueing discipline (sch_netem, "
                                     "CONFIG_NET_SCH_NETEM), which this kernel lacks*"])


@pytest.mark.parametrize(("value", "message"), [
    ({"delay": "50"}, "bad delay: '50'"),
    ({"drop": "1%"}, "unknown key 'drop'"),
    ({"loss": "120%"}, "bad loss: '120%'; accepted: 0% to 100%"),
    ({"jitter": "5ms"}, "jitter needs a delay"),
    ({"rate": "1bit"}, "bad rate: '1bit'; accepted: 8kbit to 100gbit"),
])
def test_a_bad_netem_is_a_usage_error(pytester, run, value, message) -> None:
    assert f"invalid 'netem': {message}" in marker_usage_error(pytester, run, network="backend", netem=value)


def test_netem_without_a_network_is_a_usage_error(pytester, run) -> None:
    error = marker_usage_error(pytester, run, netem={"rate": "1mbit"})
    assert "invalid 'netem'" in error and "name one too, e.g. network='backend'" in error
