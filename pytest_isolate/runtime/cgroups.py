"""cgroups: one interface, a v1 and a v2 backend.

The controller (outside every container) owns the cgroups: it creates one group per
container host, writes the test's limits into it before each test, reads the usage
after, and removes it at the end. Containers are forked by a process that already
sits in the group (the host's "limits zygote"), so no test pays a migration: on v1
the first write to cgroup.procs after a quiet spell waits for an RCU grace period
(≈ 10 ms measured here).

Group directories are named ``pytest-isolate-<pid>-<n>``; a group whose pid is no
longer alive was left by a SIGKILLed run, and ``remove_stale`` deletes it.

v1 file -> v2 file (see the notes): memory.limit_in_bytes -> memory.max,
memory.memsw.limit_in_bytes -> memory.swap.max (minus memory), cpu.cfs_quota_us +
cpu.cfs_period_us -> cpu.max, pids.max -> pids.max, memory.max_usage_in_bytes ->
memory.peak, memory.oom_control (oom_kill) -> memory.events (oom_kill).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import time

from . import mountinfo

PREFIX = "pytest-isolate-"
CFS_PERIOD_US = 100_000


class CgroupError(Exception):
    """Limits cannot be enforced here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    memory_swap: int | None = None  # bytes of memory + swap, -1 for unlimited swap
    cpus: float | None = None
    pids: int | None = None


@dataclasses.dataclass
class Counters:
    memory_peak: int | None = None
    cpu_ns: int | None = None
    pids_peak: int | None = None
    oom_kills: int = 0
    pids_refused: int = 0
    throttled_periods: int = 0
    throttled_ns: int = 0


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


# How long a lower v1 memory limit may wait for the previous test's pages to go.
BUSY_DEADLINE = 10.0


def _write_memory_limit(path: str, value: object) -> None:
    """A v1 memory limit: the kernel refuses one below what the group still holds
    (EBUSY) until it can reclaim it. The previous test's processes are gone by now,
    but its mounts (a tmpfs /tmp, the overlay's upper layer) are released by the
    kernel's deferred work a moment later, and their pages stay charged till then."""
    deadline, delay = time.monotonic() + BUSY_DEADLINE, 0.002
    while True:
        try:
            _write(path, value)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                if exc.errno == errno.EBUSY:
                    held = _read(os.path.join(os.path.dirname(path), "memory.usage_in_bytes"))
                    raise OSError(errno.EBUSY, f"the memory limit {value} is below the {held} bytes its group "
                                  f"still holds after {BUSY_DEADLINE:g} s") from None
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _keyed(path: str) -> dict[str, int]:
    """Files of ``key value`` lines (memory.events, cpu.stat, memory.oom_control)."""
    result = {}
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                result[key] = int(value)
    except OSError:
        pass
    return result


def _own_cgroups() -> dict[str, str]:
    """controller name (or "" for v2) -> this process's path in that hierarchy."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


def _mounts() -> dict[str, str]:
    """controller name (or "" for the v2 hierarchy) -> mount point."""
    return mountinfo.cgroup_mounts(("memory", "pids", "cpu", "cpuacct"))


class V1Group:
    """One group in each v1 hierarchy we use (memory, pids, cpu, cpuacct)."""

    version = 1

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs  # controller -> directory

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs[controller], name)

    def apply(self, limits: Limits) -> None:
        memory = limits.memory if limits.memory is not None else -1
        swap = limits.memory_swap
        if swap is None:  # Docker: as much swap as memory
            swap = 2 * memory if memory > 0 else -1
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        has_swap_accounting = os.path.exists(memsw)
        # memsw must stay >= memory: widen it first, narrow it last.
        if has_swap_accounting:
            _write(memsw, -1)
        _write_memory_limit(self._file("memory", "memory.limit_in_bytes"), memory)
        if has_swap_accounting and swap != -1:
            _write_memory_limit(memsw, swap)
        quota = -1 if limits.cpus is None else max(int(limits.cpus * CFS_PERIOD_US), 1000)
        _write(self._file("cpu", "cpu.cfs_period_us"), CFS_PERIOD_US)
        _write(self._file("cpu", "cpu.cfs_quota_us"), quota)
        _write(self._file("pids", "pids.max"), "max" if limits.pids is None else limits.pids)

    def reset(self) -> None:
        """Zero the peak so that it measures the next test only."""
        _write(self._file("memory", "memory.max_usage_in_bytes"), 0)

    def read(self) -> Counters:
        cpu_stat = _keyed(self._file("cpu", "cpu.stat"))
        return Counters(
            memory_peak=int(_read(self._file("memory", "memory.max_usage_in_bytes"))),
            cpu_ns=int(_read(self._file("cpuacct", "cpuacct.usage"))),
            pids_peak=None,  # v1 keeps no peak
            oom_kills=_keyed(self._file("memory", "memory.oom_control")).get("oom_kill", 0),
            pids_refused=_keyed(self._file("pids", "pids.events")).get("max", 0),
            throttled_periods=cpu_stat.get("nr_throttled", 0),
            throttled_ns=cpu_stat.get("throttled_time", 0),
        )

    def attach(self, pid: int) -> None:
        for directory in sorted(set(self.dirs.values())):
            _write(os.path.join(directory, "cgroup.procs"), pid)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs.values():
            try:
                found.update(int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split())
            except OSError:
                pass
        return found

    def remove(self) -> None:
        _kill_and_remove(self.pids, sorted(set(self.dirs.values())))


class V2Group:
    version = 2

    def __init__(self, directory: str) -> None:
        self.dir = directory
        # Linux 6.12+ resets memory.peak for reads through the fd the reset was
        # written to: keep one open. Older kernels keep one peak for the group's life.
        self._peak_fd: int | None = None
        self._resettable = True
        for flags in (os.O_RDWR, os.O_RDONLY):  # before 6.12 the file is read-only (0444)
            try:
                self._peak_fd = os.open(self._file("memory.peak"), flags | os.O_CLOEXEC)
                break
            except OSError:
                self._resettable = False
        self._highest = 0
        self._highest_pids = 0

    def _file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def apply(self, limits: Limits) -> None:
        _write(self._file("memory.max"), "max" if limits.memory is None else limits.memory)
        if os.path.exists(self._file("memory.swap.max")):
            memory, swap = limits.memory, limits.memory_swap
            if memory is None or swap == -1:
                swap_max: object = "max"
            elif swap is None:
                swap_max = memory  # Docker: as much swap as memory
            else:
                swap_max = max(swap - memory, 0)
            _write(self._file("memory.swap.max"), swap_max)
        quota = "max" if limits.cpus is None else max(int(limits.cpus * CFS_PERIOD_US), 1000)
        _write(self._file("cpu.max"), f"{quota} {CFS_PERIOD_US}")
        _write(self._file("pids.max"), "max" if limits.pids is None else limits.pids)

    def reset(self) -> None:
        if self._peak_fd is not None and self._resettable:
            try:
                os.pwrite(self._peak_fd, b"reset\n", 0)
            except OSError:
                self._resettable = False

    def read(self) -> Counters:
        cpu_stat = _keyed(self._file("cpu.stat"))
        peak = None
        if self._peak_fd is not None:
            try:
                peak = int(os.pread(self._peak_fd, 64, 0))
            except (OSError, ValueError):
                pass
        if not self._resettable and peak is not None:
            # The group's lifetime peak: it tells this test's only if it rose now.
            peak, self._highest = (peak if peak > self._highest else None), max(peak, self._highest)
        try:  # no kernel resets pids.peak: it tells this test's only if it rose now
            lifetime = int(_read(self._file("pids.peak")))
            pids_peak = lifetime if lifetime > self._highest_pids else None
            self._highest_pids = max(lifetime, self._highest_pids)
        except (OSError, ValueError):
            pids_peak = None
        return Counters(
            memory_peak=peak,
            cpu_ns=cpu_stat.get("usage_usec", 0) * 1000,
            pids_peak=pids_peak,
            oom_kills=_keyed(self._file("memory.events")).get("oom_kill", 0),
            pids_refused=_keyed(self._file("pids.events")).get("max", 0),
            throttled_periods=cpu_stat.get("nr_throttled", 0),
            throttled_ns=cpu_stat.get("throttled_usec", 0) * 1000,
        )

    def attach(self, pid: int) -> None:
        _write(self._file("cgroup.procs"), pid)

    def pids(self) -> set[int]:
        try:
            return {int(p) for p in _read(self._file("cgroup.procs")).split()}
        except OSError:
            return set()

    def remove(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        if os.path.exists(self._file("cgroup.kill")):
            try:
                _write(self._file("cgroup.kill"), 1)
            except OSError:
                pass
        _kill_and_remove(self.pids, [self.dir])


def _kill_and_remove(pids, directories: list[str]) -> None:
    for _ in range(100):
        alive = pids()
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        removed = True
        for directory in directories:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                removed = False
        if removed:
            return
        time.sleep(0.01)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Backend:
    """Where this process may create cgroups, and how."""

    def __init__(self, version: int, parents: dict[str, str]) -> None:
        self.version = version
        self.parents = parents  # v1: controller -> parent dir; v2: {"": parent dir}
        self._count = 0

    def create(self) -> V1Group | V2Group:
        self._count += 1
        name = f"{PREFIX}{os.getpid()}-{self._count}"
        if self.version == 1:
            dirs = {c: os.path.join(p, name) for c, p in self.parents.items()}
            for directory in sorted(set(dirs.values())):  # cpu and cpuacct may share one
                os.mkdir(directory)
            return V1Group(dirs)
        directory = os.path.join(self.parents[""], name)
        os.mkdir(directory)
        return V2Group(directory)

    def remove_stale(self) -> list[str]:
        """Delete groups left by runs that died (their pid is gone)."""
        removed = []
        for parent in set(self.parents.values()):
            try:
                names = os.listdir(parent)
            except OSError:
                continue
            for name in names:
                pid = name[len(PREFIX):].split("-")[0] if name.startswith(PREFIX) else ""
                if not pid.isdigit() or _pid_alive(int(pid)):
                    continue
                path = os.path.join(parent, name)
                group = V2Group(path) if self.version == 2 else V1Group({"stale": path})
                try:
                    group.remove()
                    removed.append(path)
                except OSError:
                    pass
        return removed


V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


def detect() -> Backend:
    """The backend for this process, or CgroupError saying why there is none."""
    mounts, own = _mounts(), _own_cgroups()
    if all(c in mounts for c in V1_CONTROLLERS):
        parents = {c: mounts[c] + own.get(c, "/").rstrip("/") for c in V1_CONTROLLERS}
        if os.geteuid() != 0:
            raise CgroupError(
                "cgroup v1: unprivileged users cannot be given cgroups safely (v1 has no "
                "delegation), so limits cannot be enforced rootless here. Run pytest as root or on "
                "a cgroup-v2 host, or pass --isolate-limits=best-effort (rlimits instead)"
            )
        for parent in parents.values():
            if not os.access(parent, os.W_OK):
                raise CgroupError(f"cgroup v1: {parent} is not writable (a read-only cgroupfs?)")
        return Backend(1, parents)
    if "" in mounts and os.path.exists(os.path.join(mounts[""], "cgroup.controllers")):
        root = mounts[""]
        controllers = _read(os.path.join(root, "cgroup.controllers")).split()
        if not {"memory", "pids", "cpu"} <= set(controllers):
            raise CgroupError(f"cgroup v2 at {root} offers only {controllers or 'no controllers'}: "
                              "memory, pids and cpu are needed")
        return Backend(2, {"": _v2_parent(root, own.get("", "/"))})
    raise CgroupError("no cgroup hierarchy with the memory, pids and cpu controllers is mounted")


def _v2_parent(root: str, own_path: str) -> str:
    """A directory whose children may get memory, pids and cpu: for root a
    ``pytest-isolate`` group under the root; rootless the delegated subtree (the
    systemd user service) that holds this process."""
    if os.geteuid() == 0:
        parent = os.path.join(root, "pytest-isolate")
        os.makedirs(parent, exist_ok=True)
        _enable_controllers(root)
        _enable_controllers(parent)
        return parent
    path = os.path.join(root, own_path.lstrip("/"))
    while path.startswith(root) and path != root:
        if os.path.basename(path).startswith("user@") and os.access(path, os.W_OK):
            parent = os.path.join(path, "pytest-isolate.slice")
            try:
                os.makedirs(parent, exist_ok=True)
                _enable_controllers(parent)
            except OSError as exc:
                raise CgroupError(f"cgroup v2: cannot use the delegated subtree {path}: {exc}") from None
            return parent
        path = os.path.dirname(path)
    raise CgroupError(
        "cgroup v2: no delegated subtree (systemd's user@UID.service) holds this process, "
        "so limits cannot be enforced rootless. Run inside a user session of systemd, or "
        "pass --isolate-limits=best-effort (rlimits instead)"
    )


def _enable_controllers(directory: str) -> None:
    wanted = {"memory", "pids", "cpu"}
    enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
    missing = wanted - enabled
    if missing:
        _write(os.path.join(directory, "cgroup.subtree_control"), " ".join(f"+{c}" for c in sorted(missing)))
