"""The life of a container, top to bottom.

Process tree::

    pytest (controller)                       the user's pytest, or an xdist worker
      └─ launcher            [launch.main]     builds the host's namespaces, forks, waits;
           │                                   dies with pytest
           └─ container host [enter_host]      pid 1 of its own pid namespace; user,
                │                              mount, net, uts, ipc namespaces; pivoted
                │                              into the image stage; collected the tests
                │                              once; multi-threaded (execnet)
                ├─ factory   [factory.serve]   small (forked before the host's exec):
                │    │  [build_container]      per test, in itself: new mount, uts, ipc,
                │    │                         net namespaces, the test's root
                │    │                         filesystem, lo, hostname; then
                │    └─ init                   pid 1 of a new pid namespace; sleeps (the
                │                              kernel reaps orphans)
                └─ zygote    [zygote.py]       forked after collection; forks the tests
                     └─ test [fork_test,_test] born INTO init's pid namespace, joins its
                                  [enter_root] other namespaces, mounts /proc, masks
                                               kernel paths, pivot_root; new cgroup
                                               namespace and session, fds closed, new
                                               keyring, capabilities dropped,
                                               no_new_privs, Landlock, seccomp; runs
                                               the payload

Why two branches: a fork costs what the forking process holds (page tables, and
every page written afterwards is copied). Only the test needs the host's memory (the
collected items), so only the test is forked from (a zygote of) the host; everything
else is built by the small factory, usually while the previous test still runs.

The payload is a function of the job it is given: in the default mode it runs an
already-collected pytest item in the forked process; in mode "fresh" it execs a
fresh interpreter. Both modes share every step above.

Killing init ends the container: the kernel kills every process of its pid
namespace, and with the last one every mount and namespace goes. Each process of
the tree asks for SIGKILL when its parent dies, and every pid namespace of the
containers lies below the host's, so a SIGKILLed pytest takes it all down too.
"""

from __future__ import annotations

import marshal
import os
import resource
import socket
from typing import Callable

from . import capabilities, events, factory, landlock, network, process, rootfs, seccomp, syscalls, user_ns

# The host's own namespaces; CLONE_NEWPID makes its first child (the host) pid 1.
HOST_NAMESPACES = syscalls.CLONE_NEWNET | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWPID
EXIT_CONTAINER_FAILED = 125


# -- the container host: once per pytest process (or xdist worker) and image --------

def enter_host(spec: dict) -> list[str]:
    """Build the container host's namespaces and stage around the calling,
    single-threaded launcher.

    ``spec``: {"entries": image entries, "sources": user-mount sources, "cwd": str,
    "hostname": str}. The launcher forks right after this: its first child, pid 1 of
    the new pid namespace, execs the host interpreter; the second is the factory.
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
        notes += _lock_stage_mounts()
    # Changing uids (root's join above) clears the parent-death signal: set it again.
    process.die_with_parent(controller)
    # Module-level code of test files runs in the host during collection: give it no
    # network, no host hostname or SysV IPC, and no host process to signal. The pid
    # namespace, owned by our user namespace, is also what lets the factory make one
    # per container before forking its init (factory.serve).
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


MOUNTS_UNLOCKED_ENV = "PYTEST_ISOLATE_MOUNTS_UNLOCKED"


def _lock_stage_mounts() -> list[str]:
    """Rootless: move into a second user namespace, made after the stage, and a mount
    namespace of its own. A mount namespace made in a less privileged user namespace
    than its source's gets every inherited mount locked (MNT_LOCK_*): container root,
    even with cap_add=SYS_ADMIN, cannot make the read-only image writable or unmount
    what hides the stage. (As root the stage's mount namespace belongs to the initial
    user namespace: they are locked already.) Its one-line map makes its root the
    first namespace's root, which is the user: nothing else changes."""
    try:
        user_ns.enter_rootless()
        syscalls.unshare(syscalls.CLONE_NEWNS)
    except OSError as exc:
        os.environ[MOUNTS_UNLOCKED_ENV] = process.describe_error(exc)
        return [f"the image's mounts could not be locked (a nested user namespace: {exc.strerror}): "
                "tests with cap_add=SYS_ADMIN are refused"]
    return []


# -- one test's container -------------------------------------------------------------

def build_container(config: dict) -> None:
    """Build a test's root filesystem, network and hostname around the caller (the
    factory, in the fresh namespaces it made). ``config``: {"entries", "mounts",
    "hostname"}; see enter_root for the rest."""
    rootfs.build_test_root(config["entries"], config.get("mounts", []))
    network.bring_up_loopback()
    socket.sethostname(config.get("hostname") or "isolated")


def enter_root(config: dict) -> None:
    """Finish the container from inside: mount its /proc, mask kernel paths and
    pivot into its root. Done by the test process: /proc belongs to the pid namespace
    of the process that mounts it, and the kernel lets a user namespace mount a /proc
    only while a full one is still in view (the stage's, until the pivot).
    ``config``: {"system_paths", "masks"}."""
    rootfs.mount_proc(rootfs.TEST_ROOT)
    if config.get("system_paths", "masked") == "masked":
        rootfs.mask_system_paths(rootfs.TEST_ROOT, config.get("masks"))
    rootfs.pivot_into(rootfs.TEST_ROOT)


# What a test process is called (ps, /proc/self/comm): the host's name, not its zygote's.
test_process_name = ""


def fork_test(namespaces, config: dict, payload: Callable[[dict], None], go_fd: int,
              event_fd: int, keep_fds: set[int]) -> int:
    """Fork the test process (from a zygote) into a built container; returns its pid.

    ``namespaces``: a factory.Namespaces. ``config`` adds to build_container's keys
    {"env", "cwd", "cap_add", "landlock" (writable paths or None), "seccomp_programs",
    "rlimits"}. ``event_fd`` is the write end of the stream the test reports on;
    ``keep_fds`` are the other fds the payload needs (pytest's capture files, the
    crash log). The child gets ready, then reads its job from ``go_fd`` (until
    end-of-file; nothing at all means "never mind") and runs ``payload(job)``.
    """
    # setns() to a pid namespace decides where the caller's next child is born; the
    # caller itself stays, and returns to its own for the children after this one.
    syscalls.setns(namespaces.fds["pid"], syscalls.CLONE_NEWPID)
    try:
        test = os.fork()
        if test == 0:
            _exit_on_error(event_fd, _test, namespaces.fds, config, payload, go_fd, event_fd, keep_fds)
    finally:
        syscalls.setns(process.own_pid_namespace(), syscalls.CLONE_NEWPID)
    return test


def _exit_on_error(event_fd: int, step: Callable, *args) -> None:
    """Run one process of the tree; any error is an event, never a traceback."""
    try:
        step(*args)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        try:
            events.send(event_fd, "container_error",
                        {"message": process.describe_error(exc), "step": step.__name__.strip("_")})
        finally:
            os._exit(EXIT_CONTAINER_FAILED)
    os._exit(0)


def _test(namespace_fds: dict, config: dict, payload, go_fd: int, event_fd: int, keep_fds: set[int]) -> None:
    # The zygote is outside the container's pid namespace: getppid() is 0 while it lives.
    process.die_with_parent(0)
    if test_process_name:
        process.set_name(test_process_name)
    # setns() needs a single-threaded caller: a forked child is one.
    for name, kind in factory.JOINED_NAMESPACES:
        syscalls.setns(namespace_fds[name], kind)
    enter_root(config)
    # A cgroup namespace of its own, rooted where the test was born (its limits group).
    syscalls.unshare(syscalls.CLONE_NEWCGROUP)
    process.new_session()
    try:
        os.chdir(config.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    os.environ.update(config.get("env") or {})
    process.close_fds_except({0, 1, 2, event_fd, go_fd} | keep_fds)
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
    # Ready: everything above may happen before the test's turn (see pipeline.py).
    job = _read_job(go_fd)
    if job is None:
        os._exit(0)
    # Limits last: a small RLIMIT_DATA (best-effort memory) must bind the test, not
    # the reading of its job.
    for name, soft, hard in config.get("rlimits", ()):
        try:
            resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (soft, hard))
        except (OSError, ValueError) as exc:
            current = resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))
            raise OSError(getattr(exc, "errno", 1), f"ulimits: cannot set {name} to ({soft}, {hard}); "
                          f"this process may go no higher than the host's hard limit {current[1]}") from None
    payload(job)


def _read_job(go_fd: int) -> dict | None:
    chunks = []
    while chunk := os.read(go_fd, 1 << 16):
        chunks.append(chunk)
    os.close(go_fd)
    return marshal.loads(b"".join(chunks)) if chunks else None


def reap_with_usage(pid: int) -> tuple[int, dict]:
    """Wait for ``pid``; its status and the resources it and its reaped children used."""
    _, status, usage = os.wait4(pid, 0)
    return status, {"cpu_seconds": usage.ru_utime + usage.ru_stime, "max_rss": usage.ru_maxrss * 1024}
