"""Running one timed command: wall time, exit status, output, and (as root, on cgroup v1)
the peak memory of the whole process tree from its own memory cgroup."""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import time

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_PARENT = os.path.join(CGROUP_V1_MEMORY, "pytest-isolate-bench")


@dataclasses.dataclass
class Result:
    wall: float | None  # seconds; None if the command could not run
    returncode: int | None
    output: str  # stdout and stderr, interleaved
    peak_memory: int | None = None  # bytes, from the cgroup
    error: str | None = None  # why it failed, in a few words


def cgroup_version() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    if os.path.isdir(CGROUP_V1_MEMORY):
        hybrid = os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers")
        return "v1 (hybrid: cgroup2 also mounted)" if hybrid else "v1"
    return "none found"


def memory_cgroups_usable() -> tuple[bool, str]:
    """Whether runs can be measured in their own v1 memory cgroup, and if not why."""
    if os.geteuid() != 0:
        return False, "not root"
    if not os.path.isdir(CGROUP_V1_MEMORY):
        return False, "no cgroup v1 memory controller at " + CGROUP_V1_MEMORY
    try:
        os.makedirs(CGROUP_PARENT, exist_ok=True)
    except OSError as exc:
        return False, f"cannot create {CGROUP_PARENT}: {exc.strerror}"
    return True, ""


def _remove_tree(path: str) -> None:
    """Kill what is left in a cgroup and remove it, children first."""
    for _ in range(50):
        for root, dirs, _files in os.walk(path, topdown=False):
            try:
                with open(os.path.join(root, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except OSError:
                            pass
            except OSError:
                pass
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def remove_leftovers() -> None:
    """Remove the groups of an interrupted earlier run (their processes are killed)."""
    if not os.path.isdir(CGROUP_PARENT):
        return
    for name in os.listdir(CGROUP_PARENT):
        path = os.path.join(CGROUP_PARENT, name)
        if os.path.isdir(path):
            _remove_tree(path)


_counter = 0


def first_problem(text: str) -> str:
    """The line that best says why a run failed: pytest's first ERROR/FAILED summary line,
    else the last line of output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("ERROR ", "FAILED ", "first failure: ")):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def run(cmd: list[str], cwd: str, env: dict[str, str], timeout: float,
        measure_memory: bool) -> Result:
    """Run ``cmd`` in its own session (so that a timeout kills all of it).

    With ``measure_memory`` the child joins a fresh memory cgroup before exec; the time
    that join takes (on v1 up to ≈ 10 ms, an RCU grace period) is subtracted from the
    wall time, since it is the benchmark's cost, not the runner's.
    """
    global _counter
    group = None
    if measure_memory:
        _counter += 1
        group = os.path.join(CGROUP_PARENT, f"run-{os.getpid()}-{_counter}")
        os.mkdir(group)
    report_r, report_w = os.pipe()

    def join_group() -> None:  # runs in the child, between fork and exec
        start = time.perf_counter()
        if group:
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        os.write(report_w, struct.pack("d", time.perf_counter() - start))

    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=join_group)
    except OSError as exc:
        os.close(report_r)
        os.close(report_w)
        if group:
            _remove_tree(group)
        return Result(None, None, "", error=f"cannot start {cmd[0]}: {exc.strerror}")
    os.close(report_w)
    error = None
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        output, _ = proc.communicate()
        error = f"timed out after {timeout:.0f} s"
    except BaseException:  # ^C: take the run down with us (it has its own session)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        os.close(report_r)
        if group:
            _remove_tree(group)
        raise
    wall = time.perf_counter() - start
    joined = os.read(report_r, 8)
    os.close(report_r)
    if len(joined) == 8:
        wall -= struct.unpack("d", joined)[0]
    peak = None
    if group:
        try:
            with open(os.path.join(group, "memory.max_usage_in_bytes")) as f:
                peak = int(f.read())
        except (OSError, ValueError):
            pass
        _remove_tree(group)
    text = output.decode(errors="replace")
    if error is None and proc.returncode != 0:
        error = f"exit status {proc.returncode}: {first_problem(text)}"
    return Result(None if error else wall, proc.returncode, text, peak, error)
