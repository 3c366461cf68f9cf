"""Dropping privileges: every capability set emptied (or reduced to what the test
asked for with ``cap_add``), then no_new_privs.

Order is forced:
* the bounding set goes first, because PR_CAPBSET_DROP needs CAP_SETPCAP, which the
  final capset() removes;
* the bounding set must be reduced at all, because uid 0 (container root) regains
  ``permitted = bounding`` on every execve() of a non-setuid binary;
* ambient capabilities are raised last (they need permitted and inheritable), so a
  granted capability survives execve() of a helper such as ``ip``;
* no_new_privs comes after all of it and keeps setuid/file capabilities from adding
  anything back.

Granted capabilities are those of the container's user namespace: CAP_NET_ADMIN
configures the test's own network namespace, never the host's.
"""

from __future__ import annotations

import errno
import os

from . import syscalls

# capability(7) numbers, in order.
NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE"
).split()
NUMBERS = {f"CAP_{name}": number for number, name in enumerate(NAMES)}
PR_CAP_AMBIENT_RAISE = 2


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


_LAST_CAP = _read_last_cap()  # read once, in the host: every test inherits it


def last_cap() -> int:
    return _LAST_CAP


def drop_all(keep: frozenset[str] | set[str] = frozenset()) -> None:
    """Drop every capability but ``keep`` (names like "CAP_NET_ADMIN")."""
    kept = {NUMBERS[name] for name in keep}
    for cap in range(last_cap() + 1):
        if cap not in kept:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    mask = sum(1 << cap for cap in kept)
    syscalls.capset(mask, mask, mask)
    for cap in sorted(kept):
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def set_no_new_privs() -> None:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


PR_SET_KEEPCAPS = 8


def become(uid: int, gid: int) -> None:
    """Switch to ``uid``/``gid`` (inside the container's user namespace) while still
    able to drop capabilities after: a uid change from 0 clears the effective set, so
    the permitted one is kept across it (PR_SET_KEEPCAPS) and made effective again
    for drop_all, which then empties all of them."""
    try:
        os.setgroups([gid])
    except PermissionError:
        pass  # rootless: setgroups is denied in the user namespace, and there is one group anyway
    syscalls.prctl(PR_SET_KEEPCAPS, 1)
    try:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise OSError(exc.errno, f"uid {uid} / gid {gid} is not mapped in the container's user namespace (a "
                      "rootless container maps only your own uid, unless /etc/subuid gives you a range)") from None
    every = (1 << (last_cap() + 1)) - 1
    syscalls.capset(every, every, 0)
    syscalls.prctl(PR_SET_KEEPCAPS, 0)
