"""Resource limits and usage, on the controller side.

Before a limited test the controller writes its limits into its container host's
cgroup (created on first use; the host's zygote is moved into it once) and resets
the counters; after the test it reads them back. Tests without limits run outside
any cgroup and their usage comes from wait4(2). Where a cgroup cannot be had, a
strict run fails the test with the reason; ``limits="best-effort"`` falls back to
rlimits and says what was enforced, and how.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal

from .options import Settings
from .runtime import cgroups


def human(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    return str(size)


@dataclasses.dataclass
class Usage:
    """What one isolated test used, and what its limits did."""

    peak_memory: int | None
    cpu_seconds: float | None
    peak_pids: int | None
    source: str  # "cgroup v1", "cgroup v2" or "rusage"
    oom_kills: int = 0
    pids_refused: int = 0
    throttled_periods: int = 0
    throttled_seconds: float = 0.0
    enforcement: str = ""  # how the limits were enforced, when some were asked for

    def properties(self) -> list[tuple[str, object]]:
        props = [("isolate_peak_memory_bytes", self.peak_memory),
                 ("isolate_cpu_seconds", None if self.cpu_seconds is None else round(self.cpu_seconds, 4)),
                 ("isolate_peak_pids", self.peak_pids)]
        props = [(k, v) for k, v in props if v is not None]
        if self.oom_kills:
            props.append(("isolate_oom_kills", self.oom_kills))
        if self.pids_refused:
            props.append(("isolate_pids_limit_hits", self.pids_refused))
        if self.throttled_periods:
            props.append(("isolate_cpu_throttled_seconds", round(self.throttled_seconds, 4)))
        return props

    def text(self) -> str:
        parts = [f"peak memory {human(self.peak_memory)}",
                 f"CPU time {self.cpu_seconds:.3f} s" if self.cpu_seconds is not None else "CPU time ?"]
        if self.peak_pids is not None:
            parts.append(f"peak pids {self.peak_pids}")
        line = ", ".join(parts) + f" (measured by {self.source})"
        if self.throttled_periods:
            line += (f"\nCPU throttled in {self.throttled_periods} periods, "
                     f"{self.throttled_seconds:.3f} s in all, by the cpus limit")
        if self.pids_refused:
            line += f"\nthe pids limit refused {self.pids_refused} fork/clone calls"
        if self.enforcement:
            line += f"\nlimits enforced by {self.enforcement}"
        return line


@dataclasses.dataclass
class Plan:
    """How one test's limits are enforced."""

    group: object | None = None  # a cgroup, when one enforces them
    rlimits: tuple = ()
    enforcement: str = ""
    error: str | None = None  # limits="strict", and they cannot be enforced
    before: cgroups.Counters | None = None
    limits: cgroups.Limits | None = None


class Limiter:
    def __init__(self) -> None:
        self._backend: cgroups.Backend | None = None
        self._backend_error: str | None = None
        # container host -> its group (the host object itself is the key: a new host
        # that replaced a lost one must never inherit a group its zygote is not in)
        self._groups: dict[object, object] = {}
        self.refused = 0  # limited tests refused (strict, no cgroups)

    def backend(self) -> cgroups.Backend | None:
        if self._backend is None and self._backend_error is None:
            try:
                self._backend = cgroups.detect()
                self._backend.remove_stale()  # what SIGKILLed runs left
            except (cgroups.CgroupError, OSError) as exc:
                self._backend_error = str(exc)
        return self._backend

    def plan(self, settings: Settings, host) -> Plan:
        rlimits = tuple(settings.ulimits)
        if not settings.has_cgroup_limits():
            return Plan(rlimits=rlimits)
        limits = cgroups.Limits(settings.memory, settings.memory_swap, settings.cpus, settings.pids)
        backend = self.backend()
        if backend is not None:
            group = self._groups.get(host)
            if group is None:
                group = backend.create()
                try:
                    group.attach(host.zygote_pid())
                except BaseException:
                    group.remove()
                    raise
                self._groups[host] = group
            group.apply(limits)
            group.reset()
            return Plan(group=group, rlimits=rlimits, limits=limits, before=group.read(),
                        enforcement=f"cgroup v{backend.version}")
        if settings.limits == "strict":
            self.refused += 1
            hint = "" if "best-effort" in self._backend_error else \
                " (--isolate-limits=best-effort runs it with rlimits instead)"
            return Plan(error=f"cannot enforce the limits of this test: {self._backend_error}{hint}")
        return self._best_effort(settings, rlimits)

    def _best_effort(self, settings: Settings, rlimits: tuple) -> Plan:
        extra, said = [], []
        if settings.memory is not None:
            extra.append(("data", settings.memory, settings.memory))
            said.append(f"memory {human(settings.memory)} as RLIMIT_DATA (heap and private "
                        "mappings of each process, not the container's total)")
        if settings.pids is not None:
            extra.append(("nproc", settings.pids, settings.pids))
            said.append(f"pids {settings.pids} as RLIMIT_NPROC (processes of the container's user)")
        if settings.cpus is not None:
            said.append(f"cpus {settings.cpus:g} NOT enforced (a CPU quota needs a cgroup)")
        if settings.memory_swap is not None:
            said.append("memory_swap NOT enforced (needs a cgroup)")
        names = {name for name, _, _ in rlimits}
        extra = [limit for limit in extra if limit[0] not in names]  # the user's own ulimits win
        # The reason without its advice: best-effort is what the user chose already.
        reason = re.sub(r"(,? or|\.)? ?pass --isolate-limits=best-effort \(rlimits instead\)", "",
                        self._backend_error or "").rstrip(" ,.")
        return Plan(rlimits=rlimits + tuple(extra),
                    enforcement=f"best-effort, no cgroup ({reason}): " + "; ".join(said))

    def summary(self) -> list[str]:
        """One line for the run when limited tests were refused (each test says why, too)."""
        if not self.refused:
            return []
        tests = f"{self.refused} test{'' if self.refused == 1 else 's'}"
        return [f"limits: {tests} refused, their limits cannot be enforced here: {self._backend_error}"]

    def usage(self, plan: Plan, done: dict) -> Usage:
        rusage = done.get("rusage") or {}
        if plan.group is None:
            return Usage(rusage.get("max_rss"), rusage.get("cpu_seconds"), None, "rusage",
                         enforcement=plan.enforcement)
        after, before = plan.group.read(), plan.before
        cpu = None if after.cpu_ns is None else (after.cpu_ns - (before.cpu_ns or 0)) / 1e9
        return Usage(
            peak_memory=after.memory_peak, cpu_seconds=cpu, peak_pids=after.pids_peak,
            source=f"cgroup v{plan.group.version}", oom_kills=after.oom_kills - before.oom_kills,
            pids_refused=after.pids_refused - before.pids_refused,
            throttled_periods=after.throttled_periods - before.throttled_periods,
            throttled_seconds=(after.throttled_ns - before.throttled_ns) / 1e9,
            enforcement=plan.enforcement,
        )

    def killed_by_oom(self, plan: Plan, usage: Usage, done: dict) -> str | None:
        status = done.get("status")
        if plan.limits is None or not usage.oom_kills or status is None or done.get("timed_out"):
            return None
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return None
        return (f"Killed by the OOM killer: memory limit {human(plan.limits.memory)} reached "
                f"(peak {human(usage.peak_memory)}).")

    def close(self) -> None:
        for group in self._groups.values():
            try:
                group.remove()
            except OSError:
                pass
        self._groups.clear()


def limit_hit(usages: list) -> bool:
    """Whether some isolated test hit a limit (OOM kill, pids refused, CPU throttled)."""
    return any(usage[4] for usage in usages)


def top_consumers(usages: list, count: int) -> list[str]:
    """``usages``: (nodeid, peak memory, CPU seconds, source, hit) of each isolated
    test. The ``count`` isolated tests that used the most memory and CPU, ranked among
    the tests measured the same way: a cgroup counts the pages a test touched,
    getrusage a process's resident set, pages shared with the container host
    included."""
    if count <= 0 or not usages:
        return []
    lines = []
    for source in sorted({usage[3] for usage in usages}, key=lambda s: (s == "rusage", s)):
        same = [usage for usage in usages if usage[3] == source]
        lines.append(f"measured by {source} (tests with limits):" if source != "rusage" else
                     "measured by getrusage (tests without limits; shared pages count):")
        by_memory = sorted(same, key=lambda u: -(u[1] or 0))[:count]
        lines += [f"{human(u[1]):>10} peak memory  {u[0]}" for u in by_memory]
        by_cpu = sorted(same, key=lambda u: -(u[2] or 0))[:count]
        lines += [f"{u[2] or 0:>8.3f} s CPU time     {u[0]}" for u in by_cpu]
    return lines
