"""Huge pages for the collected session, before the zygote is forked from it.

A fork copies one page-table entry for every 4 KiB page the forking process maps,
and the child's exit drops them all again. For a container host that holds a test
module with heavy imports (≈ 150 MB) that is ≈ 4 ms per test, paid by every test
of the session. ``collapse`` turns the host's mostly-resident anonymous memory into
2 MiB pages (madvise(MADV_COLLAPSE), Linux 6.1): one entry per 2 MiB, so forking
the zygote's tests and ending them costs little more than for a small session. A
test that writes into such a page splits only its own mapping of it and copies
4 KiB, as it would have anyway. The memory itself does not grow: only mappings at
least 90% resident are collapsed.

Where the kernel cannot (older than 6.1, transparent huge pages set to "never"),
nothing changes.
"""

from __future__ import annotations

import ctypes
import errno
import time

from .syscalls import libc

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
MOSTLY_RESIDENT = 0.9

libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _anonymous_mappings() -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of this process's private writable anonymous mappings."""
    found: list[list[int]] = []
    current: list[int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
                current = None
                if fields[1] == "rw-p" and anonymous:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = [start, end, 0]
                    found.append(current)
            elif fields[0] == "Rss:" and current is not None:
                current[2] = int(fields[1]) * 1024
    return [(start, end, resident) for start, end, resident in found]


def collapse(budget: float = 1.0) -> int:
    """Collapse what is worth it into huge pages, for at most ``budget`` seconds;
    returns the bytes collapsed."""
    deadline = time.monotonic() + budget
    collapsed = 0
    try:
        mappings = _anonymous_mappings()
    except OSError:
        return 0
    for start, end, resident in mappings:
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last <= first or resident < MOSTLY_RESIDENT * (end - start):
            continue
        if libc.madvise(first, last - first, MADV_COLLAPSE) == 0:
            collapsed += last - first
        elif ctypes.get_errno() == errno.EINVAL:  # this kernel cannot
            break
        if time.monotonic() > deadline:
            break
    return collapsed
