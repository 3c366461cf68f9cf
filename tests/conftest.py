"""Shared helpers: every test here runs a real pytest, whose tests run in real
containers on this machine (no mocks of the kernel)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterator

import pytest

pytest_plugins = ["pytester"]

IS_ROOT = os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root: runs only when pytest runs as root")
    config.addinivalue_line("markers", "rootless_lane: re-runs the suite as an unprivileged user")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("needs_root") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs pytest to run as root"))


# The whole suite runs in both modes: PYTEST_ISOLATE_SUITE_MODE=fresh makes "fresh"
# the default mode of every inner run (scripts/test.sh does a second pass so). A test
# that is about one mode says so in its own arguments or marker, which come later
# and win.
SUITE_MODE = os.environ.get("PYTEST_ISOLATE_SUITE_MODE", "")
SUITE_MODE_ARGS = (f"--isolate-mode={SUITE_MODE}",) if SUITE_MODE else ()


@pytest.fixture
def run(pytester: pytest.Pytester):
    """Run pytest in a subprocess in the pytester directory; extra args pass through."""

    def run(*args: str, timeout: float = 180) -> pytest.RunResult:
        mode = SUITE_MODE_ARGS if "no:isolate" not in args else ()  # no plugin, no option
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *mode, *args, timeout=timeout)

    return run


def read_quietly(path: str) -> bytes:
    """The bytes of ``path``, or b"" if it is gone or not ours to read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def find_processes(cmdline_part: str) -> list[int]:
    """Pids whose /proc/PID/cmdline contains ``cmdline_part``."""
    needle = cmdline_part.encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and needle in read_quietly(f"/proc/{p}/cmdline")]


def find_processes_named(comm: str) -> list[int]:
    """Pids whose /proc/PID/comm is ``comm``."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and read_quietly(f"/proc/{p}/comm").strip() == comm.encode()]


def marker_usage_error(pytester: pytest.Pytester, run, **marker) -> str:
    """Run a test marked ``@pytest.mark.isolated(**marker)``: it must be a usage error;
    what pytest wrote to stderr."""
    pytester.makepyfile(test_bad=f"""
        import pytest

        @pytest.mark.isolated({", ".join(f"{k}={v!r}" for k, v in marker.items())})
        def test_a():
            pass
    """)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    return result.stderr.str()


def module_usage_error(pytester: pytest.Pytester, run, source: str) -> str:
    """A test module whose import raises a usage error (e.g. a bad service()): it must
    fail the run; what pytest wrote (its collection error, on stdout, or on stderr)."""
    pytester.makepyfile(test_bad=textwrap.dedent(source))
    result = run()
    assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    return result.stdout.str() + result.stderr.str()


def wait_for(probe, timeout: float):
    """Poll ``probe`` until it returns something falsy or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# -- users that tests make -------------------------------------------------------------------

@contextlib.contextmanager
def system_user(name: str, subordinate: bool = True) -> Iterator[pwd.struct_passwd]:
    """The unprivileged user ``name`` (a system user: no home, no login shell) while the
    block runs. Made with useradd when missing -- with a free 65536-id range in
    /etc/subuid and /etc/subgid unless ``subordinate`` is false (useradd gives system
    users none), so that its rootless containers keep image owners (runtime/subids.py)
    -- and then removed with ``userdel -r`` (which removes its ranges too) when the
    block ends, failed or not, with its processes and the inner pytest's
    /tmp/pytest-of-NAME. A user that was there already (CI's ci/guest/lane.sh makes
    pytest-isolate-ci; an older run or another run at the same time may have made it)
    is used as it is and left in place: only what this block made is removed."""
    try:
        existing = pwd.getpwnam(name)
    except KeyError:
        existing = None
    if existing is not None:
        yield existing
        return
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        try:
            user = pwd.getpwnam(name)  # another run made it meanwhile: it is theirs
        except KeyError:
            raise AssertionError(f"useradd {name} failed: {made.stderr}") from None
        yield user
        return
    user = pwd.getpwnam(name)
    try:
        if subordinate:
            start = free_subordinate_start()
            ranges = f"{start}-{start + 65535}"
            added = subprocess.run(["usermod", "--add-subuids", ranges, "--add-subgids", ranges, name],
                                   capture_output=True, text=True)
            assert added.returncode == 0, f"usermod --add-subuids {ranges} {name}: {added.stderr}"
        yield user
    finally:
        def left() -> list[int]:  # processes of the new user: the test's own, still running
            return [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == user.pw_uid]

        def kill_left() -> list[int]:
            pids = left()
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return pids

        wait_for(kill_left, 30)
        removed = subprocess.run(["userdel", "-r", name], capture_output=True, text=True)
        tmp = f"/tmp/pytest-of-{name}"
        if os.path.isdir(tmp) and os.stat(tmp).st_uid == user.pw_uid:
            shutil.rmtree(tmp, ignore_errors=True)
        assert removed.returncode == 0, f"userdel -r {name}: {removed.stderr}"


def free_subordinate_start() -> int:
    """The start of 65536 ids after every range in /etc/subuid and /etc/subgid (below
    the range root's containers use without one, user_ns.DEFAULT_ROOT_RANGE)."""
    end = 100_000
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    end = max(end, int(parts[1]) + int(parts[2]))
    assert end + 65536 <= 1_000_000_000, "no free subordinate range below 1000000000"
    return end


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# -- inner test programs --------------------------------------------------------------------

MEMORY_HOG = '''
import pytest

@pytest.mark.isolated(memory="64m")
def {name}():
    print("printed before the hog")
    block = bytearray(200 << 20)  # 200 MiB under a 64 MiB limit,
    for i in range(0, len(block), 4096):  # each page written, so all of it is resident
        block[i] = 1
'''


def memory_hog(name: str = "test_hog") -> str:
    """The source of an inner test ``name`` limited to 64 MiB that prints "printed before
    the hog", then writes 200 MiB: the OOM killer ends it (with cgroups), or
    RLIMIT_DATA's MemoryError (best-effort without)."""
    return MEMORY_HOG.format(name=name)


# -- the report's sections ------------------------------------------------------------------

# A section header is a rule around a title: "=== title ===" (the report's parts),
# "___ title ___" (one test's report, within FAILURES, ERRORS, PASSES) and
# "--- title ---": the sections of a test's report ("Captured stdout call", "pytest-isolate
# usage (after teardown)"...), but for the dashed parts of the report that the terminal
# summary adds (SUMMARY_PARTS). A long title leaves room for a rule of one character only
# ("_ _ _ _" between the parts of a traceback is no header).
_RULE = re.compile(r"^([=_-])\1* (.+?) \1+$")
SUMMARY_PARTS = re.compile(r"pytest-isolate|pytest-isolate: top consumers|generated xml file: .*")


def _level(rule: str, title: str) -> int:
    if rule == "_":
        return 1
    if rule == "-" and not SUMMARY_PARTS.fullmatch(title):
        return 2
    return 0


def sections(result: pytest.RunResult) -> list[tuple[str, list[str]]]:
    """Every section of the output, in order, as (title, lines): the header line first,
    then the lines up to the next header of the same level or above (a test's section
    holds its own sections, "Captured ..." and others; they are listed on their own too)."""
    lines = result.outlines
    headers = []
    for i, line in enumerate(lines):
        match = _RULE.match(line)
        if match and set(match.group(2)) - {match.group(1), " "}:
            headers.append((i, _level(match.group(1), match.group(2)), match.group(2)))
    found = []
    for n, (start, level, title) in enumerate(headers):
        end = next((i for i, other, _ in headers[n + 1:] if other <= level), len(lines))
        found.append((title, lines[start:end]))
    return found


def section(result: pytest.RunResult, title: str) -> list[str]:
    """The first section headed ``title`` (e.g. "test_x", "ERROR at setup of test_x",
    "short test summary info"), its header line first."""
    for found, lines in sections(result):
        if found == title:
            return lines
    raise AssertionError(f"no section {title!r} in:\n" + "\n".join(result.outlines[-200:]))


def reports_by_test(result: pytest.RunResult) -> dict[str, str]:
    """Each test's report by test name, without its header: "test_x" (a parameter's
    "[...]" left off), "setup test_x" / "teardown test_x" for its ERROR at setup/teardown.

    pytest heads a passing test's report only when it has sections of its own (e.g.
    captured output, with -rP or -rA)."""
    found = {}
    for title, lines in sections(result):
        if not lines[0].startswith("_"):
            continue
        match = re.fullmatch(r"(ERROR at (\w+) of )?(\S+?)(\[.*\])?", title)
        if match:
            name = (f"{match.group(2)} " if match.group(2) else "") + match.group(3).split("::")[-1]
            found.setdefault(name, "\n".join(lines[1:]))
    return found


# -- junit XML ------------------------------------------------------------------------------

@dataclass
class JUnitCase:
    classname: str
    name: str
    properties: dict[str, str]
    element: ET.Element = field(repr=False)

    @property
    def tags(self) -> list[str]:
        """The tags of its children but <properties>: failure, error, skipped, system-out..."""
        return [child.tag for child in self.element if child.tag != "properties"]

    @property
    def outcomes(self) -> list[ET.Element]:
        """Its <failure>, <error> and <skipped> children."""
        return [child for child in self.element if child.tag in ("failure", "error", "skipped")]

    def text(self, tag: str) -> str:
        """The text of every child ``tag`` (e.g. "system-out"), joined."""
        return "".join(child.text or "" for child in self.element.iter(tag))


@dataclass
class JUnitReport:
    suite: dict[str, str]  # the <testsuite>'s attributes: tests, failures, errors, skipped...
    suite_properties: dict[str, str]
    cases: list[JUnitCase]

    def by_name(self) -> dict[str, JUnitCase]:
        return {case.name: case for case in self.cases}

    def properties(self) -> dict[str, dict[str, str]]:
        """Each test's <property> name -> value, by test name."""
        return {case.name: case.properties for case in self.cases}


def read_junit(path) -> JUnitReport:
    """The junit XML that pytest's --junitxml wrote at ``path``."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    suite_props = suite.find("properties")
    cases = [JUnitCase(case.get("classname"), case.get("name"),
                       {p.get("name"): p.get("value") for p in case.iter("property")}, case)
             for case in root.iter("testcase")]
    return JUnitReport(dict(suite.attrib),
                       {} if suite_props is None else {p.get("name"): p.get("value") for p in suite_props},
                       cases)


# Inner-test source: how a hostile test finds its events file (a memfd of that name)
# to write frames into it. Needs ``os`` imported by the inner file.
FIND_CHANNEL = '''
def channel():
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "pytest-isolate-events" in os.readlink(f"/proc/self/fd/{fd}"):
                return int(fd)
        except OSError:
            pass
    raise AssertionError("no event channel in /proc/self/fd")
'''
