"""Rootless containers with the user's subordinate uid and gid ranges.

A process may write only a one-line map for its own new user namespace: the user's
uid as container root, nothing else (every image file then belongs to container
root). Where the user has ranges in /etc/subuid and /etc/subgid (by name or uid, as
shadow reads them) and shadow's setuid ``newuidmap``/``newgidmap`` (Debian: uidmap)
are installed, they map container ids 1..N onto that range as well, so an image's
files keep their owners: image uid k is container uid k, as with podman.

Which of the two a user gets is decided once per process (``rootless_mapping``), by
entering the ranged namespace in a throwaway child (once per run: the processes it
starts inherit the verdict while their configuration is the same): the store unpacking layers and
the launcher entering a container must agree, since the layers' files belong to
the range's host ids. A missing program or range, or a failing newuidmap, falls
back to the one-line map; ``doctor`` says which and why.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from . import syscalls

NO_SUBUID_ENV = "PYTEST_ISOLATE_NO_SUBUID"  # =1: the one-line map even with a range (tests, debugging)
TRIED_ENV = "PYTEST_ISOLATE_SUBIDS_WORKED"  # this mapping was tried by a parent: launchers skip it
MAX_COUNT = 65536  # container ids 1..65536 beyond root, as root's own runs map 0..65535
_SEARCH = "/usr/bin:/bin:/usr/sbin:/sbin"


def subordinate_range(path: str, user: str = "root", uid: int = 0) -> tuple[int, int] | None:
    """The first ``user:start:count`` (or ``uid:start:count``) line of /etc/sub[ug]id."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    start, count = int(parts[1]), int(parts[2])
                    if start >= 0 and count > 0:
                        return start, count
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Mapping:
    """Container root is ``uid``/``gid``; with ``uids``/``gids`` (start, count),
    container ids 1..count are that range's; without, nothing else is mapped."""

    uid: int
    gid: int
    uids: tuple[int, int] | None = None
    gids: tuple[int, int] | None = None
    why_not: str = ""  # why the one-line map, in words

    @property
    def ranged(self) -> bool:
        return self.uids is not None and self.gids is not None

    @property
    def owner_key(self) -> str:
        """Names the store's layers unpacked with this mapping (store.Store)."""
        key = f"sub-{self.uids[0]}-{self.uids[1]}"
        return key if self.gids == self.uids else f"{key}-g{self.gids[0]}-{self.gids[1]}"

    def image_owner(self) -> Callable[[int, int], tuple[int, int]]:
        """Image (uid, gid) -> container (uid, gid): kept where mapped, else root."""
        uid_max, gid_max = self.uids[1], self.gids[1]
        return lambda uid, gid: (uid if 0 <= uid <= uid_max else 0, gid if 0 <= gid <= gid_max else 0)

    def describe(self) -> str:
        """Which ownership rootless containers get, for doctor."""
        if self.ranged:
            gids = "" if self.gids == self.uids else f", gids {self.gids[0]}+{self.gids[1]}"
            return f"image uids kept (subordinate range {self.uids[0]}+{self.uids[1]}{gids} through newuidmap)"
        if self.why_not.startswith(NO_SUBUID_ENV):
            fix = f"unset {NO_SUBUID_ENV} to keep image owners"
        elif self.why_not.startswith("newuidmap failed"):
            fix = "check the ranges in /etc/subuid and /etc/subgid (they must not overlap your own ids)"
        else:
            fix = "install uidmap and add a range to keep image owners"
        return f"every file belongs to container root ({self.why_not}): {fix}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SEARCH)


def _configured() -> Mapping:
    """The mapping /etc/sub[ug]id and the installed programs allow, untried."""
    uid, gid = os.geteuid(), os.getegid()
    user = _user_name(uid)
    if uid == 0:
        return Mapping(uid, gid, why_not="pytest runs as root")
    if os.environ.get(NO_SUBUID_ENV) == "1":
        return Mapping(uid, gid, why_not=f"{NO_SUBUID_ENV}=1 is set")
    uids = subordinate_range("/etc/subuid", user, uid)
    gids = subordinate_range("/etc/subgid", user, uid)
    if uids is None or gids is None:
        return Mapping(uid, gid, why_not=f"no /etc/{'subuid' if uids is None else 'subgid'} range for {user}")
    if not (_program("newuidmap") and _program("newgidmap")):
        return Mapping(uid, gid, why_not="newuidmap is not installed")
    return Mapping(uid, gid, (uids[0], min(uids[1], MAX_COUNT)), (gids[0], min(gids[1], MAX_COUNT)))


@functools.lru_cache(maxsize=None)
def rootless_mapping() -> Mapping:
    """The mapping rootless containers of this process use: ranged where
    configured and newuidmap works (tried in a throwaway child), else the one line."""
    mapping = _configured()
    if not mapping.ranged:
        return mapping
    signature = f"{mapping.uid}:{mapping.gid}:{mapping.owner_key}"
    if os.environ.get(TRIED_ENV) == signature:  # a parent tried this very mapping
        return mapping
    failure = _try_in_child(lambda: enter_ranged(mapping))
    if failure:
        return Mapping(mapping.uid, mapping.gid, why_not=f"newuidmap failed: {failure}")
    os.environ[TRIED_ENV] = signature  # inherited by the launchers this process starts
    return mapping


def enter_ranged(mapping: Mapping) -> None:
    """Move the calling, single-threaded process into a new user namespace mapped
    with the subordinate ranges, as its root without supplementary groups."""
    def write_maps(pid: int) -> None:
        # newgidmap leaves setgroups allowed (the map holds a subgid range): the
        # supplementary groups are dropped below, as podman does.
        for program, own, (start, count) in (("newgidmap", mapping.gid, mapping.gids),
                                            ("newuidmap", mapping.uid, mapping.uids)):
            done = subprocess.run([_program(program) or program, str(pid), "0", str(own), "1", "1", str(start),
                                   str(count)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=60)
            if done.returncode != 0:
                said = " ".join(done.stderr.split())[:300] or f"exit status {done.returncode}"
                raise OSError(1, f"{program} {start}+{count}: {said}")

    enter_mapped_by_helper(write_maps)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def enter_nested_ranged(mapping: Mapping) -> None:
    """From the root of a ranged namespace: a child user namespace mapping all of
    its ids onto themselves (a process may not write such a map for itself). Two
    lines, as the parent's: the kernel needs each line within one line of the parent."""
    def write_maps(pid: int) -> None:
        for name, (_, count) in (("uid_map", mapping.uids), ("gid_map", mapping.gids)):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
            try:
                os.write(fd, f"0 0 1\n1 1 {count}\n".encode())
            finally:
                os.close(fd)

    enter_mapped_by_helper(write_maps)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def enter_mapped_by_helper(write_maps: Callable[[int], None]) -> None:
    """unshare(CLONE_NEWUSER) in the calling, single-threaded process while a forked
    helper, still outside, writes its maps with ``write_maps(pid)``."""
    parent = os.getpid()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        answer = b"not asked"
        try:
            os.close(go_w)
            os.close(done_r)
            if os.read(go_r, 1) == b"g":  # EOF: the parent could not unshare
                write_maps(parent)
                answer = b"ok"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = f"{getattr(exc, 'errno', 0) or 0}:{getattr(exc, 'strerror', None) or exc}".encode()[:1000]
        finally:
            try:
                os.write(done_w, answer)
            finally:
                os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        os.write(go_w, b"g")
        answer = os.read(done_r, 4096).decode(errors="replace")
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(helper, 0)
    if answer != "ok":
        err, _, message = answer.partition(":")
        raise OSError(int(err) if err.isdigit() else 1, message or "the user namespace could not be mapped")


def _try_in_child(step: Callable[[], None]) -> str | None:
    """Run ``step`` in a forked child: None if it returned, else what went wrong."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            step()
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - reported, never returns
            os.write(write_end, str(getattr(exc, "strerror", None) or exc).encode()[:1000])
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        said = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return None if os.waitstatus_to_exitcode(status) == 0 else (said or f"status {status:#x}")
