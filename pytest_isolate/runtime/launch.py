"""Launcher of a container host: ``python -c <bootstrap> --spec B64 --exec CMD...``.

execnet starts the host with ``popen//python=<launcher>``: it appends the
interpreter's own arguments (``-u -c <bootstrap>``) to our command line. Once this
single-threaded process has built the container host's namespaces, it forks the host,
pid 1 of the new pid namespace, which forks the init factory (factory.py) while it is
still small, then execs those arguments. The factory and the host share a socket
whose fd is in PYTEST_ISOLATE_FACTORY_FD. The launcher stays, waits, and passes the
host's exit status on (execnet talks to the host through the launcher's pipes).

If the container cannot be built, the interpreter is still exec'd, with the reason
in PYTEST_ISOLATE_HOST_ERROR: the remote side then only reports it over the execnet
channel and exits, so the user gets a message instead of a dead gateway.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sys

from . import container, factory, process

HOST_ERROR_ENV = "PYTEST_ISOLATE_HOST_ERROR"
HOST_NOTES_ENV = "PYTEST_ISOLATE_HOST_NOTES"
FACTORY_FD_ENV = "PYTEST_ISOLATE_FACTORY_FD"


def encode_spec(spec: dict) -> str:
    return base64.b64encode(json.dumps(spec).encode()).decode()


def launcher_command(spec: dict, python: str) -> str:
    """The ``python=`` value for an execnet popen spec (it is shell-split)."""
    import shlex

    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bootstrap = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        "from pytest_isolate.runtime.launch import main; main()"
    )
    parts = [python, "-S", "-c", bootstrap, "--spec", encode_spec(spec), "--exec", python]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(base64.b64decode(argv[argv.index("--spec") + 1]))
    command = argv[argv.index("--exec") + 1 :]
    try:
        notes = container.enter_host(spec)
        if notes:
            os.environ[HOST_NOTES_ENV] = json.dumps(notes)
    except Exception as exc:  # reported by the remote side, see the module doc
        os.environ[HOST_ERROR_ENV] = process.describe_error(exc)
    launcher = os.getpid()
    host_end = factory_end = None
    if HOST_ERROR_ENV not in os.environ:
        host_end, factory_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host_end.set_inheritable(True)
        os.environ[FACTORY_FD_ENV] = str(host_end.fileno())
    host = os.fork()
    if host == 0:
        # Parent-death signals do not survive fork. Pid 1 of the new namespace sees
        # no parent (getppid() is 0), so that is the parent to expect.
        process.die_with_parent(0 if os.getpid() == 1 else launcher)
        if factory_end is not None:
            # The factory is the host's child: when the host (pid 1) ends, the kernel
            # kills and reaps it at once, instead of waiting for another reaper.
            _fork_factory(host_end, factory_end)
        os.execv(command[0], command)
    for end in (host_end, factory_end):
        if end is not None:
            end.close()
    # ^C reaches the whole process group: the host handles it; the launcher only
    # follows the host (and the host dies with the launcher).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host_status = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == host:
            host_status = status
    os._exit(os.waitstatus_to_exitcode(host_status) & 0xFF if os.WIFEXITED(host_status)
             else 128 + os.WTERMSIG(host_status))


def _fork_factory(host_end: socket.socket, factory_end: socket.socket) -> None:
    """The init factory (see factory.py): forked now, while this process is small."""
    host = os.getpid()
    if os.fork() == 0:
        try:
            process.die_with_parent(host)
            host_end.close()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)  # execnet's pipes belong to the host alone
            os.dup2(null, 1)
            os.close(null)
            factory.serve(factory_end, container.build_container)
        finally:
            os._exit(0)
    factory_end.close()
