"""Dropping privileges: every capability set emptied, then no_new_privs.

Order is forced:
* the bounding set goes first, because PR_CAPBSET_DROP needs CAP_SETPCAP, which the
  final capset() removes;
* the bounding set must be empty at all, because uid 0 (container root) regains
  ``permitted = bounding`` on every execve() of a non-setuid binary;
* no_new_privs comes last and keeps setuid/file capabilities from adding anything back.
"""

from __future__ import annotations

from . import syscalls


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_all() -> None:
    for cap in range(last_cap() + 1):
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.capset(0, 0, 0)


def set_no_new_privs() -> None:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
