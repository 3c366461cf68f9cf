"""Snapshots of services (service(..., snapshot=True)): the service starts once, stops
cleanly, and every instance starts from a copy-on-write copy of what it wrote --
with the template's whiteouts and opaque directories, as root and rootless, and
nothing left after the run, however it ends."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import time

import pytest

import imagebuild
from conftest import SUITE_MODE_ARGS, find_processes, module_usage_error, read_quietly, wait_for
from test_services import PG_BIN

PY = sys.executable

# A counter that keeps its count in /data/count; the first start "initialises" it.
COUNTER = f"""
import glob
import socket
import pytest_isolate as isolate

counter_source = '''
import os, socket
if os.path.exists("/data/count"):
    print("loaded the state", flush=True)
else:
    print("initialising", flush=True)
    os.makedirs("/data")
    with open("/data/count", "w") as f:
        f.write("0")
s = socket.socket(socket.AF_INET6)
s.bind(("::", 7000))
s.listen()
while True:
    c, _ = s.accept()
    with open("/data/count") as f:
        n = int(f.read()) + 1
    with open("/data/count", "w") as f:
        f.write(str(n))
    c.sendall(str(n).encode())
    c.close()
'''
def counter(name, **options):
    return isolate.service(name, [{PY!r}, "-u", "-c", counter_source], ready=isolate.tcp(7000), **options)

def ask(service):
    with socket.create_connection((service.host, 7000), timeout=10) as c:
        return int(c.recv(10))

def initialisations(service):
    "How often the service initialised its state, in all its logs so far (templates' and copies')."
    logs = glob.glob("/run/pytest-isolate/services/%s-*.log" % service.name)
    return sum(open(log).read().count("initialising") for log in logs)
"""


def test_each_instance_starts_from_the_state_the_template_left(pytester, run) -> None:
    out = pytester.mkdir("out")
    out.chmod(0o777)
    pytester.makepyfile(helpers=COUNTER)
    for module in ("test_a", "test_b"):
        pytester.makepyfile(**{module: f"""
            import pytest
            from helpers import ask, counter, initialisations

            fresh = counter("fresh", snapshot=True)  # one copy per test
            shared = counter("shared", snapshot=True, scope="module")

            @pytest.mark.isolated(mounts=["{out}:/out:rw"])
            @pytest.mark.parametrize("n", [1, 2])
            def test_count(fresh, shared, n):
                assert [ask(fresh), ask(fresh)] == [1, 2]
                assert "loaded the state" in fresh.log() and "initialising" not in fresh.log()
                assert initialisations(fresh) == 1
                with open("/out/{module}-%d" % n, "w") as f:
                    f.write(str(ask(shared)))
        """})
    run("-p", "no:randomly").assert_outcomes(passed=4)
    # The module-scoped copy is shared by a module's tests, and the next module's starts afresh.
    assert [int((out / f"{m}-{n}").read_text()) for m in ("test_a", "test_b") for n in (1, 2)] == [1, 2, 1, 2]


def test_whiteouts_and_opaque_directories_of_the_template_hold_in_its_copies(pytester, run, tmp_path) -> None:
    """The template deletes a file of the image (a whiteout in its upper directory) and
    replaces a directory of it (an opaque one): its copies see the same."""
    if imagebuild.can_build():
        pytest.skip(imagebuild.can_build())
    root = imagebuild.python_rootfs(str(tmp_path / "rootfs"))
    # The factory is this interpreter, running in the image: pyroute2 (private networks)
    # imports from its standard library there.
    stdlib = os.path.dirname(os.__file__)
    if not os.path.exists(root + stdlib):
        shutil.copytree(stdlib, root + stdlib, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "test", "tests", "idlelib", "tkinter"))
    os.makedirs(f"{root}/srv/files")
    os.makedirs(f"{root}/srv/replaced")
    for path in ("srv/files/kept", "srv/files/deleted", "srv/replaced/old"):
        with open(f"{root}/{path}", "w") as file:
            file.write("image\n")
    source = """
import os, shutil, time
if not os.path.exists("/srv/replaced/new"):  # the template
    os.remove("/srv/files/deleted")
    shutil.rmtree("/srv/replaced")
    os.mkdir("/srv/replaced")
    open("/srv/replaced/new", "w").close()
else:  # a copy: what it sees, then a change the next copy must not see
    print("files", sorted(os.listdir("/srv/files")), "replaced", sorted(os.listdir("/srv/replaced")))
    os.remove("/srv/files/kept")
print("ready", flush=True)
time.sleep(600)
"""
    pytester.makepyfile(test_layers=f"""
        import os, pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", ["/usr/bin/python3", "-u", "-c", {source!r}], ready=isolate.log("ready"),
                              snapshot=isolate.snapshot(stop_timeout=60))

        @pytest.mark.isolated(image="dir:{root}")
        @pytest.mark.parametrize("n", [1, 2])
        def test_copy(svc, n):
            assert "files ['kept'] replaced ['new']" in svc.log(), svc.log()
    """)
    run("-p", "no:randomly").assert_outcomes(passed=2)


def test_a_service_that_ignores_its_stop_signal_fails_its_tests_and_leaves_nothing(pytester, run) -> None:
    marker = f"pytest-isolate-snapshot-marker-{os.getpid()}"
    source = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(600)"
    pytester.makepyfile(test_stuck=f"""
        import pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-u", "-c", {source!r}, "{marker}"], ready=isolate.log("up"),
                              snapshot=isolate.snapshot(stop_timeout=0.5))

        @pytest.mark.isolated
        def test_it(svc):
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the service 'svc' did not exit within 0.5 s of SIGTERM, so its snapshot was "
                                 "not taken: make it exit on SIGTERM, or give pytest_isolate.snapshot(stop_signal="
                                 "..., stop_timeout=...); its log:*", "up"])
    assert wait_for(lambda: find_processes(marker), 30) == []


def test_a_service_that_stops_with_an_error_fails_its_tests(pytester, run) -> None:
    source = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *_: (print('could not flush'), sys.exit(3)))\n"
              "print('up'); time.sleep(600)")
    pytester.makepyfile(test_unclean=f"""
        import signal, pytest
        import pytest_isolate as isolate

        svc = isolate.service("svc", [{PY!r}, "-u", "-c", {source!r}], ready=isolate.log("up"),
                              snapshot=isolate.snapshot(stop_signal=signal.SIGINT))

        @pytest.mark.isolated
        def test_it(svc):
            pass
    """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the service 'svc' exited with status 3 on SIGINT, not cleanly, so its snapshot "
                                 "was not taken; its log:*", "could not flush"])


@pytest.mark.parametrize(("call", "message"), [
    ('isolate.service("db", ["x"], snapshot="yes")',
     "*snapshot: got 'yes'; accepted: True, False or pytest_isolate.snapshot(stop_signal=..., stop_timeout=...)*"),
    ('isolate.snapshot(stop_signal=9)', "*stop_signal: got 9; accepted: a signal the service exits on cleanly*"),
    ('isolate.snapshot(stop_timeout=0)', "*stop_timeout: got 0; accepted: seconds, 0 to 3600*"),
])
def test_bad_snapshot_arguments_are_errors_that_say_what_is_accepted(pytester, run, call, message) -> None:
    error = module_usage_error(pytester, run, f"""
        import pytest_isolate as isolate

        svc = {call}

        def test_it():
            pass
    """)
    assert fnmatch.fnmatchcase(error, message), error


def _snapshot_mounts() -> list[int]:
    """Pids whose mount namespace holds a snapshot tmpfs (runtime/snapshots.py)."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and b" /.pytest-isolate-snapshots " in read_quietly(f"/proc/{p}/mountinfo")]


def test_snapshots_are_gone_after_the_run_and_after_a_sigkilled_pytest(pytester) -> None:
    out = pytester.mkdir("out")
    out.chmod(0o777)
    pytester.makepyfile(helpers=COUNTER)
    pytester.makepyfile(test_leak=f"""
        import os, time, pytest
        from helpers import ask, counter

        fresh = counter("fresh", snapshot=True)

        @pytest.mark.isolated(mounts=["{out}:/out:rw"])
        def test_uses(fresh):
            assert ask(fresh) == 1
            if os.environ.get("WAIT_TO_BE_KILLED"):
                open("/out/waiting", "w").close()
                time.sleep(600)
    """)
    args = [PY, "-m", "pytest", "-p", "no:cacheprovider", *SUITE_MODE_ARGS, "test_leak.py"]
    before = set(_snapshot_mounts())
    done = subprocess.run(args, cwd=pytester.path, capture_output=True, text=True, timeout=300)
    assert "1 passed" in done.stdout, done.stdout + done.stderr
    assert wait_for(lambda: set(_snapshot_mounts()) - before, 30) == set()
    # Again, and pytest is SIGKILLed while a copy runs.
    pytest_process = subprocess.Popen(args, cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(os.environ, WAIT_TO_BE_KILLED="1"))
    try:
        deadline = time.monotonic() + 120
        while not (out / "waiting").exists() and time.monotonic() < deadline and pytest_process.poll() is None:
            time.sleep(0.02)
        assert (out / "waiting").exists(), "the test never ran"
        assert set(_snapshot_mounts()) - before, "the snapshot is not where this test looks for it"
    finally:
        pytest_process.kill()
        pytest_process.wait()
    assert wait_for(lambda: set(_snapshot_mounts()) - before, 30) == set()


@pytest.mark.skipif(PG_BIN is None, reason="needs PostgreSQL (Debian: postgresql)")
@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL refuses root: user= needs more than one uid in the "
                    "container, which a rootless one has only with a subordinate range")
def test_a_pristine_postgresql_per_test_from_one_initdb(pytester, run) -> None:
    script = """
set -e
if [ ! -d /tmp/pg ]; then
    echo "running initdb"
    initdb -D /tmp/pg -A trust -U postgres > /dev/null
    printf "host all all 0.0.0.0/0 trust\\nhost all all ::/0 trust\\n" >> /tmp/pg/pg_hba.conf
fi
exec postgres -D /tmp/pg -k /tmp -c listen_addresses='*'
"""
    pytester.makepyfile(test_pg=f"""
        import glob, subprocess, pytest
        import pytest_isolate as isolate

        pg = isolate.service("pg", ["sh", "-c", {script!r}], user="postgres", ready=isolate.tcp(5432),
                             env={{"PATH": "{PG_BIN}:/usr/bin:/bin"}}, snapshot=True)

        def psql(sql):
            return subprocess.run(["{PG_BIN}/psql", "-h", "pg", "-U", "postgres", "-tAc", sql], check=True,
                                  capture_output=True, text=True, timeout=60).stdout.strip()

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_a_table_of_its_own(pg, n):
            assert psql("select count(*) from pg_tables where tablename = 't'") == "0"
            psql("create table t (x int)")
            psql("insert into t values (%d)" % n)
            assert psql("select x from t") == str(n)
            logs = [open(log).read() for log in glob.glob("/run/pytest-isolate/services/pg-*.log")]
            assert sum(log.count("running initdb") for log in logs) == 1
            assert "running initdb" not in pg.log()
    """)
    run("-p", "no:randomly").assert_outcomes(passed=3)
