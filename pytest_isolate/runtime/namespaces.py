"""Which namespaces a container has, who makes each, and in which order.

One table (as youki's ``ORDERED_NAMESPACES`` and bubblewrap's ``ns_infos[]``); the
rest of the runtime derives its sets from it. Three makers:

* the launcher, for the container host: a user namespace first (it grants the right
  to make the others rootless), then mount, and then network, UTS, IPC and pid
  around the host (launch.py);
* the factory, per test: mount, network, UTS, IPC, joined by the test process in
  the table's order, and a pid namespace apart, for init (factory.py);
* the test process itself: a cgroup namespace, rooted where it was born (its limits
  group), so it must be made after the fork (test_process.py).
"""

from __future__ import annotations

import os
import select
import signal
from typing import NamedTuple

from . import syscalls


class Namespace(NamedTuple):
    name: str  # as in /proc/PID/ns/
    flag: int  # CLONE_NEW*
    host: bool  # the container host has its own
    container: str  # per test: "joined" (the factory makes it, the test joins), "init", "test" or ""


ORDERED = (
    Namespace("user", syscalls.CLONE_NEWUSER, True, ""),
    Namespace("mnt", syscalls.CLONE_NEWNS, True, "joined"),
    Namespace("net", syscalls.CLONE_NEWNET, True, "joined"),
    Namespace("uts", syscalls.CLONE_NEWUTS, True, "joined"),
    Namespace("ipc", syscalls.CLONE_NEWIPC, True, "joined"),
    Namespace("pid", syscalls.CLONE_NEWPID, True, "init"),
    Namespace("cgroup", syscalls.CLONE_NEWCGROUP, False, "test"),
)

# What the launcher unshares around the host once its user and mount namespaces
# stand (CLONE_NEWPID makes its first child, the host, pid 1).
HOST_LATE = tuple(ns for ns in ORDERED if ns.host and ns.name not in ("user", "mnt"))
HOST_LATE_FLAGS = sum(ns.flag for ns in HOST_LATE)
# What the factory makes per container and the test process joins, in order.
JOINED = tuple(ns for ns in ORDERED if ns.container == "joined")
JOINED_FLAGS = sum(ns.flag for ns in JOINED)
# The fds that travel with a container: pid (for children) first, then JOINED.
FILES = ("pid",) + tuple(ns.name for ns in JOINED)
# What the test process makes for itself.
TEST_FLAGS = sum(ns.flag for ns in ORDERED if ns.container == "test")


def open_own(names) -> dict[str, int]:
    """fds of the caller's namespaces ``names``."""
    return {name: os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in names}


def join(fds: dict[str, int]) -> None:
    """setns() into JOINED, in the table's order (the caller must be single-threaded)."""
    for ns in JOINED:
        syscalls.setns(fds[ns.name], ns.flag)


_own_pid: list[int] = []


def own_pid() -> int:
    """An fd of the caller's pid namespace (opened once per process), to setns()
    back to after making or joining another one for its next child."""
    if not _own_pid:
        _own_pid.append(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
    return _own_pid[0]


class Container:
    """The host's handle on one built container: fds of its namespaces (FILES) and a
    pidfd of its init, whose death ends the container."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = dict(zip(FILES, fds))
        self.init_pidfd = fds[len(FILES)] if len(fds) > len(FILES) else -1
        self.addresses: list[str] = []  # on a private network
        self.watched: list[int] = []  # a service's /proc/net/tcp and tcp6 (services_host.py)

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
        for fd in self.watched:
            os.close(fd)
        self.watched = []
