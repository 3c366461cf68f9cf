"""Service containers (pytest_isolate.service): real servers in sibling containers on
the test's private network, their readiness, scopes, logs and errors, and that they
are gone after the run, however it ends."""

from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pytest_isolate.runtime import subids

from conftest import SUITE_MODE_ARGS, find_processes, module_usage_error, wait_for

PY = sys.executable

# A service that counts the connections it took: a new instance starts from 1.
COUNTER = f"""
import pytest_isolate as isolate

counter_source = '''
import socket, sys
print("counter starting", flush=True)
s = socket.socket(socket.AF_INET6)
s.bind(("::", 7000))
s.listen()
n = 0
while True:
    c, _ = s.accept()
    n += 1
    c.sendall(str(n).encode())
    c.close()
'''
def counter(scope):
    return isolate.service("counter", [{PY!r}, "-u", "-c", counter_source], ready=isolate.tcp(7000), scope=scope)

def ask(service):
    import socket
    with socket.create_connection((service.host, 7000), timeout=10) as c:
        return int(c.recv(10))
"""


def test_a_service_is_reached_by_name_and_its_log_reaches_a_failed_report(pytester, run) -> None:
    pytester.makepyfile(helpers=COUNTER)
    pytester.makepyfile(test_svc="""
        import ipaddress, socket, pytest
        from helpers import counter, ask

        counter = counter("session")

        @pytest.mark.isolated(network="backend")
        def test_by_name(counter):
            assert ask(counter) == 1
            assert socket.gethostbyname("counter") == counter.address
            assert ipaddress.ip_address(counter.address) in ipaddress.ip_network("10.101.0.0/16")
            assert counter.port == 7000 and counter.host == "counter"
            assert "counter starting" in counter.log()

        @pytest.mark.isolated(network="backend")
        def test_fails(counter):
            assert ask(counter) == 99
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- service counter log -*", "counter starting"])


@pytest.mark.parametrize(("scope", "expected"), [("session", [1, 2, 3, 4]), ("module", [1, 2, 1, 2]),
                                                 ("function", [1, 1, 1, 1])])
def test_scopes_decide_which_tests_share_an_instance(pytester, run, scope, expected) -> None:
    out = pytester.mkdir("out")
    out.chmod(0o777)
    pytester.makepyfile(helpers=COUNTER + f"\ncounter = counter({scope!r})\n")
    for module in ("test_a", "test_b"):
        pytester.makepyfile(**{module: f"""
            import pytest
            from helpers import counter, ask

            @pytest.mark.isolated(mounts=["{out}:/out:rw"])
            @pytest.mark.parametrize("n", [1, 2])
            def test_count(counter, n):
                with open("/out/{module}-%d" % n, "w") as f:
                    f.write(str(ask(counter)))
        """})
    run("-p", "no:randomly").assert_outcomes(passed=4)
    seen = [int((out / f"{m}-{n}").read_text()) for m in ("test_a", "test_b") for n in (1, 2)]
    assert seen == expected


LOG_READY = """
import socket, time
s = socket.socket()
s.bind(("0.0.0.0", 5000))
s.listen()
print("accepting connections now", flush=True)
c, _ = s.accept()
c.sendall(b"hi")
time.sleep(600)
"""


def test_a_log_line_makes_a_service_ready(pytester, run) -> None:
    pytester.makepyfile(test_log=f"""
        import socket, pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-u", "-c", {LOG_READY!r}], ready=isolate.log("accepting connections"))

        @pytest.mark.isolated
        def test_it(svc):
            assert svc.port is None
            assert socket.create_connection(("svc", 5000), timeout=10).recv(2) == b"hi"
    """)
    run().assert_outcomes(passed=1)


def test_a_service_that_exits_first_fails_the_test_with_its_status_and_log(pytester, run) -> None:
    pytester.makepyfile(test_exit=f"""
        import pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-c", "import sys; print('bad config line 3'); sys.exit(3)"],
                              ready=isolate.tcp(5000), ready_timeout=600)

        @pytest.mark.isolated
        def test_it(svc):
            pass

        @pytest.mark.isolated
        def test_without():
            pass
    """)
    result = run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*the service 'svc' ({PY} -c *) exited with status 3 before it was ready; its log:*",
                                 "bad config line 3"])


def test_a_service_not_ready_in_time_fails_the_test_with_its_log(pytester, run) -> None:
    pytester.makepyfile(test_slow=f"""
        import pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-u", "-c", "print('warming up'); import time; time.sleep(600)"],
                              ready=isolate.tcp(5000), ready_timeout=1)

        @pytest.mark.isolated
        def test_it(svc):
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the service 'svc' was not ready after 1 s (waiting for TCP port 5000 "
                                 "listening); its log:*", "warming up"])


def test_a_missing_command_says_so(pytester, run) -> None:
    pytester.makepyfile(test_missing="""
        import pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", ["no-such-server-here"], ready=isolate.tcp(5000))

        @pytest.mark.isolated
        def test_it(svc):
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*exited with status 127 before it was ready*",
                                 "pytest-isolate: cannot run 'no-such-server-here': No such file or directory"])


def test_a_plain_test_cannot_use_a_service(pytester, run) -> None:
    pytester.makepyfile(test_plain="""
        import pytest_isolate as isolate

        svc = isolate.service("svc", ["true"])

        def test_it(svc):
            pass
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the service 'svc' runs only for isolated tests: mark the test "
                                 "@pytest.mark.isolated (or run with --isolate)*"])


@pytest.mark.parametrize(("call", "message"), [
    ('isolate.service("my-db", ["x"])', "*service(): got the name 'my-db'; accepted: a Python identifier*"),
    ('isolate.service("db", "redis-server")', "*command: got 'redis-server'; accepted: a non-empty list*"),
    ('isolate.service("db", ["x"], scope="run")', "*scope: got 'run'; accepted: session, package, module*"),
    ('isolate.tcp(70000)', "*pytest_isolate.tcp(): got 70000; accepted: a TCP port, 1 to 65535*"),
    ('isolate.log("(")', "*pytest_isolate.log(): '(' is not a regular expression*"),
])
def test_bad_service_arguments_are_errors_that_say_what_is_accepted(pytester, run, call, message) -> None:
    error = module_usage_error(pytester, run, f"""
        import pytest_isolate as isolate

        svc = {call}

        def test_it():
            pass
    """)
    assert fnmatch.fnmatchcase(error, message), error


PROBE = """
import socket, sys
for address in ("127.0.0.1", "10.0.2.2", "192.0.2.1"):
    try:
        socket.create_connection((address, int(sys.argv[1])), timeout=5)
        print(address, "reached", flush=True)
    except OSError as exc:
        print(address, "unreachable", exc.errno, flush=True)
print("probed", flush=True)
import time; time.sleep(600)
"""


def test_networks_and_the_machine_stay_out_of_reach_of_services(pytester, run) -> None:
    """A test on another network cannot reach a service; a service cannot reach this
    machine (its 127.0.0.1 is its own, and nothing else routes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        pytester.makepyfile(test_reach=f"""
            import errno, socket, pytest
            import pytest_isolate as isolate

            svc = isolate.service("svc", [{PY!r}, "-u", "-c", {PROBE!r}, "{port}"], ready=isolate.log("probed"))

            @pytest.mark.isolated(network="one")
            def test_probe(svc):
                log = svc.log()
                assert "reached" not in log, log
                assert log.count("unreachable") == 3, log

            @pytest.mark.isolated(network="two")
            def test_other_network():
                with pytest.raises(OSError) as raised:
                    socket.create_connection(("10.101.0.2", 7000), timeout=5)  # svc's address on "one"
                assert raised.value.errno == errno.ENETUNREACH
        """)
        listener.settimeout(0)
        result = run("-p", "no:randomly")
        result.assert_outcomes(passed=2)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing came through


def _wait_gone(marker: str) -> list[int]:
    return wait_for(lambda: find_processes(marker), 30)


def test_services_are_gone_after_the_run_and_after_a_sigkilled_pytest(pytester) -> None:
    marker = f"pytest-isolate-service-marker-{os.getpid()}"
    pytester.makepyfile(test_leak=f"""
        import os, time, pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-u", "-c", "import time; print('up'); time.sleep(600)", "{marker}"],
                              ready=isolate.log("up"))

        @pytest.mark.isolated
        def test_uses(svc):
            pass

        def test_waits_to_be_killed_if_asked():
            if os.environ.get("WAIT_TO_BE_KILLED"):
                time.sleep(600)
    """)
    args = [PY, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *SUITE_MODE_ARGS, "test_leak.py"]
    done = subprocess.run(args, cwd=pytester.path, capture_output=True, text=True, timeout=300)
    assert "2 passed" in done.stdout, done.stdout + done.stderr
    assert _wait_gone(marker) == []
    # Again, and pytest is SIGKILLed while the service runs (a session service: it
    # lives until the run ends, here until the kill).
    pytest_process = subprocess.Popen(args, cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(os.environ, WAIT_TO_BE_KILLED="1"))
    try:
        deadline = time.monotonic() + 120
        while not find_processes(marker) and time.monotonic() < deadline and pytest_process.poll() is None:
            time.sleep(0.02)
        assert find_processes(marker), "the service never ran"
    finally:
        pytest_process.kill()
        pytest_process.wait()
    assert _wait_gone(marker) == []


def test_fixed_ports_do_not_clash_under_xdist(pytester, run) -> None:
    pytester.makepyfile(helpers=COUNTER + "\ncounter = counter('function')\n")
    pytester.makepyfile(test_x="""
        import pytest
        from helpers import counter, ask

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(6))
        def test_count(counter, n):
            assert ask(counter) == 1
    """)
    run("-n", "2").assert_outcomes(passed=6)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (Debian: redis-server)")
def test_a_real_redis(pytester, run) -> None:
    pytester.makepyfile(test_redis="""
        import socket, pytest
        import pytest_isolate as isolate

        redis = isolate.service("redis", ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                ready=isolate.tcp(6379))

        def command(conn, *words):
            conn.sendall(b"*%d\\r\\n" % len(words) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(w), w) for w in words))
            return conn.recv(100)

        @pytest.mark.isolated
        @pytest.mark.parametrize("value", [b"one", b"two"])
        def test_set_get(redis, value):
            with socket.create_connection((redis.host, redis.port), timeout=10) as conn:
                assert command(conn, b"SET", b"key", value) == b"+OK\\r\\n"
                assert command(conn, b"GET", b"key") == b"$%d\\r\\n%s\\r\\n" % (len(value), value)
    """)
    run().assert_outcomes(passed=2)


PG_BIN = next(iter(sorted(__import__("glob").glob("/usr/lib/postgresql/*/bin"))), None)
PG_SCRIPT = """
set -e
initdb -D /tmp/pg -A trust -U postgres > /dev/null
printf "host all all 0.0.0.0/0 trust\\nhost all all ::/0 trust\\n" >> /tmp/pg/pg_hba.conf
exec postgres -D /tmp/pg -k /tmp -c listen_addresses='*'
"""


@pytest.mark.skipif(PG_BIN is None, reason="needs PostgreSQL (Debian: postgresql)")
def test_a_real_postgresql_as_its_own_user(pytester, run) -> None:
    """user= runs the service as the image's postgres user (PostgreSQL refuses root);
    the test speaks the wire protocol's start-up to it. Rootless, that needs a
    subordinate uid range (the rootless lane's user has one)."""
    if os.geteuid() != 0 and not subids.rootless_mapping().ranged:
        pytest.skip("PostgreSQL refuses root: user= needs more than one uid in the container, which a rootless one "
                    f"has only with a subordinate range ({subids.rootless_mapping().why_not})")
    pytester.makepyfile(test_pg=f"""
        import socket, struct, pytest
        import pytest_isolate as isolate

        pg = isolate.service("pg", ["sh", "-c", {PG_SCRIPT!r}], user="postgres", ready=isolate.tcp(5432),
                             env={{"PATH": "{PG_BIN}:/usr/bin:/bin"}})

        @pytest.mark.isolated
        def test_startup(pg):
            body = struct.pack("!I", 196608) + b"user\\0postgres\\0database\\0postgres\\0\\0"
            with socket.create_connection((pg.host, 5432), timeout=30) as conn:
                conn.sendall(struct.pack("!I", len(body) + 4) + body)
                kind, _, code = struct.unpack("!cII", conn.recv(9))
            assert (kind, code) == (b"R", 0), "AuthenticationOk"
            assert "database system is ready to accept connections" in pg.log()
    """)
    run().assert_outcomes(passed=1)


def test_a_user_not_in_the_image_fails_the_test_with_its_name(pytester, run) -> None:
    pytester.makepyfile(test_user="""
        import pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", ["sleep", "600"], user="no-such-user-here")

        @pytest.mark.isolated
        def test_it(svc):
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*there is no user 'no-such-user-here' in the image's /etc/passwd*"])
