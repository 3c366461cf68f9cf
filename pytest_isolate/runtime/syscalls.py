"""Thin ctypes wrappers for the Linux system calls the runtime needs.

Only the standard library is used, so this module (like the rest of ``runtime``)
can run in the container host and in a bare forked child without pytest.
Every wrapper raises ``OSError`` with the errno and a description of the call.

The seam: the wrappers below describe and check a call; making it is left to
``kernel``, a ``Kernel`` whose methods return the raw result (negative with errno
set on failure). ``recording()`` swaps in a ``Recording`` double that notes each
call as ``(name, args)`` and succeeds (or fails on request), so unit tests see the
order of mounts and prctls without touching the kernel. Callers keep calling
``syscalls.mount(...)``; the indirection costs one global lookup and one method call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import Callable, Iterator

libc = ctypes.CDLL(None, use_errno=True)

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# <sys/prctl.h>
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# x86_64 and aarch64 system call numbers for calls glibc has no wrapper for.
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "keyctl": 250, "open_tree": 428,
               "move_mount": 429, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "capset": 91, "keyctl": 219, "open_tree": 428,
                "move_mount": 429, "mount_setattr": 442},
}

# The new mount API (<linux/mount.h>), used for idmapped binds.
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
_NR = _SYSCALLS.get(os.uname().machine, _SYSCALLS["x86_64"])


def check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
KEYCTL_JOIN_SESSION_KEYRING = 1

# A prototype with argtypes: ctypes converts plain ints itself, which matters where
# prctl() runs dozens of times per test (dropping the bounding set).
_prctl = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong, use_errno=True)(("prctl", libc))


class Kernel:
    """The real calls: each returns the raw result, negative with errno set on failure."""

    def unshare(self, flags: int) -> int:
        return libc.unshare(ctypes.c_int(flags))

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None) -> int:
        return libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))

    def mount_in(self, directory: str, source: str | None, target: str, fstype: str | None, flags: int,
                 data: str | None) -> int:
        """mount(2) with ``directory`` as the working directory: relative names in
        ``data`` are resolved there (the caller's cwd is back afterwards)."""
        here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(directory)
            return self.mount(source, target, fstype, flags, data)
        finally:
            os.fchdir(here)
            os.close(here)

    def umount2(self, target: str, flags: int) -> int:
        return libc.umount2(_b(target), ctypes.c_int(flags))

    def pivot_root(self, new_root: str, put_old: str) -> int:
        return libc.syscall(ctypes.c_long(_NR["pivot_root"]), _b(new_root), _b(put_old))

    def setns(self, fd: int, nstype: int) -> int:
        return libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype))

    def open_tree(self, fd: int, flags: int) -> int:
        return libc.syscall(ctypes.c_long(_NR["open_tree"]), ctypes.c_int(fd), b"", ctypes.c_uint(flags))

    def mount_setattr(self, tree: int, attr_set: int, userns_fd: int) -> int:
        attr = _MountAttr(attr_set, 0, 0, userns_fd)
        return libc.syscall(ctypes.c_long(_NR["mount_setattr"]), ctypes.c_int(tree), b"",
                            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                            ctypes.c_size_t(ctypes.sizeof(attr)))

    def move_mount(self, tree: int, target: str) -> int:
        return libc.syscall(ctypes.c_long(_NR["move_mount"]), ctypes.c_int(tree), b"",
                            ctypes.c_int(-100), _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))

    def close(self, fd: int) -> int:
        os.close(fd)
        return 0

    def prctl(self, option: int, arg2: int, arg3: int) -> int:
        return _prctl(option, arg2, arg3, 0, 0)

    def keyctl(self, operation: int) -> int:
        return libc.syscall(ctypes.c_long(_NR["keyctl"]), ctypes.c_int(operation), None)

    def capset(self, effective: int, permitted: int, inheritable: int) -> int:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for i, shift in enumerate((0, 32)):
            data[i].effective = (effective >> shift) & 0xFFFFFFFF
            data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
        return libc.syscall(ctypes.c_long(_NR["capset"]), ctypes.byref(header), ctypes.byref(data))


class Recording:
    """A test double for ``Kernel``: ``calls`` lists each call as ``(name, args)``.

    Every call succeeds (returns 0) unless ``fail(name, args)`` returns an errno."""

    def __init__(self, fail: Callable[[str, tuple], int | None] | None = None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self._fail = fail

    def _call(self, name: str, args: tuple) -> int:
        self.calls.append((name, args))
        err = self._fail(name, args) if self._fail else None
        if err:
            ctypes.set_errno(err)  # what check() reads, as after a real failure
            return -1
        return 0


def _recorder(name: str) -> Callable[..., int]:
    return lambda self, *args: self._call(name, args)


for _name in [n for n in vars(Kernel) if not n.startswith("_")]:
    setattr(Recording, _name, _recorder(_name))

kernel: Kernel | Recording = Kernel()


@contextlib.contextmanager
def recording(fail: Callable[[str, tuple], int | None] | None = None) -> Iterator[list[tuple[str, tuple]]]:
    """Record calls instead of making them, for the ``with`` block; yields the list."""
    global kernel
    double, previous = Recording(fail), kernel
    kernel = double
    try:
        yield double.calls
    finally:
        kernel = previous


def unshare(flags: int) -> None:
    check(kernel.unshare(flags), f"unshare({describe_flags(flags)})")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    check(kernel.mount(source, target, fstype, flags, data), f"mount {fstype or source or ''} on {target}")


# Mount options are copied into one page; overlayfs takes at most 500 lower layers.
MOUNT_DATA_MAX = 4095
OVERLAY_MAX_LOWERS = 500


def mount_overlay(target: str, lowers: list[str], upper: str, work: str, flags: int, parent: str) -> None:
    """An overlay of ``lowers`` (top first) on ``target``. A deep image's lower
    directories would not fit the page the kernel copies the options into: they are
    then named relative to ``parent``, the directory that holds them, and the mount
    is made from there (as containerd does)."""
    if len(lowers) > OVERLAY_MAX_LOWERS:
        raise OSError(errno.E2BIG, f"mount overlay on {target}: {len(lowers)} layers; overlayfs stacks at most "
                      f"{OVERLAY_MAX_LOWERS}")
    tail = f",upperdir={upper},workdir={work},userxattr"
    data = f"lowerdir={':'.join(lowers)}{tail}"
    if len(data) <= MOUNT_DATA_MAX:
        mount("overlay", target, "overlay", flags, data)
        return
    relative = ":".join(os.path.relpath(lower, parent) for lower in lowers)
    check(kernel.mount_in(parent, "overlay", target, "overlay", flags, f"lowerdir={relative}{tail}"),
          f"mount overlay on {target}")


def umount2(target: str, flags: int = 0) -> None:
    check(kernel.umount2(target, flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    check(kernel.pivot_root(new_root, put_old), f"pivot_root({new_root}, {put_old})")


def setns(fd: int, nstype: int) -> None:
    check(kernel.setns(fd, nstype), f"setns({describe_flags(nstype)})")


def idmapped_bind(source_fd: int, target: str, userns_fd: int, attrs: int) -> None:
    """Bind the tree at ``source_fd`` onto ``target``, ids mapped through a user
    namespace: a file owned by on-disk uid N shows as that namespace's uid N."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE
    tree = check(kernel.open_tree(source_fd, flags), f"open_tree for {target}")
    try:
        check(kernel.mount_setattr(tree, attrs | MOUNT_ATTR_IDMAP, userns_fd),
              f"idmapping the bind of {target}")
        check(kernel.move_mount(tree, target), f"move_mount to {target}")
    finally:
        kernel.close(tree)


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    result = kernel.prctl(option, arg2, arg3)
    return check(result, f"prctl({option})") if result < 0 else result


def join_new_session_keyring() -> None:
    """Replace the inherited session keyring with a new, empty, anonymous one."""
    check(kernel.keyctl(KEYCTL_JOIN_SESSION_KEYRING), "keyctl(JOIN_SESSION_KEYRING)")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the three capability sets of the calling thread (64-bit masks)."""
    check(kernel.capset(effective, permitted, inheritable), "capset")


_FLAG_NAMES = {
    CLONE_NEWUSER: "user",
    CLONE_NEWNS: "mount",
    CLONE_NEWPID: "pid",
    CLONE_NEWNET: "net",
    CLONE_NEWUTS: "uts",
    CLONE_NEWIPC: "ipc",
    CLONE_NEWCGROUP: "cgroup",
}


def describe_flags(flags: int) -> str:
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    return "|".join(names) or hex(flags)
