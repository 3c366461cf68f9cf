"""Inside a test's container: the test's reporter, and the pytest glue that every
in-container pytest session shares (the container host's, a fresh interpreter's).

Like remote.py this imports nothing of the plugin: only pytest and the stdlib-only
``pytest_isolate.runtime``. The reporter exists only in a test's process: it sends
the test's reports, warnings and properties as events (runtime/link.py) into the
test's own events file, and points pytest's capture and faulthandler at the test's
own files.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import warnings

import pytest

from pytest_isolate import coverage_container, hypothesis_support
from pytest_isolate.runtime import link

DEFAULT_CAPTURE_CAP = 8 << 20


def make_config(option_dict: dict, args: list[str], workerinput: dict) -> pytest.Config:
    config = pytest.Config.fromdictargs(option_dict, args)
    # Core plugins (junitxml, cacheprovider, stepwise, ...) and many third-party
    # ones skip their session-level side effects in a process that has workerinput:
    # results belong to the controller.
    config.workerinput = workerinput  # type: ignore[attr-defined]
    config.workeroutput = {}  # type: ignore[attr-defined]
    hypothesis_support.setup_container(config, workerinput)
    return config


def quiet_session_output(kept: bool = False) -> int:
    """The session's own output (its terminal reporter) goes nowhere (``kept``: into
    a memfd, until silence_session_output()), while what a test prints to fd 1
    without capture (``-s``) reaches stderr, as under xdist. Returns the fd the
    session writes to, which containers must keep."""
    os.dup2(2, 1)
    if kept:  # why pytest stopped before it collected, if it does
        sys.stdout = os.fdopen(os.memfd_create("pytest-isolate-session-output"), "w+", buffering=1)
    else:
        sys.stdout = open(os.devnull, "w")
    # Warnings shown outside a test (pytest records those of a test) would land in
    # the controller's progress line: the controller's own session shows its own.
    warnings.showwarning = _show_no_warning
    return sys.stdout.fileno()


def session_output_tail(fd: int, lines: int = 40) -> str:
    """The last lines the session wrote into its kept output."""
    sys.stdout.flush()
    size = os.fstat(fd).st_size
    data = os.pread(fd, 65536, max(0, size - 65536)).decode("utf-8", "replace")
    return "\n".join(data.strip().splitlines()[-lines:])


def silence_session_output(fd: int) -> None:
    """From now on the session's output goes nowhere (a test process inherits it)."""
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _show_no_warning(message, category, filename, lineno, file=None, line=None) -> None:
    pass


class ContainerFixtures:
    """Fixtures that must be known at collection (the container host's): they act
    through the test's reporter, which exists only in the test's process."""

    def __init__(self) -> None:
        self.reporter: TestReporter | None = None

    @pytest.fixture
    def record_testsuite_property(self):
        """Replaces junitxml's fixture inside containers: the property goes to the
        controller, which writes the XML (here it would be dropped)."""

        def record(name: str, value: object) -> None:
            __tracebackhide__ = True
            if not isinstance(name, str):
                raise TypeError(f"name parameter needs to be a string, but {type(name).__name__} given")
            if self.reporter is not None:
                self.reporter.send("testsuite_property", name=name, value=value)

        return record


class TestReporter:
    """Forwards one test's reports and warnings to its host, from inside its container."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, config: pytest.Config, files: dict, capture_cap: int) -> None:
        self.config = config
        self.event_fd = files["events"]
        self.files = files
        self.capture_cap = capture_cap

    def send(self, name: str, /, **fields) -> None:
        link.send(self.event_fd, name, fields)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        if isinstance(data, dict) and isinstance(data.get("sections"), list):
            data["sections"] = [_capped_section(section, self.capture_cap) for section in data["sections"]]
        self.send("report", data=data)

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message, when, nodeid, location) -> None:
        if when != "collect":
            self.send("warning", warning=_serialize_warning(warning_message), when=when, nodeid=nodeid,
                      location=location)

    def run_item(self, item: pytest.Item, deadline: float | None) -> None:
        """Run one collected item in this process, inside its container."""
        self.config.pluginmanager.register(self, "isolate-test-reporter")
        hypothesis_support.start_test(self.send)
        _redirect_capture(self.config, self.files["stdout"], self.files["stderr"])
        _use_crash_log(self.config, self.files["crashlog"], deadline)
        if self.config.getoption("capture") == "no":
            sys.stdout = sys.__stdout__
        # Coverage, when the controller measures it: from setup to teardown, sent as an event.
        coverage = coverage_container.start(self.config, item, self.send)
        try:
            self.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
        except pytest.exit.Exception as exc:
            self.send("session_exit", reason=exc.msg, returncode=exc.returncode)
        if coverage is not None:
            coverage.finish()
        faulthandler.cancel_dump_traceback_later()
        sys.stdout.flush()
        sys.stderr.flush()
        # The host takes the end of this process as the end of the test.


def _serialize_warning(warning_message) -> dict:
    category = warning_message.category
    return {
        "message": str(warning_message.message),
        "category_module": getattr(category, "__module__", None),
        "category_name": getattr(category, "__name__", None),
        "filename": str(warning_message.filename),
        "lineno": warning_message.lineno,
    }


def _capped_section(section, cap: int):
    """A report section ``(title, content)`` with its content cut at ``cap`` bytes."""
    try:
        title, content = section
    except (TypeError, ValueError):
        return section
    if isinstance(content, str) and len(content) > cap // 4 and len(content.encode("utf-8", "replace")) > cap:
        data = content.encode("utf-8", "replace")
        content = data[:cap].decode("utf-8", "ignore") + (
            f"\n[pytest-isolate: {len(data) - cap} more bytes left out (output is capped at {cap} "
            "bytes a section; --isolate-capture-limit)]\n")
    return (title, content)


def capture_fds(config: pytest.Config) -> set[int]:
    """The fds pytest's global capture works through (its files and saved targets)."""
    fds: set[int] = set()
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    for part in (getattr(capturing, name, None) for name in ("in_", "out", "err")):
        for attr in ("targetfd_save", "targetfd_invalid"):
            fd = getattr(part, attr, None)
            if isinstance(fd, int):
                fds.add(fd)
        tmpfile = getattr(part, "tmpfile", None)
        try:
            fds.add(tmpfile.fileno())
        except Exception:
            pass
    return fds


def _redirect_capture(config: pytest.Config, out_fd: int, err_fd: int) -> None:
    """Capture into this test's own files (memfds its host reads after a crash),
    instead of the session's capture files, which every test of the host shares:
    what a test leaves running cannot write where the next test's output is read.

    fd 1 and 2 go there too, unless the user asked for no capture (-s): otherwise
    they would be the host's stderr, which is pytest's own output, a file the test
    could write into or truncate. With fd capture, pytest's temporary files are
    pointed at the test's files as well."""
    if config.getoption("capture") == "no":
        return
    capturing = getattr(config.pluginmanager.getplugin("capturemanager"), "_global_capturing", None)
    for part, fd, target in ((getattr(capturing, "out", None), out_fd, 1),
                             (getattr(capturing, "err", None), err_fd, 2)):
        os.dup2(fd, target)
        # pytest keeps fd 1 and 2 as they were (the host's stderr) to restore them
        # and for capsys.disabled(): in the test they lead to its own file too.
        saved = getattr(part, "targetfd_save", None)
        if isinstance(saved, int) and saved > 2:
            os.dup2(fd, saved)
        try:
            tmpfile = part.tmpfile.fileno()
        except Exception:  # not fd capture (--capture=sys): no temporary file
            continue
        os.dup2(fd, tmpfile)


def _use_crash_log(config: pytest.Config, crash_fd: int, deadline: float | None) -> None:
    """Send fatal-error and timeout tracebacks to the host's crash log.

    ``deadline`` is on CLOCK_MONOTONIC, which containers share with the host: the
    timeout counts from the container's start, whatever ran before this point."""
    faulthandler.enable(file=crash_fd, all_threads=True)
    if deadline:
        faulthandler.dump_traceback_later(max(deadline - time.monotonic(), 0.001), file=crash_fd)
    try:  # pytest's own faulthandler_timeout writes there too
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        # pytest's dup of the stderr it started with (in mode "fresh", the host's:
        # pytest's own output) leads to the crash log as well.
        old = config.stash.get(fault_handler_stderr_fd_key, None)
        if isinstance(old, int) and old > 2 and old != crash_fd:
            os.dup2(crash_fd, old)
        else:
            config.stash[fault_handler_stderr_fd_key] = crash_fd
    except Exception:
        pass
