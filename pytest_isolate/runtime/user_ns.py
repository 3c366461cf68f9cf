"""Entering the user namespace that every container of a run lives in.

Two cases, decided by who runs pytest:

* rootless: container root is the user's own uid and gid. With a subordinate range
  (/etc/subuid, /etc/subgid) and newuidmap, container ids 1..N are that range
  (subids.py); otherwise the process writes the one-line map a process may write
  for itself, after denying setgroups(2), and nothing else is mapped.
* root: container root maps onto an unprivileged host range, so that a test cannot use
  root's host identity (e.g. to read /etc/shadow through a read-only bind). A helper
  child creates the namespace and the caller, still real root, writes its map (which
  needs CAP_SETUID in the parent namespace), idmaps the project's binds with it, and
  joins it last.

Either way unshare(CLONE_NEWUSER) and setns() into a user namespace must run in a
single-threaded process: the kernel refuses them (EINVAL) otherwise.
"""

from __future__ import annotations

import os

from . import subids, syscalls
from .subids import subordinate_range

# Where container uid/gid 0..65535 land on the host when pytest runs as root, unless
# /etc/subuid and /etc/subgid give root a range of its own.
DEFAULT_ROOT_RANGE = (1_000_000_000, 65536)


def root_mapping() -> tuple[tuple[int, int], tuple[int, int]]:
    """(uid_range, gid_range) used for containers when pytest runs as root."""
    uids = subordinate_range("/etc/subuid") or DEFAULT_ROOT_RANGE
    gids = subordinate_range("/etc/subgid") or DEFAULT_ROOT_RANGE
    return (uids[0], min(uids[1], 65536)), (gids[0], min(gids[1], 65536))


def host_uid_of_container_root() -> int:
    """The host uid that container root is, for files the runtime creates."""
    return root_mapping()[0][0] if os.geteuid() == 0 else os.geteuid()


def host_gid_of_container_root() -> int:
    return root_mapping()[1][0] if os.geteuid() == 0 else os.getegid()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_rootless() -> None:
    """Move the calling (single-threaded) process into a new user namespace whose
    root is the caller's own uid and gid, with its subordinate range where it has one
    (subids.rootless_mapping)."""
    mapping = subids.rootless_mapping()
    if mapping.ranged:
        subids.enter_ranged(mapping)
    else:
        enter_self_mapped()


def enter_nested_rootless() -> None:
    """From the root of ``enter_rootless``'s namespace: a child user namespace whose
    ids are the same as the parent's (its own root is the parent's root)."""
    mapping = subids.rootless_mapping()
    if mapping.ranged:
        subids.enter_nested_ranged(mapping)
    else:
        enter_self_mapped()


def enter_self_mapped() -> None:
    """A new user namespace whose root is the caller's own uid and gid, and nothing else
    is mapped: the map a process may write for itself."""
    uid, gid = os.geteuid(), os.getegid()
    syscalls.unshare(syscalls.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1\n")
    _write("/proc/self/gid_map", f"0 {gid} 1\n")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def create_for_root() -> int:
    """As real root: a user namespace mapped to the unprivileged host range; returns
    an fd to it. A helper child creates it, so the caller keeps its host identity
    (it still has to build the stage and idmap binds with it) until ``join``."""
    (uid_start, uid_count), (gid_start, gid_count) = root_mapping()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"ok")
            os.read(done_r, 1)  # live until the parent holds the namespace
        except OSError as exc:
            os.write(ready_w, f"{exc.errno}:{exc.strerror}".encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 4096).decode(errors="replace")
        if answer != "ok":
            errno, _, message = answer.partition(":")
            raise OSError(int(errno or 1), message or "could not create the container user namespace")
        _write(f"/proc/{helper}/uid_map", f"0 {uid_start} {uid_count}\n")
        _write(f"/proc/{helper}/gid_map", f"0 {gid_start} {gid_count}\n")
        return os.open(f"/proc/{helper}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(helper, 0)


def join(userns_fd: int) -> None:
    """Enter the namespace from ``create_for_root`` as its root, without the host's
    supplementary groups (setns needs a single-threaded caller)."""
    syscalls.setns(userns_fd, syscalls.CLONE_NEWUSER)
    os.close(userns_fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def enter() -> None:
    """Enter a container user namespace the way a container host does."""
    if os.geteuid() == 0:
        join(create_for_root())
    else:
        enter_rootless()
