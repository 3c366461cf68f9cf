"""Landlock: forbid writing anywhere but a few directories, on kernels that have it.

Only the *write* rights are handled (creating, removing, renaming, truncating,
writing files), so reading and executing stay as the mounts allow. The rights a
ruleset may handle grow with the Landlock ABI; unknown ones are left out.
"""

from __future__ import annotations

import ctypes
import os

from . import syscalls

_NR = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = (1 << n for n in range(6, 13))
REFER, TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
DIRECTORY_WRITES = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG
                    | MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM)
FILE_WRITES = WRITE_FILE  # the only write right that applies to a non-directory


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """0 when the kernel has no Landlock (or it is disabled at boot)."""
    result = syscalls.libc.syscall(ctypes.c_long(_NR["create_ruleset"]), None, ctypes.c_size_t(0),
                                    ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(result, 0)


def restrict_writes(writable: list[str]) -> None:
    """Allow writes only beneath ``writable`` paths (missing ones are skipped)."""
    abi = abi_version()
    if abi < 1:
        raise OSError(95, "Landlock is not available on this kernel (landlock=False to run without it)")
    handled = DIRECTORY_WRITES | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(handled)
    ruleset = syscalls.check(
        syscalls.libc.syscall(ctypes.c_long(_NR["create_ruleset"]), ctypes.byref(attr),
                               ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
        "landlock_create_ruleset")
    try:
        for path in writable:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rights = handled if os.path.isdir(path) else handled & (FILE_WRITES | (TRUNCATE if abi >= 3 else 0))
                rule = _PathBeneathAttr(rights, fd)
                syscalls.check(
                    syscalls.libc.syscall(ctypes.c_long(_NR["add_rule"]), ctypes.c_int(ruleset),
                                           ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                           ctypes.c_uint32(0)),
                    f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        syscalls.check(syscalls.libc.syscall(ctypes.c_long(_NR["restrict_self"]), ctypes.c_int(ruleset),
                                               ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
