"""/proc/self/mountinfo, parsed in one place (proc(5)).

A line reads::

    36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue

mount id, parent id, major:minor, root, mount point, mount options, optional fields
(zero or more, ended by "-"), filesystem type, source, super options. Paths escape
space, tab, newline and backslash as octal (``\\040``).

Also here: a mount's flags as statvfs(3) reports them, which mountinfo spells as text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable

from .syscalls import MS_NODEV, MS_NOEXEC, MS_NOSUID

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]  # e.g. ("shared:1", "master:2")
    fs_type: str
    source: str
    super_options: tuple[str, ...]


def parse_line(line: str) -> Mount:
    left, _, right = line.rstrip("\n").partition(" - ")
    mount_id, parent_id, _device, root, point, options, *optional = left.split(" ")
    fs_type, source, super_options = right.split(" ", 2)
    return Mount(int(mount_id), int(parent_id), _unescape(root), _unescape(point),
                 tuple(options.split(",")), tuple(optional), fs_type, _unescape(source),
                 tuple(super_options.split(",")))


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path) as f:
        return [parse_line(line) for line in f]


def below(directory: str, mounts: Iterable[Mount] | None = None) -> list[str]:
    """Mount points strictly inside ``directory``, in mount order."""
    prefix = directory.rstrip("/") + "/"
    return [m.mount_point for m in (read() if mounts is None else mounts)
            if m.mount_point.startswith(prefix) and m.mount_point != prefix]


def fs_type_of(mount_id: int, mounts: Iterable[Mount] | None = None) -> str | None:
    return next((m.fs_type for m in (read() if mounts is None else mounts)
                 if m.mount_id == mount_id), None)


def cgroup_mounts(controllers: Iterable[str], mounts: Iterable[Mount] | None = None) -> dict[str, str]:
    """The first mount point of each v1 controller in ``controllers`` and, under "",
    of the cgroup2 hierarchy; absent ones are left out."""
    wanted = set(controllers)
    found: dict[str, str] = {}
    for m in read() if mounts is None else mounts:
        if m.fs_type == "cgroup2":
            found.setdefault("", m.mount_point)
        elif m.fs_type == "cgroup":
            for controller in wanted.intersection(m.super_options):
                found.setdefault(controller, m.mount_point)
    return found


_STATVFS_TO_MS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: 1024,
    os.ST_NODIRATIME: 2048,
    os.ST_RELATIME: 1 << 21,
}


def locked_flags(path: str) -> int:
    """Flags of the mount at ``path`` that a remount inside a user namespace must keep."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_TO_MS.items() if f_flag & st)
