"""The host's side of a running test: wait for its process to end, enforce its
timeout, pass on what it wrote -- trusting nothing it wrote.

Only the host's own observations end a test: the exit of the test's process (a
pidfd; the zygote, its parent, reaps it and tells the exit status) or the host's
deadline, counted from the container's start. The events file is never decoded
here: its bytes go to the controller, which checks them (boundary.py). They are
read within a cap: a test that makes its events file larger than the cap (a sparse
``ftruncate`` costs it nothing) has its container killed, and the rest is never read.
"""

from __future__ import annotations

import os
import select
import stat
import time
from typing import Callable

# A crash log or captured output is read up to here; the rest is left out (with a marker).
TRUNCATED = "\n[pytest-isolate: {} more bytes left out ({} is capped at {} bytes)]\n"


class Supervisor:
    """Waits for one test process. ``kill`` ends its whole container; ``relay(bytes)``
    gets what the test wrote so far, every RELAY_AFTER seconds of a long test, so that
    a lost host still leaves the controller knowing how far the test got."""

    RELAY_AFTER = 0.25
    RELAY_CHUNK = 1 << 20

    def __init__(self, test_pidfd: int, events_fd: int, deadline: float | None, kill: Callable[[], None],
                 relay: Callable[[bytes], None], cap: int) -> None:
        self.test_pidfd = test_pidfd
        self.events_fd = events_fd
        self.deadline = deadline  # on CLOCK_MONOTONIC, or None
        self.kill = kill
        self.relay = relay
        self.cap = cap
        self.timed_out = False
        self.tampered: str | None = None  # why the stream was cut off
        self._offset = 0

    def wait(self) -> bytes:
        """Return once the test's process has ended: what it wrote and was not
        relayed yet."""
        next_relay = time.monotonic() + self.RELAY_AFTER
        while True:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.timed_out = True
                self.deadline = None
                self.kill()  # the process ends with its container: the pidfd says when
            if now >= next_relay:
                chunk = self._read_new(final=False)
                if chunk:
                    self.relay(chunk)
                next_relay = now + self.RELAY_AFTER
            wait = next_relay - now if self.deadline is None else min(self.deadline, next_relay) - now
            ready, _, _ = select.select([self.test_pidfd], [], [], max(wait, 0))
            if ready:
                return self._read_new(final=True)

    def _read_new(self, final: bool) -> bytes:
        if self.tampered is not None:
            return b""
        size = os.fstat(self.events_fd).st_size
        if size > self.cap:
            self.tampered = f"its events file grew to {size} bytes, over the cap of {self.cap}"
            self.kill()
            return b""
        if size <= self._offset:
            return b""
        if not final:  # a relay: a little at a time (the test is still writing)
            size = min(size, self._offset + self.RELAY_CHUNK)
        elif _written(self.events_fd, size) < size:  # events are written, never ftruncate()d
            self.tampered = f"its events file has a hole (a size of {size} bytes set, not written)"
            self.kill()
            return b""
        chunk = os.pread(self.events_fd, size - self._offset, self._offset)
        self._offset += len(chunk)
        return chunk


def read_capped(fd: int | None, cap: int, what: str) -> str:
    """The text of the file at ``fd`` (from its start), at most ``cap`` bytes of it;
    "" unless it is a regular file. A test can give its files any size, sparse or
    not: nothing past the cap is read, whatever the size says."""
    if fd is None or fd < 0:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size <= 0:
            return ""
        written = _written(fd, info.st_size)
        data = os.pread(fd, min(written, cap), 0)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if info.st_size > len(data):
        text += TRUNCATED.format(info.st_size - len(data), what, cap)
    return text


def _written(fd: int, size: int) -> int:
    """Where the first hole of a file starts: a size set with ftruncate() reads as
    NUL bytes that nobody wrote, and those are not output. (This moves the offset
    the file shares with the test's fds: only once the test has ended.)"""
    try:
        return min(os.lseek(fd, 0, os.SEEK_HOLE), size)
    except OSError:  # a file system without SEEK_HOLE: all of it counts
        return size
