"""The init factory: a small process that builds each test's container ahead of time.

Forking is what a container costs most: the kernel copies the forking process's page
tables, and every page the child writes to is copied again. The container host holds
pytest and the collected tests (tens to hundreds of MB), so the parts of a container
that need none of that (namespaces, the root filesystem, /proc, masked paths,
pivot_root) are built by an init forked from this factory instead: the host's
child, forked before the host exec'd its interpreter, so its forks are cheap.

    launcher ── container host (pid 1 of the host pid namespace)
                  ├─ factory
                  │    └─ init (pid 1 of a new pid namespace, per test)
                  └─ zygote ── test (born in init's namespaces, see zygote.py)

The host asks for an init (``InitFactory.request``), usually one test ahead. Init
builds the container and sends its namespaces back over the factory's link (the
kernel passes the fds); the host then forks the test straight into them
(container.fork_test) and kills init when the test is over, which ends the pid
namespace and with it every process the test left. Init reaps orphans meanwhile.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket

from . import process, syscalls

MAX_MESSAGE = 1 << 22
NAMESPACE_FILES = ("pid", "mnt", "net", "uts", "ipc")


class Namespaces:
    """fds of one container's namespaces, and a pidfd of its init."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = dict(zip(NAMESPACE_FILES, fds))
        self.init_pidfd = fds[len(NAMESPACE_FILES)] if len(fds) > len(NAMESPACE_FILES) else -1

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def end(self, wait: float = 0) -> None:
        """Kill init: the kernel then kills every process left in its pid namespace.
        With ``wait``, return only once they are gone (or after ``wait`` seconds)."""
        self.close()
        if self.init_pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                if wait:  # init is gone once its whole pid namespace is
                    select.select([self.init_pidfd], [], [], wait)
            except ProcessLookupError:
                pass
            os.close(self.init_pidfd)
            self.init_pidfd = -1


class InitError(Exception):
    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


class InitFactory:
    """The host's end of the factory's link."""

    def __init__(self, link: socket.socket) -> None:
        self.link = link
        self._next_id = 0
        self._arrived: dict[int, tuple] = {}

    def request(self, config: dict) -> int:
        """Ask for an init built after ``config``; returns the request's id."""
        self._next_id += 1
        self.link.send(marshal.dumps((self._next_id, config)))
        return self._next_id

    def wait(self, request_id: int) -> Namespaces:
        """The namespaces of the init asked for, once it is ready (InitError if not)."""
        while request_id not in self._arrived:
            message, fds, _, _ = socket.recv_fds(self.link, MAX_MESSAGE, len(NAMESPACE_FILES) + 1)
            if not message:
                raise InitError("the container factory is gone", "factory")
            answer = marshal.loads(message)
            self._arrived[answer[0]] = (answer, fds)
        (_, kind, *rest), fds = self._arrived.pop(request_id)
        if kind == "ready":
            return Namespaces(fds)
        for fd in fds:
            os.close(fd)
        raise InitError(*rest)

    def discard(self, request_id: int) -> None:
        """An init no test will use: end it when it arrives (or now)."""
        try:
            self.wait(request_id).end()
        except InitError:
            pass


# -- the factory process ------------------------------------------------------------

def serve(link: socket.socket, build) -> None:
    """The factory's loop. ``build(config)`` runs in each init, as its pid 1, and
    returns once the container stands (see container.build_container)."""
    process.set_name("isolate-factory")
    signal.signal(signal.SIGCHLD, _reap_children)
    while True:
        message = link.recv(MAX_MESSAGE)
        if not message:
            return  # the host is gone
        request_id, config = marshal.loads(message)
        # unshare(CLONE_NEWPID) applies to the caller's next children only, and the
        # kernel refuses another one until setns() returns to our own namespace.
        try:
            syscalls.unshare(syscalls.CLONE_NEWPID)
            init = os.fork()
        except OSError as exc:
            link.send(marshal.dumps((request_id, "error", process.describe_error(exc), "fork")))
            continue
        finally:
            try:
                syscalls.setns(process.own_pid_namespace(), syscalls.CLONE_NEWPID)
            except OSError:
                pass
        if init == 0:
            _init(link, request_id, config, build)


def _init(link: socket.socket, request_id: int, config: dict, build) -> None:
    """pid 1 of the container: build it, hand its namespaces over, reap orphans."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        process.die_with_parent(0)  # the factory is outside this pid namespace
        process.set_name("isolate-init")
        build(config)
        fds = [os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in NAMESPACE_FILES]
        fds.append(os.pidfd_open(os.getpid()))
        socket.send_fds(link, [marshal.dumps((request_id, "ready"))], fds)
        for fd in fds:
            os.close(fd)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        step = getattr(exc, "step", "init")
        try:
            link.send(marshal.dumps((request_id, "error", process.describe_error(exc), step)))
        finally:
            os._exit(125)
    link.close()
    process.close_fds_except(set())
    # Orphans of the test are re-parented to us: reap them until the host kills us.
    signal.signal(signal.SIGCHLD, _reap_children)
    while True:
        signal.pause()


def _reap_children(signum=None, frame=None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
