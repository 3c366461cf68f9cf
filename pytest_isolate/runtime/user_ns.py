"""Entering the user namespace that every container of a run lives in.

Two cases, decided by who runs pytest:

* rootless: the process maps container root onto its own uid and gid. A process may
  write such a one-line map for itself, after denying setgroups(2).
* root: container root maps onto an unprivileged host range, so that a test cannot use
  root's host identity (e.g. to read /etc/shadow through a read-only bind). A map with
  more than the caller's own uid must be written from the *parent* namespace by a
  process holding CAP_SETUID there, so a helper is forked before unshare() to do it.

Either way unshare(CLONE_NEWUSER) must run in a single-threaded process: the kernel
refuses it (EINVAL) when the caller shares its memory with other threads.
"""

from __future__ import annotations

import os

from . import syscalls

# Where container uid/gid 0..65535 land on the host when pytest runs as root, unless
# /etc/subuid and /etc/subgid give root a range of its own.
DEFAULT_ROOT_RANGE = (1_000_000_000, 65536)


def subordinate_range(path: str, user: str = "root") -> tuple[int, int] | None:
    """First ``user:start:count`` (or ``0:start:count``) line of /etc/sub[ug]id."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, "0"):
                    start, count = int(parts[1]), int(parts[2])
                    if count > 0:
                        return start, count
    except (OSError, ValueError):
        pass
    return None


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


def enter() -> None:
    """Move the calling (single-threaded) process into a new user namespace as root."""
    if os.geteuid() == 0:
        _enter_mapped_to_host_range()
    else:
        _enter_mapped_to_self()
    # Become root of the namespace for real, and drop the host's supplementary
    # groups (possible only with a privileged map; rootless keeps the user's own).
    if os.geteuid() != 0 or os.getegid() != 0:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)


def _enter_mapped_to_self() -> None:
    uid, gid = os.geteuid(), os.getegid()
    syscalls.unshare(syscalls.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1\n")
    _write("/proc/self/gid_map", f"0 {gid} 1\n")


def _enter_mapped_to_host_range() -> None:
    (uid_start, uid_count), (gid_start, gid_count) = root_mapping()
    target = os.getpid()
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # the helper stays in the parent namespace, with CAP_SETUID there
        status = 1
        try:
            os.close(go_w)
            if os.read(go_r, 1) == b"u":
                _write(f"/proc/{target}/uid_map", f"0 {uid_start} {uid_count}\n")
                _write(f"/proc/{target}/gid_map", f"0 {gid_start} {gid_count}\n")
                status = 0
        finally:
            os._exit(status)
    os.close(go_r)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
    except OSError:
        os.close(go_w)
        os.waitpid(helper, 0)
        raise
    os.write(go_w, b"u")
    os.close(go_w)
    _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError(
            1, f"could not write the uid/gid map of the container user namespace "
            f"({uid_start}+{uid_count}, {gid_start}+{gid_count})"
        )
    os.setgroups([])
