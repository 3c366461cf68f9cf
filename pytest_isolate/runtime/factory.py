"""The init factory: a small process that builds each test's container ahead of time.

Forking is what a container costs most: the kernel copies the forking process's page
tables, and every page the child writes to is copied again. The container host holds
pytest and the collected tests (tens to hundreds of MB), so the parts of a container
that need none of that (namespaces, the root filesystem, init) are made by this
factory instead: the host's child, forked before the host exec'd its interpreter,
so its one fork per container (init) is cheap, and what it builds it builds in
itself, never in a fresh copy of its memory.

    launcher ── container host (pid 1 of the host pid namespace)
                  ├─ factory
                  │    └─ init (pid 1 of a new pid namespace, per test)
                  └─ zygote ── test (born in init's namespaces, see zygote.py)

The host asks for a container (``InitFactory.request``), usually one test ahead.
The factory builds it around itself: it enters fresh mount, network, UTS and IPC
namespaces, builds the root filesystem there, forks init (pid 1 of a fresh pid
namespace, which only sleeps), sends the namespaces back over its link (the kernel
passes the fds) and returns to its own namespaces. The host then forks the test
straight into them (container.fork_test); the test mounts its /proc and pivots into
the root, and the host kills init when the test is over, which ends the pid
namespace and with it every process the test left.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket

from . import process, syscalls, tiny_init

MAX_MESSAGE = 1 << 22
# The namespaces the factory makes for a container (and leaves after), which the
# test process joins; its pid namespace is made apart, for init.
JOINED_NAMESPACES = (("mnt", syscalls.CLONE_NEWNS), ("net", syscalls.CLONE_NEWNET),
                     ("uts", syscalls.CLONE_NEWUTS), ("ipc", syscalls.CLONE_NEWIPC))
NAMESPACE_FILES = ("pid",) + tuple(name for name, _ in JOINED_NAMESPACES)


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
    """The factory's loop. ``build(config)`` runs in the factory itself, in the fresh
    namespaces of a container, and returns once its root filesystem stands (see
    container.build_container)."""
    process.set_name("isolate-factory")
    # Inits are reaped by the kernel, and so are the orphans they inherit (they
    # inherit this). ^C is the host's business (as for the launcher).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A home to return to after each container. It must be a mount namespace of our
    # user namespace: as root, the stage's belongs to the initial one, and setns()
    # back into it would need real root.
    syscalls.unshare(syscalls.CLONE_NEWNS)
    home = _open_namespaces({})
    while True:
        message = link.recv(MAX_MESSAGE)
        if not message:
            return  # the host is gone
        request_id, config = marshal.loads(message)
        try:
            fds = _container(config, build)
        except Exception as exc:
            step = getattr(exc, "step", "init")
            link.send(marshal.dumps((request_id, "error", process.describe_error(exc), step)))
            continue
        finally:
            _go_home(home)
        try:
            socket.send_fds(link, [marshal.dumps((request_id, "ready"))], fds)
        finally:
            for fd in fds:
                os.close(fd)


def _container(config: dict, build) -> list[int]:
    """Build one container around the factory; its namespace fds and init's pidfd."""
    syscalls.unshare(sum(kind for _, kind in JOINED_NAMESPACES))
    fds: dict[str, int] = {}
    try:
        _open_namespaces(fds)
        build(config)
        # unshare(CLONE_NEWPID) applies to the caller's next children only: init is
        # the first, pid 1 of the namespace, born in the namespaces built above.
        syscalls.unshare(syscalls.CLONE_NEWPID)
        init = _spawn_init()
        fds["pid"] = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
        fds["init"] = os.pidfd_open(init)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return [fds[name] for name in NAMESPACE_FILES] + [fds["init"]]


def _open_namespaces(fds: dict[str, int]) -> dict[str, int]:
    """Add fds of the caller's JOINED_NAMESPACES to ``fds`` (by name, as they open)."""
    for name, _ in JOINED_NAMESPACES:
        fds[name] = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    return fds


def _go_home(home: dict[str, int]) -> None:
    """Back to the factory's own namespaces (and root): a failure here would build
    the next container inside this one, so it ends the factory."""
    try:
        for name, kind in JOINED_NAMESPACES:
            syscalls.setns(home[name], kind)
        syscalls.setns(process.own_pid_namespace(), syscalls.CLONE_NEWPID)
    except OSError:
        os._exit(125)


_tiny_init_works = [True]


def _spawn_init() -> int:
    """pid 1 of the container: it only exists (killing it ends the container) and
    sleeps. It ignores SIGCHLD (as we do), so the kernel reaps the orphans it
    inherits; pid 1 of a pid namespace gets no signal it does not handle, so only
    the host (SIGKILL, from outside) ends it. The test's own process is forked by a
    zygote later. See tiny_init.py; without it, a forked Python sleeper."""
    if _tiny_init_works and os.path.exists(tiny_init.PATH):
        try:
            # posix_spawn() shares our memory until the exec: no page tables are copied.
            return os.posix_spawn(tiny_init.PATH, [tiny_init.PATH], os.environ,
                                  file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2)])
        except OSError:  # e.g. a security module forbids the exec: fork from now on
            _tiny_init_works.clear()
    init = os.fork()
    if init == 0:
        try:
            process.die_with_parent(0)  # the factory is outside this pid namespace
            process.set_name("isolate-init")
            process.close_fds_except(set())  # no link, no namespace of the host's
            while True:
                signal.pause()
        finally:
            os._exit(0)
    return init
