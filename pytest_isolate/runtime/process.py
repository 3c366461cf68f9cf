"""Process hygiene: parent-death signals, sessions, inherited file descriptors."""

from __future__ import annotations

import ctypes
import errno
import os
import signal

from . import syscalls

PR_SET_NAME = 15


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL this process when its parent dies, so no container outlives its owner.

    The check after prctl closes the race where the parent died before the call.
    """
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(137)


def set_name(name: str) -> None:
    """Name the calling process in ps, top and perf (at most 15 bytes are kept)."""
    try:
        buffer = ctypes.create_string_buffer(name.encode()[:15])
        syscalls.prctl(PR_SET_NAME, ctypes.addressof(buffer))
    except OSError:
        pass


def name() -> str:
    try:
        with open("/proc/self/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


def status_field(name: str) -> list[str]:
    """The words of the ``name:`` line of /proc/self/status ([] if there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split()[1:]
    except OSError:
        pass
    return []


def outer_pid() -> int | None:
    """The caller's pid as /proc's pid namespace numbers it: the controller's, since
    the container host keeps the host's /proc (the first field of NSpid)."""
    nspid = status_field("NSpid")
    return int(nspid[0]) if nspid else None


def describe_error(exc: BaseException, symbolic: bool = False) -> str:
    """An error in a few words: "strerror (errno N)" for an OSError, else "Type: message".

    ``symbolic`` (the doctor's report): "strerror (filename) [ENAME]" instead."""
    if isinstance(exc, OSError) and exc.strerror:
        if symbolic:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{exc.strerror}{where} [{errno.errorcode.get(exc.errno, exc.errno)}]"
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


def open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc yet: fall back to the soft limit
        return list(range(os.sysconf("SC_OPEN_MAX")))


def close_fds_except(keep: set[int]) -> None:
    for fd in open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def new_session() -> None:
    """Leave the caller's session: no controlling terminal, so TIOCSTI cannot reach it."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
