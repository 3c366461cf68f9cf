"""Shared session fixtures (``isolate_shared_fixtures``): set up once in the fork-mode
container host before any test is forked, inherited copy-on-write by every test
(memory, and the files they wrote under tmp_path_factory), torn down once at the end.

Each inner fixture tells a witness what it does: a datagram to a unix socket the
outer test binds in the project directory. A socket is no regular file, so the
read-only project does not stop the container host (or a test) from sending to it.
Every check is compared with a run that shares nothing, where the same count differs.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from conftest import read_junit, section

FORK = ("--isolate-mode=fork",)

CONFTEST = """
import os, socket, threading, pytest

def tell(what):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(what.encode(), os.path.relpath({witness!r}))  # a path may be too long for AF_UNIX
    s.close()

@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    tell("setup dataset")
    folder = tmp_path_factory.mktemp("data")
    (folder / "table.csv").write_text("id,name\\n1,one\\n")
    yield {{"rows": [1, 2, 3], "token": os.urandom(8).hex(), "folder": str(folder)}}
    tell("teardown dataset")

@pytest.fixture(scope="session")
def connection():
    tell("setup connection")
    s = socket.socket()
    yield s
    s.close()
    tell("teardown connection")

@pytest.fixture(scope="session")
def worker_thread():
    tell("setup worker_thread")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    yield thread
    stop.set()
    thread.join()
    tell("teardown worker_thread")

@pytest.fixture(scope="session")
def broken():
    tell("setup broken")
    raise ValueError("no schema today")

@pytest.fixture(scope="session")
def unavailable():
    tell("setup unavailable")
    pytest.skip("no database here")

@pytest.fixture(scope="session")
def failing_teardown():
    tell("setup failing_teardown")
    yield 1
    tell("teardown failing_teardown")
    raise RuntimeError("teardown went wrong")
"""

USES_DATASET = """
import os, pytest

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(3))
def test_uses(dataset, n, tmp_path, record_property):
    record_property("token", dataset["token"])
    assert dataset["rows"] == [1, 2, 3]          # whatever another test did to it
    dataset["rows"].append(n)
    table = os.path.join(dataset["folder"], "table.csv")
    assert open(table).read() == "id,name\\n1,one\\n"
    with open(table, "a") as f:                   # copy-on-write: the next test sees the original
        f.write(f"{n},changed\\n")
    (tmp_path / "own").write_text("mine")         # the test's own tmp_path works beside it
    assert (tmp_path / "own").read_text() == "mine"
"""


@pytest.fixture
def witness(pytester: pytest.Pytester):
    """A unix datagram socket in the project, read by a thread (a datagram socket's
    queue is short: unread, it would block the senders); ``witness.heard()`` returns
    what came since the last call, once every sender's process has ended."""
    path = str(pytester.path / "witness.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.relpath(path))  # pytester chdir'd there; a path may be too long for AF_UNIX
    os.chmod(path, 0o777)  # as root, container root is another uid
    messages: list[str] = []

    def read() -> None:
        while True:
            data = sock.recv(4096)
            if data == b"stop":
                return
            messages.append(data.decode())

    reader = threading.Thread(target=read)
    reader.start()

    class Witness:
        def heard(self) -> list[str]:
            # Datagrams sent before the inner run ended are queued ahead of this one.
            stopper = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            stopper.sendto(b"stop", os.path.relpath(path))
            stopper.close()
            reader.join()
            heard = list(messages)
            messages.clear()
            restart()
            return heard

    def restart() -> None:
        nonlocal reader
        reader = threading.Thread(target=read)
        reader.start()

    pytester.makeconftest(CONFTEST.format(witness=path))
    yield Witness()
    stopper = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stopper.sendto(b"stop", os.path.relpath(path))
    stopper.close()
    reader.join()
    sock.close()


def share(pytester: pytest.Pytester, *names: str) -> None:
    pytester.makeini("[pytest]\nisolate_shared_fixtures =\n" + "".join(f"    {n}\n" for n in names))


def test_set_up_once_before_the_forks_and_torn_down_once_at_the_end(pytester, run, witness) -> None:
    pytester.makepyfile(test_data=USES_DATASET)
    share(pytester, "dataset")
    shared = run(*FORK, "-p", "no:randomly", "--junitxml=shared.xml")
    shared.assert_outcomes(passed=3)
    assert witness.heard() == ["setup dataset", "teardown dataset"]
    tokens = {props["token"] for props in read_junit(pytester.path / "shared.xml").properties().values()}
    assert len(tokens) == 1
    assert "shared fixtures set up once in" in shared.stdout.str() and ": dataset" in shared.stdout.str()

    # Without sharing, each container sets up its own.
    alone = run(*FORK, "-o", "isolate_shared_fixtures=", "--junitxml=alone.xml")
    alone.assert_outcomes(passed=3)
    assert witness.heard() == ["setup dataset", "teardown dataset"] * 3
    assert len({p["token"] for p in read_junit(pytester.path / "alone.xml").properties().values()}) == 3


def test_a_fixture_a_fork_cannot_carry_is_set_up_in_each_test(pytester, run, witness) -> None:
    """Open fds are closed in a test's process and threads are not forked: such a
    fixture is torn down again in the host and left to each test, with a note."""
    pytester.makepyfile(test_carry="""
import pytest

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(2))
def test_connection(connection, n):
    assert connection.fileno() >= 0

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(2))
def test_thread(worker_thread, n):
    assert worker_thread.is_alive()
""")
    share(pytester, "connection", "worker_thread")
    result = run(*FORK)
    result.assert_outcomes(passed=4)
    text = result.stdout.str()
    assert "shared fixture 'connection' is set up in each test instead: it left 1 file descriptor open (socket:" in text
    assert "shared fixture 'worker_thread' is set up in each test instead: it left 1 thread running" in text
    heard = witness.heard()
    for name in ("connection", "worker_thread"):  # once in the host, undone; then in each test
        assert heard.count(f"setup {name}") == 3 and heard.count(f"teardown {name}") == 3, heard


def test_setup_errors_and_skips_are_those_of_a_plain_run(pytester, run, witness) -> None:
    pytester.makepyfile(test_outcomes="""
import pytest

@pytest.mark.parametrize("n", range(2))
def test_needs_schema(broken, n):
    pass

@pytest.mark.parametrize("n", range(2))
def test_needs_database(unavailable, n):
    pass
""")
    share(pytester, "broken", "unavailable")
    plain = run("-p", "no:isolate", "-rs")
    plain_heard = witness.heard()
    shared = run(*FORK, "--isolate", "-rs")
    outcomes = [{k: v for k, v in r.parseoutcomes().items() if k != "warnings"} for r in (plain, shared)]
    assert outcomes[0] == outcomes[1] == {"errors": 2, "skipped": 2}
    assert witness.heard() == plain_heard == ["setup broken", "setup unavailable"]  # once, cached
    assert shared.stdout.str().count("ValueError: no schema today") == plain.stdout.str().count(
        "ValueError: no schema today") >= 2
    assert "no database here" in shared.stdout.str()


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_teardown_error_fails_the_run(pytester, run, witness, workers) -> None:
    if workers:
        pytest.importorskip("xdist")
    pytester.makepyfile(test_teardown="""
import pytest

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(4))
def test_one(failing_teardown, n):
    assert failing_teardown == 1
""")
    share(pytester, "failing_teardown")
    result = run(*FORK, *(("-n", workers) if workers else ()))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=4)
    errors = section(result, "pytest-isolate: ERROR at teardown of the shared fixtures")
    assert any("RuntimeError: teardown went wrong" in line for line in errors), result.stdout.str()
    heard = witness.heard()
    hosts = 1 if workers is None else heard.count("setup failing_teardown")
    assert 1 <= hosts <= (int(workers) if workers else 1)
    assert heard.count("setup failing_teardown") == heard.count("teardown failing_teardown") == hosts
    assert heard[-1] == "teardown failing_teardown"


@pytest.mark.parametrize("fixtures, message", [
    ("datasett", "ini key isolate_shared_fixtures in * 'datasett' is not a fixture (did you mean 'dataset'?)"),
    ("tmp_path", "*fixture 'tmp_path' (*) has scope 'function'; only session-scoped fixtures can be set up once "
                 "for all tests: make it scope=\"session\", or take it off isolate_shared_fixtures"),
    ("letters", "*fixture 'letters' (*) is parametrized; a shared fixture has one value*"),
])
def test_names_that_cannot_be_shared_are_usage_errors(pytester, run, fixtures, message) -> None:
    pytester.makeconftest("""
import pytest

@pytest.fixture(scope="session")
def dataset():
    return 1

@pytest.fixture(scope="session", params="ab")
def letters(request):
    return request.param
""")
    pytester.makepyfile(test_names="""
def test_uses(dataset, tmp_path, letters):
    pass
""")
    share(pytester, fixtures)
    result = run("--isolate")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
