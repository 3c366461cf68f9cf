"""Resource limits (memory, memory_swap, cpus, pids, ulimits) and usage reports.

The checks run a real inner pytest whose limited tests run in real cgroups: the
OOM killer, the pids controller and the CFS quota of this kernel, no mocks (one test
of Backend.create() for a layout this machine lacks uses plain directories).

The tests adapt to where they run. ``CGROUP_VERSION`` is what
``pytest_isolate.runtime.cgroups.detect()`` finds for this user: 1 (this machine as
root), 2 (the cgroup-v2 guest, as root or as a user with a delegated subtree) or None
(the rootless lane on cgroup v1). Where cgroups are available the limits must be
enforced; where they are not, strict mode must refuse the test with the reason and
best-effort mode must fall back to rlimits and say so. The checks of enforcement are
never skipped where cgroups are available.

Tests that need cgroups to mean anything are named ``test_limit_*``: select them with
``-k test_limit_`` (plain ``-k limit`` matches this whole module by its name).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from functools import cache

import pytest

from conftest import IS_ROOT, find_processes, memory_hog, read_junit, reports_by_test, sections, wait_for
from pytest_isolate.runtime import cgroups

MiB = 1 << 20
GRACE = 60.0  # how long a leftover may take to go: a safety net, not a bound (one stays for ever)


def _backend() -> tuple[int | None, str]:
    try:
        return cgroups.detect().version, ""
    except (cgroups.CgroupError, OSError) as exc:
        return None, str(exc)


CGROUP_VERSION, NO_CGROUP_REASON = _backend()
HAS_CGROUPS = CGROUP_VERSION is not None
KERNEL = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
# cgroup v2 before Linux 6.12: memory.peak is read-only and spans the group's life.
V2_OLD_PEAK = CGROUP_VERSION == 2 and KERNEL < (6, 12)
ENFORCED_BY = f"limits enforced by cgroup v{CGROUP_VERSION}"
MEASURED_BY = f"(measured by cgroup v{CGROUP_VERSION})"
# Where cgroups are missing, limited tests need best-effort to run at all.
LIMITS_MODE = "--isolate-limits=strict" if HAS_CGROUPS else "--isolate-limits=best-effort"

HELPERS = """
import errno, os, resource, shutil, signal, sys, time
import pytest

MiB = 1 << 20
SLEEP = shutil.which("sleep")

def touch(mib):
    \"\"\"Allocate ``mib`` MiB and write to every page, so that all of it is resident.\"\"\"
    print("touching", mib, "MiB")
    block = bytearray(mib * MiB)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return block

def spawn_until_refused(mark, most=200):
    \"\"\"Fork children that exec `sleep` (argv[0] == mark) until fork fails;
    returns (children started, errno of the failed fork).\"\"\"
    started = 0
    while started < most:
        try:
            pid = os.fork()
        except OSError as exc:
            return started, exc.errno
        if pid == 0:
            try:
                os.execv(SLEEP, [mark, "1000"])
            finally:
                os._exit(127)
        started += 1
    return started, None
"""


# -- helpers ---------------------------------------------------------------------------

@cache
def slowdown() -> float:
    """How much slower than this CI machine Python runs here (1 on it; about 10 in the
    cgroup-v2 guest under TCG), from the time ``import pytest`` takes (0.2 s here).
    Wall-clock bounds that include pytest start-ups scale with it."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import pytest"], check=True)
    return max(1.0, (time.monotonic() - started) / 0.25)


def cgroup_mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] in ("cgroup", "cgroup2"):
                points.append(left.split()[4])
    return points


def groups_of(pid: int) -> list[str]:
    """Every cgroup directory named pytest-isolate-<pid>-* in any mounted hierarchy."""
    prefix = f"{cgroups.PREFIX}{pid}-"
    found = []
    for point in cgroup_mount_points():
        for directory, subdirs, _ in os.walk(point):
            found += [os.path.join(directory, d) for d in subdirs if d.startswith(prefix)]
    return sorted(set(found))


# The inner run records its controller's pid and the groups that exist while it runs
# (a plain test: it runs in the controller itself).
RECORD_GROUPS = '''
def test_zz_record_groups():
    import json, os
    prefix = "pytest-isolate-%d-" % os.getpid()
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] in ("cgroup", "cgroup2"):
                points.append(left.split()[4])
    groups = sorted({os.path.join(d, s) for p in points for d, subs, _ in os.walk(p)
                     for s in subs if s.startswith(prefix)})
    with open("groups.json", "w") as f:
        json.dump({"pid": os.getpid(), "groups": groups}, f)
'''


def top_consumers(result: pytest.RunResult) -> list[str] | None:
    """The lines of the "pytest-isolate: top consumers" section, None without it."""
    found = [lines[1:] for title, lines in sections(result) if title == "pytest-isolate: top consumers"]
    return found[0] if found else None


def strict_error(text: str) -> None:
    assert "cannot enforce the limits of this test" in text, text


def run_without_cgroups(pytester: pytest.Pytester, *args: str, timeout: float = 120) -> pytest.RunResult:
    """An inner pytest that finds no usable cgroups: natively where there are none
    (rootless on v1), else as root in a mount namespace without the cgroup mounts."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               f"--basetemp={pytester.path / ('basetemp-' + uuid.uuid4().hex[:8])}", *args]
    if not HAS_CGROUPS:
        return pytester.run(*command, timeout=timeout)
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("cgroups are available here and only root can hide them (unshare --mount)")
    umounts = "".join(f"umount -l {shlex.quote(p)} && " for p in reversed(cgroup_mount_points()))
    return pytester.run("unshare", "--mount", "--propagation", "private", "sh", "-c",
                        umounts + "exec " + shlex.join(command), timeout=timeout)


# -- memory ----------------------------------------------------------------------------

MEMORY = HELPERS + """
@pytest.mark.isolated(memory="64m")
def test_1_under_the_limit():
    touch(16)
""" + memory_hog("test_2_hog") + """
@pytest.mark.isolated
def test_3_isolated_after():
    touch(200)

def test_4_plain_after():
    touch(200)

@pytest.mark.isolated(memory="64m")
def test_5_sigkill():
    print("printed before SIGKILL")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_limit_memory_oom_kills_the_hog_only(pytester, run) -> None:
    pytester.makepyfile(test_memory=MEMORY)
    result = run("-rA", "--junitxml=out.xml")
    by_test = reports_by_test(result)
    props = read_junit(pytester.path / "out.xml").properties()
    if not HAS_CGROUPS:  # strict (the default): the limited tests are refused, the others run
        result.assert_outcomes(passed=2, errors=3)
        for name in ("test_1_under_the_limit", "test_2_hog", "test_5_sigkill"):
            strict_error(by_test[f"setup {name}"])
            assert NO_CGROUP_REASON in by_test[f"setup {name}"]
        assert props["test_3_isolated_after"]["isolate_peak_memory_bytes"]
        # ... and the run says it once, in its summary
        assert f"limits: 3 tests refused, their limits cannot be enforced here: {NO_CGROUP_REASON}" in \
            result.stdout.str()
        return
    result.assert_outcomes(passed=3, failed=2)
    hog = by_test["test_2_hog"].splitlines()
    assert hog[0] == "Killed by the OOM killer: memory limit 64 MiB reached (peak 64 MiB).", hog
    assert "printed before the hog" in hog[hog.index(next(h for h in hog if "Captured stdout call" in h)) + 1]
    assert ENFORCED_BY in by_test["test_2_hog"] and MEASURED_BY in by_test["test_2_hog"]
    assert 60 * MiB <= int(props["test_2_hog"]["isolate_peak_memory_bytes"]) <= 64 * MiB
    assert props["test_2_hog"]["isolate_oom_kills"] == "1"
    # Under the limit: passes, and its own peak (not the hog's, not the host's) is measured.
    small = props["test_1_under_the_limit"]
    assert 16 * MiB < int(small["isolate_peak_memory_bytes"]) < 64 * MiB
    assert "isolate_oom_kills" not in small
    assert MEASURED_BY in by_test["test_1_under_the_limit"]
    # The host and the run survived: the next tests, without limits, allocate 200 MiB.
    assert int(props["test_3_isolated_after"]["isolate_peak_memory_bytes"]) > 200 * MiB
    assert "isolate_oom_kills" not in props["test_3_isolated_after"]
    # A limit was hit: the top consumers are shown without -v, the hog first among
    # the tests its cgroup measured.
    lines = top_consumers(result)
    assert lines is not None and lines[0].startswith("measured by cgroup v"), result.stdout.str()
    assert lines[1].endswith("test_memory.py::test_2_hog") and "peak memory" in lines[1], lines
    assert props["test_4_plain_after"] == {}  # plain tests get no usage
    # A SIGKILL that is not the OOM killer's is reported as a crash.
    killed = by_test["test_5_sigkill"]
    assert killed.splitlines()[0] == "Crashed: the test's process was killed by signal 9 (SIGKILL) during call."
    assert "OOM" not in killed and "printed before SIGKILL" in killed
    assert "isolate_oom_kills" not in props["test_5_sigkill"]
    # Unlimited isolated tests say nothing of their usage without -vv.
    assert "measured by rusage" not in result.stdout.str()


PEAK_PER_TEST = HELPERS + """
@pytest.mark.isolated(memory="256m", pids=64)
def test_1_big():
    touch(96)
    children = []
    hold, release = os.pipe()
    for _ in range(10):  # ten children at once: each waits until all are there
        pid = os.fork()
        if pid == 0:
            os.close(release)
            os.read(hold, 1)
            os._exit(0)
        children.append(pid)
    os.close(release)
    for pid in children:
        os.waitpid(pid, 0)

@pytest.mark.isolated(memory="256m", pids=64)
def test_2_small():
    touch(8)
"""


def test_limit_peak_memory_is_the_tests_own(pytester, run) -> None:
    """The peak of a test is its own, not that of the test before it in the same host.
    Where the kernel cannot reset it (cgroup v2 before 6.12), a peak that did not rise
    during the test is not reported at all."""
    pytester.makepyfile(test_peak=PEAK_PER_TEST)
    result = run("-rA", "--junitxml=out.xml", LIMITS_MODE)
    result.assert_outcomes(passed=2)
    props = read_junit(pytester.path / "out.xml").properties()
    assert int(props["test_1_big"]["isolate_peak_memory_bytes"]) > 96 * MiB
    if V2_OLD_PEAK and "isolate_peak_memory_bytes" not in props["test_2_small"]:
        assert "peak memory ?" in reports_by_test(result)["test_2_small"]  # said, not guessed
    else:
        assert int(props["test_2_small"]["isolate_peak_memory_bytes"]) < 64 * MiB


def test_limit_peak_pids_is_the_tests_own(pytester, run) -> None:
    if CGROUP_VERSION != 2:
        pytest.skip("only cgroup v2 keeps a peak of pids")
    pytester.makepyfile(test_peak=PEAK_PER_TEST)
    result = run("--junitxml=out.xml", LIMITS_MODE)
    result.assert_outcomes(passed=2)
    props = read_junit(pytester.path / "out.xml").properties()
    if "isolate_peak_pids" not in props["test_1_big"]:
        pytest.skip(f"no pids.peak in this kernel ({os.uname().release})")
    assert int(props["test_1_big"]["isolate_peak_pids"]) >= 12  # init, the test and 10 children
    small = props["test_2_small"].get("isolate_peak_pids")  # absent: not known, and not said
    assert small is None or int(small) <= 2, small  # init and the test


def test_usage_of_unlimited_isolated_tests_comes_from_rusage(pytester, run) -> None:
    pytester.makepyfile(test_usage=HELPERS + """
@pytest.mark.isolated
def test_unlimited():
    touch(40)

def test_plain():
    pass
""")
    result = run("-vv", "-rA", "--junitxml=out.xml")
    result.assert_outcomes(passed=2)
    props = read_junit(pytester.path / "out.xml").properties()
    assert int(props["test_unlimited"]["isolate_peak_memory_bytes"]) > 40 * MiB
    assert float(props["test_unlimited"]["isolate_cpu_seconds"]) > 0
    assert props["test_plain"] == {}
    usage = reports_by_test(result)["test_unlimited"]
    assert re.search(r"peak memory [\d.]+ MiB, CPU time [\d.]+ s \(measured by rusage\)", usage), usage
    assert "limits enforced" not in usage
    # -vv shows the ranking (no limit was hit, so only verbosity does), by getrusage
    lines = top_consumers(result)
    assert lines is not None and len(lines) == 3, lines  # the heading, memory, CPU
    assert lines[0] == "measured by getrusage (tests without limits; shared pages count):"
    assert all(line.endswith("test_usage.py::test_unlimited") for line in lines[1:]), lines


# -- pids ------------------------------------------------------------------------------

FORK_BOMB = HELPERS + """
MARK = {mark!r}

@pytest.mark.isolated(pids=8)
def test_fork_bomb():
    started, error = spawn_until_refused(MARK)
    print("started", started, "children")
    assert error == errno.EAGAIN
    assert started < 8
"""


def test_limit_pids_refuses_the_fork_bomb(pytester, run) -> None:
    mark = f"pids-sleeper-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(test_bomb=FORK_BOMB.format(mark=mark))
    try:
        result = run("-rA", "--junitxml=out.xml", LIMITS_MODE)
        result.assert_outcomes(passed=1)
        section = reports_by_test(result)["test_fork_bomb"]
        if HAS_CGROUPS:
            refused = re.search(r"the pids limit refused (\d+) fork/clone calls", section)
            assert refused and int(refused.group(1)) >= 1, section
            hits = read_junit(pytester.path / "out.xml").properties()["test_fork_bomb"]["isolate_pids_limit_hits"]
            assert int(hits) >= 1
            assert ENFORCED_BY in section
        else:
            assert "pids 8 as RLIMIT_NPROC" in section and "best-effort" in section
        # The children ended with the container: none is left on the host.
        assert wait_for(lambda: find_processes(mark), GRACE) == []
    finally:
        for pid in find_processes(mark):
            os.kill(pid, signal.SIGKILL)


PIDS_COUNT = HELPERS + """
@pytest.mark.isolated(pids=8)
def test_1_eight():
    started, error = spawn_until_refused("pids-count-" + str(os.getpid()))
    assert error == errno.EAGAIN
    # the container's init (pid 1), this test (pid 2) and the children: 8 tasks
    assert started == 6, f"started {started} children under pids=8"

@pytest.mark.isolated(pids=2)
def test_2_two():
    started, error = spawn_until_refused("pids-count-" + str(os.getpid()))
    assert (started, error) == (0, errno.EAGAIN)
"""


def test_limit_pids_counts_the_containers_processes_only(pytester, run) -> None:
    """pids=N: N tasks in the container, its init included (as in Docker); the
    runtime's limits zygote (in the group in place of init, which is not) counts as init."""
    if not HAS_CGROUPS:
        pytest.skip(f"no cgroups here (best-effort's RLIMIT_NPROC counts the user's processes): "
                    f"{NO_CGROUP_REASON}")
    pytester.makepyfile(test_count=PIDS_COUNT)
    run("-rA").assert_outcomes(passed=2)
    pytester.makepyfile(test_count="""
import pytest

@pytest.mark.isolated(pids=1)
def test_one():
    pass
""")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid 'pids': got 1; accepted: a number of processes and threads from 2" in result.stderr.str()


def test_v1_group_with_cpu_and_cpuacct_mounted_together(tmp_path) -> None:
    """Backend.create() on the v1 layout most distributions have (this machine mounts
    cpu and cpuacct apart, so a real run here cannot show it): directories stand in
    for the hierarchies, as detect() would name them from /proc/self/mountinfo."""
    for name in ("memory", "pids", "cpu,cpuacct"):
        (tmp_path / name).mkdir()
    combined = str(tmp_path / "cpu,cpuacct")
    backend = cgroups.Backend(1, {"memory": str(tmp_path / "memory"), "pids": str(tmp_path / "pids"),
                                  "cpu": combined, "cpuacct": combined})
    group = backend.create()
    assert sorted(os.listdir(combined)) == [os.path.basename(group.dirs["cpu"])]
    assert group.dirs["cpu"] == group.dirs["cpuacct"]


# -- cpus ------------------------------------------------------------------------------

def test_limit_cpus_throttles_a_busy_loop(pytester, run) -> None:
    """cpus=0.2: a loop that burns 0.3 s of CPU gets no more than 0.2 CPU over its wall
    time (an upper bound that a busy machine only makes easier), so it runs at least
    about 1.5 s, and the group's throttling is reported."""
    pytester.makepyfile(test_cpus=HELPERS + """
@pytest.mark.isolated(cpus=0.2)
def test_busy():
    cpu, wall = time.process_time(), time.monotonic()
    while time.process_time() - cpu < 0.3:
        pass
    print("CPU time and wall time of the busy loop:", time.process_time() - cpu, time.monotonic() - wall)
""")
    # The default mode: a fresh interpreter's own start-up would count as the test's CPU.
    result = run("-rA", "--junitxml=out.xml", "--isolate-usage=0", "--isolate-mode=fork")
    assert top_consumers(result) is None  # a limited test, but no ranking asked for
    if not HAS_CGROUPS:
        result.assert_outcomes(errors=1)
        strict_error(reports_by_test(result)["setup test_busy"])
        return
    result.assert_outcomes(passed=1)
    section = reports_by_test(result)["test_busy"]
    cpu, wall = map(float, re.search(r"CPU time and wall time of the busy loop: ([\d.]+) ([\d.]+)", section).groups())
    # 0.2 CPU over the loop's wall time, and a period's quota or so of slack (unlimited,
    # the loop would take 0.3 s of wall time for its 0.3 s of CPU)
    assert 0.3 <= cpu <= 0.2 * wall + 0.1, section
    props = read_junit(pytester.path / "out.xml").properties()["test_busy"]
    # The container's start-up counts too: a few ms of CPU here, more where Python is slow.
    assert cpu <= float(props["isolate_cpu_seconds"]) <= cpu + 0.2 * slowdown(), props
    assert float(props["isolate_cpu_throttled_seconds"]) > 0, props
    assert re.search(r"CPU throttled in \d+ periods, [\d.]+ s in all, by the cpus limit", section), section


# -- ulimits ---------------------------------------------------------------------------

ULIMITS = HELPERS + """
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

@pytest.mark.isolated(ulimits={"nofile": 64, "core": 0})
def test_marker():
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64)
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)

@pytest.mark.isolated(ulimits={"core": (0, 0)})
def test_command_line():
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (100, 200)
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)

@pytest.mark.isolated(ulimits={"nofile": HARD + 1})
def test_above_the_hard_limit():
    pass
"""


def test_ulimits_from_marker_and_command_line_and_above_the_hard_limit(pytester, run) -> None:
    """ulimits are rlimits, enforced everywhere (no cgroup needed)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard != resource.RLIM_INFINITY
    pytester.makepyfile(test_ulimits=ULIMITS)
    result = run("-rA", "--isolate-ulimit", "nofile=100:200")
    result.assert_outcomes(passed=2, errors=1)
    error = reports_by_test(result)["setup test_above_the_hard_limit"]
    assert "ulimits" in error and "nofile" in error and str(hard) in error, error
    assert top_consumers(result) is None  # ulimits are no cgroup limits


# -- the summary -----------------------------------------------------------------------

TOP = HELPERS + """
@pytest.mark.isolated(memory="256m")
def test_big():
    touch(100)

@pytest.mark.isolated
def test_small_1():
    pass

@pytest.mark.isolated
def test_small_2():
    pass

@pytest.mark.isolated
def test_small_3():
    pass
"""


def test_usage_top_consumers_summary(pytester, run) -> None:
    pytester.makepyfile(test_top=TOP)
    quiet = run(LIMITS_MODE)
    quiet.assert_outcomes(passed=4)
    assert top_consumers(quiet) is None  # no limit was hit: nothing to tell

    verbose = run(LIMITS_MODE, "-v")
    verbose.assert_outcomes(passed=4)
    lines = top_consumers(verbose)
    assert lines is not None, verbose.stdout.str()
    # like with like: the limited test among the limited ones, the rest by getrusage
    limited = "measured by getrusage" if not HAS_CGROUPS else "measured by cgroup v"
    assert lines[0].startswith(limited), lines
    rusage = lines.index("measured by getrusage (tests without limits; shared pages count):")
    if HAS_CGROUPS:
        assert rusage == 3, lines
        assert lines[1].endswith("test_top.py::test_big") and "peak memory" in lines[1]
        assert lines[2].endswith("test_top.py::test_big") and "s CPU time" in lines[2]
    unlimited = lines[rusage + 1:]
    assert len(unlimited) == (6 if HAS_CGROUPS else 8), lines  # 3 (or 4) tests, memory and CPU each

    two = run(LIMITS_MODE, "--isolate-usage=2")
    two.assert_outcomes(passed=4)
    lines = top_consumers(two)
    assert lines is not None, two.stdout.str()
    rusage = lines.index("measured by getrusage (tests without limits; shared pages count):")
    assert len(lines[rusage + 1:]) == 4, lines  # at most 2 each
    # --isolate-usage=0: see test_limit_cpus_throttles_a_busy_loop


# -- strict and best-effort ------------------------------------------------------------

MODES = HELPERS + memory_hog() + """
@pytest.mark.isolated(cpus=0.2)
def test_cpus():
    print("limited to 0.2 CPUs")

@pytest.mark.isolated
def test_unlimited():
    pass
"""


def test_limit_strict_and_best_effort_enforce_with_cgroups(pytester, run) -> None:
    if not HAS_CGROUPS:
        pytest.skip(f"no cgroups here (see the test without cgroups): {NO_CGROUP_REASON}")
    pytester.makepyfile(test_modes=MODES)
    for mode in ("strict", "best-effort"):
        result = run("-rA", f"--isolate-limits={mode}")
        result.assert_outcomes(passed=2, failed=1)
        by_test = reports_by_test(result)
        assert by_test["test_hog"].startswith("Killed by the OOM killer: memory limit 64 MiB reached")
        assert ENFORCED_BY in by_test["test_hog"] and ENFORCED_BY in by_test["test_cpus"]
        assert "best-effort" not in result.stdout.str()


def test_strict_and_best_effort_without_cgroups(pytester) -> None:
    """No cgroups (natively rootless on v1; as root, the cgroup mounts hidden)."""
    pytester.makepyfile(test_modes=MODES)
    strict = run_without_cgroups(pytester, "-rA")
    strict.assert_outcomes(passed=1, errors=2)
    by_test = reports_by_test(strict)
    for name in ("test_hog", "test_cpus"):
        strict_error(by_test[f"setup {name}"])
        if not HAS_CGROUPS:  # the reason detect() gives here
            assert NO_CGROUP_REASON in by_test[f"setup {name}"]

    best = run_without_cgroups(pytester, "-rA", "--isolate-limits=best-effort")
    counts = best.parseoutcomes()
    assert counts.get("passed") == 2 and counts.get("failed") == 1, counts
    by_test = reports_by_test(best)
    hog = by_test["test_hog"]
    assert "MemoryError" in hog or "Crashed" in hog, hog  # RLIMIT_DATA stopped it
    assert "OOM" not in hog
    assert "printed before the hog" in hog
    assert "limits enforced by best-effort" in hog and "memory 64 MiB as RLIMIT_DATA" in hog, hog
    assert "cpus 0.2 NOT enforced" in by_test["test_cpus"]
    assert "(measured by rusage)" in by_test["test_cpus"]


def test_strict_error_reads_once_and_always_names_best_effort(pytester) -> None:
    """Whatever the reason (here: rootless v1, or no cgroup mounted at all), the
    error says it once and points to best-effort."""
    pytester.makepyfile(test_modes=MODES)
    result = run_without_cgroups(pytester, "-rA", "-k", "hog")
    result.assert_outcomes(errors=1, deselected=2)
    error = reports_by_test(result)["setup test_hog"]
    assert error.startswith("pytest-isolate: cannot enforce the limits of this test: "), error
    assert "pytest-isolate: pytest-isolate" not in error
    assert "--isolate-limits=best-effort" in error


# -- layering, modes, xdist ------------------------------------------------------------

LAYERS = HELPERS + """
@pytest.mark.isolated(memory="32m")
def test_marker():
    touch(200)

@pytest.mark.isolated
def test_inherited():
    touch(200)
"""


def limit_of(section: str) -> str:
    """The memory limit a test ran with, as its report says it."""
    if HAS_CGROUPS:
        found = re.search(r"Killed by the OOM killer: memory limit (\d+ MiB) reached", section)
    else:
        found = re.search(r"memory (\d+ MiB) as RLIMIT_DATA", section)
    assert found, section
    return found.group(1)


def test_limit_memory_layers_ini_cli_marker(pytester, run) -> None:
    pytester.makeini("[pytest]\nisolate_memory = 64m\n")
    pytester.makepyfile(test_layers=LAYERS)
    ini = run(LIMITS_MODE)
    ini.assert_outcomes(failed=2)
    by_test = reports_by_test(ini)
    assert (limit_of(by_test["test_marker"]), limit_of(by_test["test_inherited"])) == ("32 MiB", "64 MiB")
    cli = run(LIMITS_MODE, "--isolate-memory=128m")
    cli.assert_outcomes(failed=2)
    by_test = reports_by_test(cli)
    assert (limit_of(by_test["test_marker"]), limit_of(by_test["test_inherited"])) == ("32 MiB", "128 MiB")


def test_limit_memory_in_fresh_mode(pytester, run) -> None:
    pytester.makepyfile(test_fresh=memory_hog())
    result = run("--isolate-mode=fresh", "-rA")
    by_test = reports_by_test(result)
    if not HAS_CGROUPS:
        result.assert_outcomes(errors=1)
        strict_error(by_test["setup test_hog"])
        return
    result.assert_outcomes(failed=1)
    hog = by_test["test_hog"]
    assert hog.splitlines()[0] == "Killed by the OOM killer: memory limit 64 MiB reached (peak 64 MiB).", hog
    assert "printed before the hog" in hog
    assert "container host (fresh mode" in result.stdout.str()


XDIST = HELPERS + """
@pytest.mark.isolated(memory="64m")
def test_small():
    touch(8)
""" + memory_hog() + """
@pytest.mark.isolated
def test_unlimited():
    pass

def test_plain():
    pass
"""


def test_limit_memory_under_xdist(pytester, run) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_xdist=XDIST)
    result = run("-n", "2", "-rA", "--junitxml=out.xml")
    by_test = reports_by_test(result)
    if not HAS_CGROUPS:
        result.assert_outcomes(passed=2, errors=2)
        strict_error(by_test["setup test_hog"])
        return
    result.assert_outcomes(passed=3, failed=1)
    assert by_test["test_hog"].splitlines()[1] == \
        "Killed by the OOM killer: memory limit 64 MiB reached (peak 64 MiB)."  # [0]: "[gwN] linux -- ..."
    props = read_junit(pytester.path / "out.xml").properties()
    assert props["test_hog"]["isolate_oom_kills"] == "1"
    assert 8 * MiB < int(props["test_small"]["isolate_peak_memory_bytes"]) < 64 * MiB


def test_usage_top_consumers_under_xdist(pytester, run) -> None:
    """The workers' usage reaches the controller's summary."""
    pytest.importorskip("xdist")
    pytester.makepyfile(test_xdist=TOP)
    result = run("-n", "2", LIMITS_MODE, "--isolate-usage=5")
    result.assert_outcomes(passed=4)
    lines = top_consumers(result)
    assert lines is not None, result.stdout.str()
    ranked = [line for line in lines if not line.startswith("measured by ")]
    assert len(ranked) == 8, lines  # 4 tests, memory and CPU each
    assert {line.split()[-1] for line in ranked} == {f"test_xdist.py::test_{n}"
                                                     for n in ("big", "small_1", "small_2", "small_3")}


# -- bugs in what a run reports --------------------------------------------------------

def test_limit_timeout_is_not_reported_as_oom(pytester, run) -> None:
    """A child OOM-killed earlier does not make the test's timeout an OOM kill."""
    if not HAS_CGROUPS:
        pytest.skip(f"no cgroups here: {NO_CGROUP_REASON}")
    # The timeout leaves the child ample time to be OOM-killed (well under a second here);
    # then the test hangs until the timeout ends it.
    pytester.makepyfile(test_child=HELPERS + """
@pytest.mark.isolated(memory="64m", timeout=10)
def test_child_oom_then_hang():
    pid = os.fork()
    if pid == 0:
        touch(200)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("the child was OOM-killed")
    time.sleep(3600)
""")
    result = run("-rA", "--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    section = reports_by_test(result)["test_child_oom_then_hang"]
    assert section.startswith("Timeout: the test ran longer than timeout=10s"), section
    assert "the child was OOM-killed" in section, section
    assert read_junit(pytester.path / "out.xml").properties()["test_child_oom_then_hang"]["isolate_oom_kills"] == "1"


@pytest.mark.parametrize("marker, why", [
    ('memory_swap="128m"', "it needs memory too"),
    ('memory="64m", memory_swap="32m"', "it is memory plus swap, so it cannot be below memory"),
])
def test_memory_swap_without_or_below_memory_is_a_usage_error(pytester, run, marker, why) -> None:
    pytester.makepyfile(test_swap=f"""
import pytest

@pytest.mark.isolated({marker})
def test_swap():
    pass
""")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert f"test_swap.py::test_swap: invalid 'memory_swap' (from @pytest.mark.isolated): {why}" in result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# -- nothing leaks, everything is contained ---------------------------------------------

LEAKS = memory_hog() + RECORD_GROUPS


def test_limit_groups_are_removed_at_the_end(pytester, run) -> None:
    mark = f"leak-sleeper-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(test_leaks=FORK_BOMB.format(mark=mark) + LEAKS)
    try:
        result = run("-rA", LIMITS_MODE)
        result.assert_outcomes(passed=2, failed=1)
        recorded = json.loads((pytester.path / "groups.json").read_text())
        if HAS_CGROUPS:  # one group per host, in each hierarchy (v1: memory, pids, cpu, cpuacct)
            names = {os.path.basename(g) for g in recorded["groups"]}
            assert names == {f"{cgroups.PREFIX}{recorded['pid']}-1"}, recorded
            assert len(recorded["groups"]) == (4 if CGROUP_VERSION == 1 else 1), recorded
        else:
            assert recorded["groups"] == []
        assert groups_of(recorded["pid"]) == []
        assert wait_for(lambda: find_processes(mark), GRACE) == []
    finally:
        for pid in find_processes(mark):
            os.kill(pid, signal.SIGKILL)


KILLED = HELPERS + """
MARK = {mark!r}

@pytest.mark.isolated(memory="64m", pids=64)
def test_sleeps_until_pytest_is_killed():
    spawn_until_refused(MARK, most=1)
    time.sleep(3600)
"""


def test_limit_groups_of_a_sigkilled_run_are_removed_by_the_next(pytester, run) -> None:
    mark = f"killed-sleeper-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(test_killed=KILLED.format(mark=mark))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", LIMITS_MODE,
               f"--basetemp={pytester.path / 'killed-basetemp'}", "test_killed.py"]
    inner = subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not find_processes(mark):
            assert inner.poll() is None, inner.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the inner test's sleeper never showed up"
            time.sleep(0.05)
        while_running = groups_of(inner.pid)
        if HAS_CGROUPS:
            assert [os.path.basename(g) for g in while_running] == [f"{cgroups.PREFIX}{inner.pid}-1"] * len(
                while_running) and while_running
        else:
            assert while_running == []
        inner.kill()
        inner.wait(10)
        assert wait_for(lambda: find_processes(mark), GRACE) == []
        # The group may still be there (nobody removed it) or not (another run did);
        # the next run that uses limits removes it in any case.
        pytester.makepyfile(test_next=HELPERS + """
@pytest.mark.isolated(memory="64m")
def test_limited():
    pass
""")
        run("test_next.py", LIMITS_MODE).assert_outcomes(passed=1)
        assert groups_of(inner.pid) == []
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait(10)
        inner.stdout.close()
        for pid in find_processes(mark):
            os.kill(pid, signal.SIGKILL)


CONTAINMENT = HELPERS + """
@pytest.mark.isolated(pids=32, timeout={timeout})
def test_1_fork_bomb():
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.05)

@pytest.mark.isolated(memory="32m")
def test_2_memory_hog():
    touch(400)

@pytest.mark.isolated(cpus=0.1, timeout={timeout})
def test_3_cpu_hog():
    while True:
        pass

def test_4_plain_after():
    touch(64)
    assert os.fork and os.cpu_count()
"""


def test_limit_hogs_are_contained(pytester, run) -> None:
    """Each hog is stopped by its limit or its timeout, and the run goes on: the timeout
    is ample for the hogs to reach their call (the run's own timeout is a safety net only)."""
    timeout = 5
    pytester.makepyfile(test_hogs=CONTAINMENT.format(timeout=timeout))
    result = run("-rA", "--junitxml=out.xml", LIMITS_MODE, timeout=600)
    result.assert_outcomes(passed=1, failed=3)
    by_test = reports_by_test(result)
    # A timeout ends each endless hog during its call.
    for name in ("test_1_fork_bomb", "test_3_cpu_hog"):
        assert by_test[name].startswith(f"Timeout: the test ran longer than timeout={timeout}s"), by_test[name]
    cpu_hog = read_junit(pytester.path / "out.xml").by_name()["test_3_cpu_hog"]
    cpu = cpu_hog.properties
    if HAS_CGROUPS:
        assert by_test["test_2_memory_hog"].startswith("Killed by the OOM killer: memory limit 32 MiB reached")
        assert re.search(r"the pids limit refused \d+ fork/clone calls", by_test["test_1_fork_bomb"])
        # 0.1 CPU for as long as the container lived (the report's duration: the timeout
        # and the kill, however late a busy machine made it), and start-up's slack
        lived = float(cpu_hog.element.get("time"))
        assert lived >= timeout and float(cpu["isolate_cpu_seconds"]) < 0.1 * lived + 0.3, (lived, cpu)
        assert float(cpu["isolate_cpu_throttled_seconds"]) > 0, cpu
    else:
        assert "MemoryError" in by_test["test_2_memory_hog"] or "Crashed" in by_test["test_2_memory_hog"]
        assert "cpus 0.1 NOT enforced" in by_test["test_3_cpu_hog"]
