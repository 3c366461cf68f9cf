"""The in-container side: runs in the container host, and in each test's container.

Like xdist's ``remote.py`` this module is shipped to the other process by execnet
(``gateway.remote_exec(remote)``) and imports nothing of the plugin: only pytest and
the stdlib-only ``pytest_isolate.runtime``. It speaks small named events:

    controller -> host   ("start", {...})  ("run", {nodeid, container, mode, timeout})
                         ("shutdown", {})
    host -> controller   ("ready", {...}) | ("host_error", {message})
                         per test: ("report", {data}) ("warning", {...})
                         ("container_error", {...}) then ("done", {...})

The host collects the session once. For each test it forks a container
(``runtime.container.start``) whose payload either runs the collected item in the
forked process (mode "fork") or execs a fresh interpreter that collects and runs just
that node id (mode "fresh", see ``fresh_main``). The container writes events to a
pipe; the host relays them over the channel as they arrive.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import time

import pytest

from pytest_isolate.runtime import container, events

HOST_ERROR_ENV = "PYTEST_ISOLATE_HOST_ERROR"
HOST_NOTES_ENV = "PYTEST_ISOLATE_HOST_NOTES"
JOB_ENV = "PYTEST_ISOLATE_JOB"
# How long after the timeout (when faulthandler dumps the stack) the container dies.
KILL_GRACE = 0.25


def quiet_session_output() -> int:
    """The host's own session output (its terminal reporter) goes nowhere, while what
    a test prints to fd 1 without capture (``-s``) reaches stderr, as under xdist.
    Returns the fd the session writes to, which containers must keep."""
    os.dup2(2, 1)
    sys.stdout = open(os.devnull, "w")
    return sys.stdout.fileno()


def make_config(option_dict: dict, args: list[str], workerinput: dict) -> pytest.Config:
    config = pytest.Config.fromdictargs(option_dict, args)
    # Core plugins (junitxml, cacheprovider, stepwise, ...) and many third-party
    # ones skip their session-level side effects in a process that has workerinput:
    # results belong to the controller.
    config.workerinput = workerinput  # type: ignore[attr-defined]
    config.workeroutput = {}  # type: ignore[attr-defined]
    return config


def serialize_warning(warning_message) -> dict:
    message = warning_message.message
    category = warning_message.category
    return {
        "message": str(message),
        "category_module": getattr(category, "__module__", None),
        "category_name": getattr(category, "__name__", None),
        "filename": str(warning_message.filename),
        "lineno": warning_message.lineno,
    }


def _capture_fds(config: pytest.Config) -> set[int]:
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


def _use_crash_log(config: pytest.Config, crash_fd: int, timeout: float | None) -> None:
    """Send fatal-error and timeout tracebacks to the host's crash log."""
    faulthandler.enable(file=crash_fd, all_threads=True)
    if timeout:
        faulthandler.dump_traceback_later(timeout, file=crash_fd)
    try:  # pytest's own faulthandler_timeout writes there too
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        config.stash[fault_handler_stderr_fd_key] = crash_fd
    except Exception:
        pass


class ContainerReporter:
    """Forwards reports and warnings to the host, from inside a test's container."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.event_fd: int | None = None  # set only in a container

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.event_fd is not None:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            events.send(self.event_fd, "report", {"data": data})

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message, when, nodeid, location) -> None:
        if self.event_fd is not None and when != "collect":
            events.send(self.event_fd, "warning", {
                "warning": serialize_warning(warning_message), "when": when,
                "nodeid": nodeid, "location": location,
            })

    def run_item(self, item: pytest.Item, event_fd: int, crash_fd: int, timeout) -> None:
        """The payload of a container in mode "fork": run one collected item here."""
        self.event_fd = event_fd
        _use_crash_log(self.config, crash_fd, timeout)
        if self.config.getoption("capture") == "no":
            sys.stdout = sys.__stdout__
        self.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
        events.send(event_fd, "finished", {})
        sys.stdout.flush()
        sys.stderr.flush()


class Host(ContainerReporter):
    """The container host's session: collects once, then forks a container per test."""

    def __init__(self, config: pytest.Config, channel, start: dict) -> None:
        super().__init__(config)
        self.channel = channel
        self.start = start
        self.items: dict[str, pytest.Item] = {}
        self.collect_errors: list[str] = []
        self.started = time.perf_counter()
        self.crash_fd = os.memfd_create("pytest-isolate-crashlog", 0)

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext}")

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = {item.nodeid: item for item in session.items}
        self.channel.send(("ready", {
            "collected": len(self.items), "pid": os.getpid(),
            "seconds": time.perf_counter() - self.started,
            "notes": json.loads(os.environ.pop(HOST_NOTES_ENV, "[]")),
        }))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        # Every container is forked from here: move what collection built out of the
        # collector's reach, or the first gc in each child copies the whole heap.
        gc.collect()
        gc.freeze()
        while True:
            name, kwargs = self.channel.receive()
            if name != "run":
                return True
            self.run(**kwargs)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session):
        if not self.start["collect"]:  # mode "fresh": every test collects for itself
            session.items = []
            self.pytest_collection_finish(session)
            return True
        return None

    def run(self, nodeid: str, container_config: dict, mode: str, timeout, fresh_arg: str) -> None:
        item = self.items.get(nodeid)
        if item is None and mode == "fork":
            why = "\n".join(self.collect_errors) or "it was not collected there"
            self.channel.send(("done", {"not_collected": why}))
            return
        capman = self.config.pluginmanager.getplugin("capturemanager")
        capturing = capman is not None and capman.is_globally_capturing()
        if capturing:
            capman.read_global_capture()  # start from an empty capture file
        os.ftruncate(self.crash_fd, 0)
        os.lseek(self.crash_fd, 0, os.SEEK_SET)  # the container writes at this offset
        event_r, event_w = os.pipe2(os.O_CLOEXEC)
        config = dict(container_config, entries=self.start["entries"])
        if mode == "fresh":
            payload = self._fresh_payload(nodeid, fresh_arg, event_w, timeout)
        else:
            payload = lambda: self.run_item(item, event_w, self.crash_fd, timeout)  # noqa: E731
        started = time.perf_counter()
        keep = _capture_fds(self.config) | {self.crash_fd, self.start["session_output_fd"]}
        keeper = container.start(config, payload, event_w, keep)
        os.close(event_w)
        supervisor = container.Supervisor(keeper, event_r, timeout and timeout + KILL_GRACE)
        finished = False
        out = err = ""
        for name, data in supervisor.events():
            finished = finished or name == "finished"
            if name == "crash_output":  # mode "fresh" read it for us
                out, err = data["stdout"], data["stderr"]
                continue
            self.channel.send((name, data))
        if capturing and not finished and mode == "fork":
            out, err = capman.read_global_capture()
        self.channel.send(("done", {
            "status": supervisor.exit_status, "timed_out": supervisor.timed_out,
            "finished": finished, "stdout": out, "stderr": err,
            "crashlog": os.pread(self.crash_fd, 1 << 20, 0).decode("utf-8", "replace"),
            "duration": time.perf_counter() - started,
        }))

    def _fresh_payload(self, nodeid: str, fresh_arg: str, event_w: int, timeout):
        job = {
            "option_dict": self.start["option_dict"], "workerinput": self.start["workerinput"],
            "sys_path": self.start["sys_path"], "args": [fresh_arg],
            "nodeid": nodeid, "event_fd": event_w, "crash_fd": self.crash_fd, "timeout": timeout,
        }

        def exec_fresh_interpreter() -> None:
            os.set_inheritable(event_w, True)
            os.set_inheritable(self.crash_fd, True)
            os.environ[JOB_ENV] = json.dumps(job)
            boot = "from pytest_isolate.remote import fresh_main; fresh_main()"
            os.execv(sys.executable, [sys.executable, "-c", boot])

        return exec_fresh_interpreter


class FreshRunner(ContainerReporter):
    """Mode "fresh": a new interpreter that collects and runs a single node id."""

    def __init__(self, config: pytest.Config, job: dict) -> None:
        super().__init__(config)
        self.job = job

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        job = self.job
        items = [i for i in session.items if i.nodeid == job["nodeid"]]
        if not items:
            events.send(job["event_fd"], "not_collected", {"message": "not collected by a fresh pytest"})
            return True
        # The item runs in a child, so that if it crashes this process can still read
        # what it printed (pytest's capture files are shared across fork) and pass it
        # on, as the host does in mode "fork"; then it ends the same way.
        capman = self.config.pluginmanager.getplugin("capturemanager")
        capturing = capman is not None and capman.is_globally_capturing()
        child = os.fork()
        if child == 0:
            try:
                self.run_item(items[0], job["event_fd"], job["crash_fd"], job["timeout"])
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        if capturing:
            out, err = capman.read_global_capture()
            if out or err:
                events.send(job["event_fd"], "crash_output", {"stdout": out, "stderr": err})
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))


def fresh_main() -> None:
    job = json.loads(os.environ.pop(JOB_ENV))
    sys.path[:] = job["sys_path"]
    quiet_session_output()
    config = make_config(job["option_dict"], job["args"], job["workerinput"])
    config.pluginmanager.register(FreshRunner(config, job), "isolate-fresh")
    config.hook.pytest_cmdline_main(config=config)
    os._exit(0)


def serve(channel) -> None:
    error = os.environ.pop(HOST_ERROR_ENV, None)
    if error:
        channel.send(("host_error", {"message": error}))
        return
    name, start = channel.receive()
    sys.path[:] = start["sys_path"]
    start["session_output_fd"] = quiet_session_output()
    config = make_config(start["option_dict"], start["args"], start["workerinput"])
    config.pluginmanager.register(Host(config, channel, start), "isolate-host")
    config.hook.pytest_cmdline_main(config=config)


if __name__ == "__channelexec__":
    serve(channel)  # type: ignore[name-defined]  # noqa: F821
