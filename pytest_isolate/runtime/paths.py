"""Paths a test may have tampered with, resolved without following its symlinks out.

A test with a ``:rw`` mount can change the host files under it while other tests run:
replace a directory another test mounts with a symlink to ``/etc``, say. So:

* the controller pins every source of a bind once (``identity``), and every host
  opens it again with ``open_no_symlinks``, which refuses a symlink anywhere on the
  way, and checks that it is the same object (CVE-2021-30465 is this class);
* a mount's destination is resolved inside the test's root (``resolve_in_root``), as
  the test would see it after pivoting: an absolute symlink of the image (e.g.
  ``/etc/localtime``) leads to the test's own files, never to the stage's.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_LINKS = 40  # as the kernel's path walk (ELOOP)


def open_no_symlinks(path: str) -> int:
    """An O_PATH fd of the absolute ``path``, walked one component at a time; OSError
    (ELOOP) if any component is a symbolic link."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not path.startswith("/") or ".." in parts:
        raise OSError(errno.EINVAL, f"not an absolute path without '..': {path}")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            following = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = following
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, f"{path}: {part} is a symbolic link")
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def pin(path: str) -> tuple[int, int]:
    """(device, inode) of ``path``, reached without symlinks."""
    fd = open_no_symlinks(path)
    try:
        return identity(fd)
    finally:
        os.close(fd)


def open_pinned(path: str, pinned: tuple[int, int] | None) -> int:
    """``open_no_symlinks(path)``, and OSError if it is no longer the object pinned."""
    fd = open_no_symlinks(path)
    if pinned is not None and identity(fd) != tuple(pinned):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{path} was replaced after the run started")
    return fd


def resolve_in_root(root: str, path: str) -> str:
    """The absolute path (inside ``root``) that ``path`` leads to for a process whose
    root ``root`` is: symlinks are followed with an absolute target restarting at
    ``root``, and '..' stops there. Components that do not exist are kept as given."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(errno.ELOOP, f"too many symbolic links in {path}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return "/" + "/".join(resolved)
