"""The test process: forked by a zygote into a built container, it finishes the
container from inside, drops every privilege, waits for its job and runs it.

Its order is forced:

1. setns() into the container's namespaces (a single-threaded process: a fresh fork);
2. mount /proc, mask kernel paths, pivot_root: /proc belongs to the pid namespace of
   the process that mounts it, and a user namespace may mount a /proc only while a
   full one is still in view (the stage's, until the pivot);
3. a cgroup namespace rooted where it was born (its limits group), a new session
   (no controlling terminal: no TIOCSTI), the environment, fds closed but its own;
4. an empty session keyring, before seccomp takes keyctl() away;
5. capabilities dropped, then no_new_privs (what lets an unprivileged process
   install Landlock and seccomp filters), Landlock, seccomp last (it forbids calls
   made above);
6. ready: everything above happens before the test's turn (pipeline.py); the job
   comes on its pipe ("job"; end-of-file without one: never mind);
7. resource limits last: a small RLIMIT_DATA must bind the test, not the job's reading;
8. the payload (the plugin's: run a collected item, or exec a fresh interpreter).

Any error before the payload is a "container_error" event and exit status 125,
never a traceback.
"""

from __future__ import annotations

import os
import resource
from typing import Callable

from . import capabilities, landlock, link, masks, namespaces, process, rootfs, seccomp, syscalls

EXIT_CONTAINER_FAILED = 125


def fork(container: namespaces.Container, config: dict, payload: Callable[[dict], None], go_fd: int,
         event_fd: int, keep_fds: set[int], name: str) -> int:
    """Fork the test process into ``container``; returns its pid (in the caller's
    pid namespace). ``config``: {"system_paths", "masks", "cwd", "env", "cap_add",
    "landlock" (writable paths or None), "seccomp_programs" (base64), "rlimits"}.
    ``event_fd`` is the stream it reports on; ``keep_fds`` the other fds the payload
    needs; ``name`` what it is called in ps."""
    # setns() to a pid namespace decides where the caller's next child is born; the
    # caller itself stays, and returns to its own for the children after this one.
    syscalls.setns(container.fds["pid"], syscalls.CLONE_NEWPID)
    try:
        test = os.fork()
        if test == 0:
            _exit_on_error(event_fd, _test, container.fds, config, payload, go_fd, event_fd, keep_fds, name)
    finally:
        syscalls.setns(namespaces.own_pid(), syscalls.CLONE_NEWPID)
    return test


def _exit_on_error(event_fd: int, step: Callable, *args) -> None:
    """Run the process; any error is an event, never a traceback."""
    try:
        step(*args)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        try:
            link.send(event_fd, "container_error",
                      {"message": process.describe_error(exc), "step": step.__name__.strip("_")})
        finally:
            os._exit(EXIT_CONTAINER_FAILED)
    os._exit(0)


def _test(namespace_fds: dict, config: dict, payload, go_fd: int, event_fd: int, keep_fds: set[int],
          name: str) -> None:
    # The zygote is outside the container's pid namespace: getppid() is 0 while it lives.
    process.die_with_parent(0)
    if name:
        process.set_name(name)
    namespaces.join(namespace_fds)
    enter_root(config)
    syscalls.unshare(namespaces.TEST_FLAGS)
    process.new_session()
    try:
        os.chdir(config.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    os.environ.update(config.get("env") or {})
    process.close_fds_except({0, 1, 2, event_fd, go_fd} | keep_fds)
    syscalls.join_new_session_keyring()
    if config.get("user") is not None:  # a service's user= (before the capabilities go)
        capabilities.become(*_user_ids(config["user"]))
    capabilities.drop_all(keep=frozenset(config.get("cap_add", ())))
    capabilities.set_no_new_privs()
    if config.get("landlock") is not None:
        landlock.restrict_writes(config["landlock"])
    for program in config.get("seccomp_programs", ()):
        seccomp.load(link.from_binary(program))
    job = link.read_one(go_fd, ("job", "service_job"))  # a service's job has "argv"
    if job is None:
        os._exit(0)
    set_rlimits(config.get("rlimits", ()))
    payload(job)


def _user_ids(user: str) -> tuple[int, int]:
    """NAME, UID or UID:GID, names looked up in the container's own /etc/passwd."""
    import pwd

    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    else:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise OSError(f"user={user!r}: there is no user {name!r} in the image's /etc/passwd") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    return uid, int(group) if group.isdigit() else gid


def enter_root(config: dict) -> None:
    """Mount the container's /proc, mask kernel paths and pivot into its root."""
    rootfs.mount_proc(rootfs.TEST_ROOT)
    if config.get("system_paths", "masked") == "masked":
        masks.mask_system_paths(rootfs.TEST_ROOT, config.get("masks"))
    rootfs.pivot_into(rootfs.TEST_ROOT)


def set_rlimits(rlimits) -> None:
    for name, soft, hard in rlimits:
        kind = getattr(resource, f"RLIMIT_{name.upper()}")
        try:
            resource.setrlimit(kind, (soft, hard))
        except (OSError, ValueError) as exc:
            current = resource.getrlimit(kind)
            raise OSError(getattr(exc, "errno", 1), f"ulimits: cannot set {name} to ({soft}, {hard}); "
                          f"this process may go no higher than the host's hard limit {current[1]}") from None
