"""The life of a container, top to bottom.

Process tree (pids as the host sees them)::

    pytest (controller)                      the user's pytest, or an xdist worker
      └─ container host          [enter_host]  user+mount+net+uts+ipc namespaces,
           │                                   pivoted into the image stage; collected
           │                                   the tests once; multi-threaded (execnet)
           └─ keeper             [_keeper]     forked per test, single-threaded: new
                │                              mount, uts, ipc, net, pid, cgroup namespaces,
                │                              the test's root filesystem, lo, hostname
                └─ init (pid 1)  [_init]       /proc, masked paths, pivot_root, reaps,
                     │                         reports the test's exit status
                     └─ test     [_payload]    new session, fds closed, new keyring,
                                               capabilities dropped, no_new_privs,
                                               Landlock, seccomp; runs the payload

The payload is a function: in the default mode it runs an already-collected pytest
item in the forked process; in the strict mode it execs a fresh interpreter. Both
modes share every step above.

Each process asks for SIGKILL when its parent dies, so killing the keeper (timeout)
or the host (pytest was SIGKILLed) takes the whole container down, and with it every
mount and namespace: nothing is created outside these namespaces.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import time
from typing import Callable, Iterator

from . import capabilities, events, landlock, network, process, rootfs, seccomp, syscalls, user_ns

HOST_NAMESPACES = syscalls.CLONE_NEWNET | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
CONTAINER_NAMESPACES = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWCGROUP
)
EXIT_CONTAINER_FAILED = 125


# -- the container host: once per pytest process (or xdist worker) and image --------

def enter_host(spec: dict) -> list[str]:
    """Turn the calling single-threaded launcher into a container host.

    ``spec``: {"entries": image entries, "sources": user-mount sources, "cwd": str,
    "hostname": str}. The launcher execs the host interpreter right after this.
    """
    controller = os.getppid()
    process.die_with_parent(controller)
    if os.geteuid() == 0:
        # Real root builds the stage *before* joining the user namespace: only real
        # root can open host paths such as an interpreter under /root (mode 700) and
        # idmap the project's binds. Container root is an unprivileged host uid after.
        owner = (user_ns.host_uid_of_container_root(), user_ns.host_gid_of_container_root())
        userns_fd = user_ns.create_for_root()
        syscalls.unshare(syscalls.CLONE_NEWNS)
        notes = rootfs.build_stage(spec["entries"], spec["sources"], owner, userns_fd)
        user_ns.join(userns_fd)
    else:
        # Rootless, the user namespace is what grants the right to mount: first.
        user_ns.enter_rootless()
        syscalls.unshare(syscalls.CLONE_NEWNS)
        notes = rootfs.build_stage(spec["entries"], spec["sources"], (0, 0))
    # Changing uids (root's join above) clears the parent-death signal: set it again.
    process.die_with_parent(controller)
    # Module-level code of test files runs in the host during collection: give it no
    # network and no host hostname or SysV IPC either.
    syscalls.unshare(HOST_NAMESPACES)
    network.bring_up_loopback()
    socket.sethostname(spec.get("hostname") or "isolated")
    # Temporary files go to the containers' own /tmp, not to a host path they lack.
    os.environ["TMPDIR"] = "/tmp"
    os.environ.pop("PYTEST_DEBUG_TEMPROOT", None)
    try:
        os.chdir(spec["cwd"])
    except OSError:
        os.chdir("/")
    return notes


# -- one test's container -------------------------------------------------------------

def start(config: dict, payload: Callable[[], None], event_fd: int, keep_fds: set[int]) -> int:
    """Fork one test's container from the host; return the keeper's pid.

    ``config``: {"entries", "mounts", "hostname", "env", "cwd", "system_paths",
    "cap_add", "landlock" (writable paths or None), "seccomp_programs"}. ``event_fd`` is the
    write end of the stream the container reports on; ``keep_fds`` are the other fds
    the payload needs (pytest's capture files, the crash log).
    """
    host = os.getpid()
    keeper = os.fork()
    if keeper == 0:
        _exit_on_error(event_fd, _keeper, config, payload, event_fd, keep_fds, host)
    return keeper


def _exit_on_error(event_fd: int, step: Callable, *args) -> None:
    """Run one process of the tree; any error is an event, never a traceback."""
    try:
        step(*args)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        try:
            message = (f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror
                       else f"{type(exc).__name__}: {exc}")
            events.send(event_fd, "container_error", {"message": message, "step": step.__name__.strip("_")})
        finally:
            os._exit(EXIT_CONTAINER_FAILED)
    os._exit(0)


def _keeper(config: dict, payload, event_fd: int, keep_fds: set[int], host: int) -> None:
    process.die_with_parent(host)
    # The pid namespace only applies to children: init is forked below.
    syscalls.unshare(CONTAINER_NAMESPACES)
    root = rootfs.build_test_root(config["entries"], config.get("mounts", []))
    network.bring_up_loopback()
    socket.sethostname(config.get("hostname") or "isolated")
    init = os.fork()
    if init == 0:
        _exit_on_error(event_fd, _init, root, config, payload, event_fd, keep_fds)
    _, status = os.waitpid(init, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + 9)


def _init(root: str, config: dict, payload, event_fd: int, keep_fds: set[int]) -> None:
    # The keeper is outside this pid namespace: getppid() is 0 while it lives.
    process.die_with_parent(0)
    # /proc belongs to the pid namespace of the process that mounts it: pid 1 here.
    rootfs.mount_proc(root)
    if config.get("system_paths", "masked") == "masked":
        rootfs.mask_system_paths(root)
    rootfs.pivot_into(root)
    test = os.fork()
    if test == 0:
        _exit_on_error(event_fd, _payload, config, payload, event_fd, keep_fds)
    process.close_fds_except({event_fd})
    while True:  # reap everything; the test's own exit ends the container
        pid, status = os.wait()
        if pid == test:
            events.send(event_fd, "exit", {"status": status})
            return


def _payload(config: dict, payload, event_fd: int, keep_fds: set[int]) -> None:
    process.new_session()
    try:
        os.chdir(config.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    os.environ.update(config.get("env") or {})
    process.close_fds_except({0, 1, 2, event_fd} | keep_fds)
    for name, soft, hard in config.get("rlimits", ()):
        try:
            resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (soft, hard))
        except (OSError, ValueError) as exc:
            current = resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))
            raise OSError(getattr(exc, "errno", 1), f"ulimits: cannot set {name} to ({soft}, {hard}); "
                          f"this process may go no higher than the host's hard limit {current[1]}") from None
    # Keyrings are not namespaced: start from an empty session keyring, before the
    # seccomp profile takes keyctl() away.
    syscalls.join_new_session_keyring()
    capabilities.drop_all(keep=frozenset(config.get("cap_add", ())))
    # no_new_privs is what lets an unprivileged process install Landlock and
    # seccomp filters; seccomp comes last, since it forbids calls made above.
    capabilities.set_no_new_privs()
    if config.get("landlock") is not None:
        landlock.restrict_writes(config["landlock"])
    for program in config.get("seccomp_programs", ()):
        seccomp.load(program)
    payload()


# -- the host side of a running container -----------------------------------------------

class Supervisor:
    """Relays a container's events to the host and enforces its timeout."""

    def __init__(self, keeper: int, event_r: int, timeout: float | None, reap=None) -> None:
        self.keeper = keeper
        self.event_r = event_r
        self.deadline = None if not timeout else time.monotonic() + timeout
        self.timed_out = False
        self.exit_status: int | None = None
        self.rusage: dict = {}
        # How to collect the keeper: by default it is our child; a zygote's keeper
        # is collected by the zygote.
        self._reap = reap or (lambda: reap_with_usage(keeper))

    def events(self) -> Iterator[tuple[str, dict]]:
        reader = events.Reader()
        try:
            while True:
                wait = None if self.deadline is None else self.deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    self.timed_out = True
                    self.kill()
                    self.deadline = None
                    continue
                ready, _, _ = select.select([self.event_r], [], [], wait)
                if not ready:
                    continue
                data = os.read(self.event_r, 1 << 20)
                if not data:
                    break
                for name, payload in reader.feed(data):
                    if name == "exit":
                        self.exit_status = payload.get("status")
                    else:
                        yield name, payload
                if reader.corrupt:
                    self.kill()
        finally:
            os.close(self.event_r)
        keeper_status, self.rusage = self._reap()
        if self.exit_status is None:  # init never reported: the keeper's status tells
            self.exit_status = keeper_status

    def kill(self) -> None:
        try:
            os.kill(self.keeper, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_with_usage(pid: int) -> tuple[int, dict]:
    """Wait for ``pid``; its status and the resources its whole tree used (every
    process in a container is reaped by init, init by the keeper)."""
    _, status, usage = os.wait4(pid, 0)
    return status, {"cpu_seconds": usage.ru_utime + usage.ru_stime, "max_rss": usage.ru_maxrss * 1024}
