"""The in-container side: runs in the container host, and in each test's container.

Like xdist's ``remote.py`` this module is shipped to the other process by execnet
(``gateway.remote_exec(remote)``) and imports nothing of the plugin: only pytest and
the stdlib-only ``pytest_isolate.runtime``. It speaks small named events:

    controller -> host   ("start", {...})   ("shutdown", {})   ("zygote", {})
                         ("run", marshal{nodeid, mode, timeout, container_config, ...})
    host -> controller   ("ready", {...}) | ("host_error", {message})
                         ("zygote", {pid}): the limits zygote, for cgroup.procs
                         per test, what a long test wrote so far (every 0.25 s):
                           ("events", bytes)
                         then ("done", {status, timed_out, tampered, stdout, stderr,
                         crashlog, duration, rusage, events: bytes, the rest})

What a test writes (its events, its captured output, its crash log) is untrusted:
the host does not decode it, it only reads it within caps and passes the bytes on;
the controller checks them (boundary.py). A test's events are ("report", {data}),
("warning", {...}), ("testsuite_property", {...}), ("session_exit", {...}), or why
it could not run: ("container_error", {...}), ("not_collected", {...}).

The host collects the session once. For each test it takes a container that the
init factory built ahead (runtime/factory.py) and has its zygote fork the test into
it (runtime.container.fork_test). The payload either runs the collected item in the
forked process (mode "fork") or execs a fresh interpreter that collects and runs just
that node id (mode "fresh", see fresh.py). The test is over when its process has
ended (runtime/supervisor.py).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import marshal
import os
import socket
import sys
import time

import pytest

from pytest_isolate.runtime import events, factory, hugepages, rootfs
from pytest_isolate.runtime import pipeline as pipeline_module
from pytest_isolate.runtime import process
from pytest_isolate.runtime.supervisor import Supervisor, read_capped
from pytest_isolate.runtime.container import MOUNTS_UNLOCKED_ENV
from pytest_isolate.runtime.launch import FACTORY_FD_ENV, HOST_ERROR_ENV, HOST_NOTES_ENV
from pytest_isolate.runtime import zygote as zygote_module

JOB_ENV = "PYTEST_ISOLATE_JOB"
DEFAULT_CAPTURE_CAP = 8 << 20
CRASHLOG_CAP = 1 << 20
# How long after the timeout (when faulthandler dumps the stack) the container dies.
KILL_GRACE = 0.25


def quiet_session_output() -> int:
    """The host's own session output (its terminal reporter) goes nowhere, while what
    a test prints to fd 1 without capture (``-s``) reaches stderr, as under xdist.
    Returns the fd the session writes to, which containers must keep."""
    os.dup2(2, 1)
    sys.stdout = open(os.devnull, "w")
    return sys.stdout.fileno()


def _resident_bytes() -> int | None:
    """This process's resident memory (VmRSS): what every fork of it maps."""
    rss = process.status_field("VmRSS")  # ["38212", "kB"]
    return int(rss[0]) * 1024 if rss else None


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


def redirect_capture(config: pytest.Config, out_fd: int, err_fd: int) -> None:
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


class ContainerReporter:
    """Forwards reports and warnings to the host, from inside a test's container."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.event_fd: int | None = None  # set only in a container
        self.capture_cap = DEFAULT_CAPTURE_CAP

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.event_fd is not None:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            if isinstance(data, dict) and isinstance(data.get("sections"), list):
                data["sections"] = [_capped_section(section, self.capture_cap) for section in data["sections"]]
            events.send(self.event_fd, "report", {"data": data})

    @pytest.fixture
    def record_testsuite_property(self):
        """Replaces junitxml's fixture inside containers: the property goes to the
        controller, which writes the XML (here it would be dropped)."""

        def record(name: str, value: object) -> None:
            __tracebackhide__ = True
            if not isinstance(name, str):
                raise TypeError(f"name parameter needs to be a string, but {type(name).__name__} given")
            if self.event_fd is not None:
                events.send(self.event_fd, "testsuite_property", {"name": name, "value": value})

        return record

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message, when, nodeid, location) -> None:
        if self.event_fd is not None and when != "collect":
            events.send(self.event_fd, "warning", {
                "warning": serialize_warning(warning_message), "when": when,
                "nodeid": nodeid, "location": location,
            })

    def run_item(self, item: pytest.Item, files: dict, deadline, capture_cap: int) -> None:
        """Run one collected item in this process, inside its container. ``files``:
        the test's own fds ("events", "stdout", "stderr", "crashlog")."""
        self.event_fd = files["events"]
        self.capture_cap = capture_cap
        redirect_capture(self.config, files["stdout"], files["stderr"])
        _use_crash_log(self.config, files["crashlog"], deadline)
        if self.config.getoption("capture") == "no":
            sys.stdout = sys.__stdout__
        try:
            self.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
        except pytest.exit.Exception as exc:
            events.send(self.event_fd, "session_exit", {"reason": exc.msg, "returncode": exc.returncode})
        faulthandler.cancel_dump_traceback_later()
        sys.stdout.flush()
        sys.stderr.flush()
        # The host takes the end of this process as the end of the test.


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


class Host(ContainerReporter):
    """The container host's session: collects once, then forks a container per test."""

    def __init__(self, config: pytest.Config, channel, start: dict) -> None:
        super().__init__(config)
        self.channel = channel
        self.start = start
        self.items: dict[str, pytest.Item] = {}
        self.collect_errors: list[str] = []
        self.started = time.perf_counter()
        self._seccomp_programs: dict = {}
        self._zygote: zygote_module.Zygote | None = None
        self._limits_zygote: zygote_module.Zygote | None = None
        self._pipeline: pipeline_module.Pipeline | None = None
        self._masks: list | None = None
        self._session_fds: set[int] | None = None

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext}")

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = {item.nodeid: item for item in session.items}
        self.channel.send(("ready", {
            "collected": len(self.items), "host_pid": process.outer_pid(), "rss": _resident_bytes(),
            "seconds": time.perf_counter() - self.started,
            "notes": json.loads(os.environ.pop(HOST_NOTES_ENV, "[]")),
        }))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        # Every container is forked from here: move what collection built out of the
        # collector's reach, or the first gc in each child copies the whole heap ...
        gc.collect()
        gc.freeze()
        # ... and map it with huge pages: forks of a big session then cost little more
        # than forks of a small one (runtime/hugepages.py).
        hugepages.collapse()
        while True:
            name, kwargs = self.channel.receive()
            if name == "zygote":  # the controller puts it into the limits cgroup
                self.channel.send(("zygote", {"pid": self.limits_zygote.pid}))
            elif name == "run":
                self.run(**marshal.loads(kwargs))
            else:
                if self._pipeline is not None:
                    self._pipeline.shutdown()
                return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session):
        if not self.start["collect"]:  # mode "fresh": every test collects for itself
            session.items = []
            self.pytest_collection_finish(session)
            return True
        return None

    def seccomp_programs(self, profile: dict | None, caps: tuple[str, ...]) -> tuple[bytes, ...]:
        """Compiled once per profile and capability set, loaded by every container."""
        if profile is None:
            return ()
        key = (json.dumps(profile, sort_keys=True), caps)
        if key not in self._seccomp_programs:
            from pytest_isolate.runtime import seccomp, seccomp_default

            if profile:
                programs = (seccomp.compile_profile(profile, set(caps)),)
            else:
                programs = (seccomp.compile_profile(seccomp_default.default_profile(), set(caps)),
                            seccomp.argument_filter(seccomp_default.TERMINAL_INJECTION))
            self._seccomp_programs[key] = programs
        return self._seccomp_programs[key]

    def run(self, nodeid: str, container_config: dict, mode: str, timeout, fresh_arg: str,
            seccomp: dict | None, in_zygote: bool = False, events_cap: int = events.DEFAULT_STREAM_CAP,
            capture_cap: int = DEFAULT_CAPTURE_CAP) -> None:
        if nodeid not in self.items and mode == "fork":
            why = "\n".join(self.collect_errors) or "it was not collected there"
            self.channel.send(("done", {"not_collected": why[:CRASHLOG_CAP]}))
            return
        unlocked = os.environ.get(MOUNTS_UNLOCKED_ENV)
        if unlocked and "CAP_SYS_ADMIN" in container_config["cap_add"]:
            self._cannot_start(f"cap_add=SYS_ADMIN is refused here: the image's mounts could not be locked "
                               f"({unlocked}), so the test could make them writable", "mount locking")
            return
        try:
            programs = self.seccomp_programs(seccomp, tuple(container_config["cap_add"]))
        except Exception as exc:  # e.g. no libseccomp: this test errors, the host lives on
            self._cannot_start(str(exc), "seccomp profile")
            return
        request = {"mode": mode, "config": dict(container_config, seccomp_programs=programs, masks=self.masks,
                                                entries=self.start["entries"])}
        started = time.perf_counter()
        # Limited tests are forked by the zygote in their cgroup and waited for to the
        # end: the next one must not share its limits with this one's leftovers.
        zygote = self.limits_zygote if in_zygote else self.zygote
        try:
            test = self.pipeline.take(request, zygote)
        except (OSError, factory.InitError) as exc:
            self._cannot_start(str(exc), getattr(exc, "step", "start"))
            return
        deadline = time.monotonic() + timeout if timeout else None
        test.go({"nodeid": nodeid, "fresh_arg": fresh_arg, "deadline": deadline, "capture_cap": capture_cap})
        if not in_zygote:
            self.pipeline.prepare_next(request, zygote)  # while this test runs
        supervisor = Supervisor(test.test_pidfd, test.events_fd, deadline and deadline + KILL_GRACE,
                                kill=test.namespaces.end, cap=events_cap,
                                relay=lambda chunk: self.channel.send(("events", chunk)))
        rest = supervisor.wait()
        os.close(test.test_pidfd)
        test.test_pidfd = -1
        status, rusage = zygote.reap(test.test)
        clean = status == 0 and not supervisor.timed_out and supervisor.tampered is None
        # The kernel tears the rest down, off our path; but what a test that did not
        # end cleanly left (or a limited test, whose cgroup the next one uses) must
        # be gone before the next test starts.
        test.namespaces.end(wait=0 if clean and not in_zygote else 5)
        done = {
            "status": status, "timed_out": supervisor.timed_out, "tampered": supervisor.tampered,
            "stdout": read_capped(test.file("pytest-isolate-stdout"), capture_cap, "captured stdout"),
            "stderr": read_capped(test.file("pytest-isolate-stderr"), capture_cap, "captured stderr"),
            "crashlog": "" if clean else read_capped(test.file("pytest-isolate-crashlog"), CRASHLOG_CAP, "the crash log"),
            "rusage": rusage, "duration": time.perf_counter() - started, "events": rest,
        }
        test.close_files()
        self.channel.send(("done", done))

    def _cannot_start(self, message: str, step: str) -> None:
        self.channel.send(("done", {"status": None, "container_error": {"message": message[:CRASHLOG_CAP],
                                                                        "step": step}}))

    @property
    def pipeline(self) -> pipeline_module.Pipeline:
        if self._pipeline is None:
            link = socket.socket(fileno=int(os.environ.pop(FACTORY_FD_ENV)))
            self._pipeline = pipeline_module.Pipeline(factory.InitFactory(link))
        return self._pipeline

    @property
    def masks(self) -> list:
        if self._masks is None:
            self._masks = rootfs.system_path_masks()
        return self._masks

    def prepare(self, request: dict, fds: list[int]) -> tuple:
        """What container.fork_test needs for ``request`` (here or in the zygote):
        ``(config, payload, event_fd, keep_fds)``; ``fds`` start with the test's own
        files: events, then pipeline.CAPTURE_FILES."""
        files = dict(zip(("events", "stdout", "stderr", "crashlog"), fds[:4]))
        if self._session_fds is None:  # pytest's capture files stay the same all session
            self._session_fds = _capture_fds(self.config) | {self.start["session_output_fd"]}
        keep = self._session_fds | set(files.values())
        if request["mode"] == "fresh":
            payload = self._fresh_payload(files)
        else:
            def payload(job: dict) -> None:
                self.run_item(self.items[job["nodeid"]], files, job["deadline"], job["capture_cap"])
        return request["config"], payload, files["events"], keep

    @property
    def zygote(self) -> zygote_module.Zygote:
        """Forks the tests (see runtime/zygote.py); forked after gc.freeze()."""
        if self._zygote is None:
            self._zygote = zygote_module.Zygote(self.prepare)
        return self._zygote

    @property
    def limits_zygote(self) -> zygote_module.Zygote:
        """Forks the limited tests, from inside the limits cgroup."""
        if self._limits_zygote is None:
            self._limits_zygote = zygote_module.Zygote(self.prepare)
        return self._limits_zygote

    def _fresh_payload(self, files: dict):
        def exec_fresh_interpreter(job: dict) -> None:
            job = dict(job, files=files, option_dict=self.start["option_dict"], workerinput=self.start["workerinput"],
                       sys_path=self.start["sys_path"], argv=self.start["argv"], args=[job["fresh_arg"]])
            for fd in files.values():
                os.set_inheritable(fd, True)
            os.environ[JOB_ENV] = json.dumps(job)
            boot = "from pytest_isolate.fresh import main; main()"
            os.execv(sys.executable, [sys.executable, "-c", boot])

        return exec_fresh_interpreter


def serve(channel) -> None:
    error = os.environ.pop(HOST_ERROR_ENV, None)
    if error:
        channel.send(("host_error", {"message": error}))
        return
    name, start = channel.receive()
    try:
        sys.path[:] = start["sys_path"]
        sys.argv[:] = start["argv"]  # e.g. doctest.testmod() reads '-v' from it
        start["session_output_fd"] = quiet_session_output()
        config = make_config(start["option_dict"], start["args"], start["workerinput"])
        config.pluginmanager.register(Host(config, channel, start), "isolate-host")
    except Exception as exc:  # e.g. the project's pytest.toml unreadable in the image
        channel.send(("host_error", {"message": _start_failure(exc)}))
        return
    config.hook.pytest_cmdline_main(config=config)


def _start_failure(exc: Exception) -> str:
    """Why pytest could not start in the host, with what the stage noted (a bind that
    could not be idmapped explains most permission errors)."""
    message = process.describe_error(exc)
    if isinstance(exc, OSError) and exc.filename:
        message += f": {exc.filename}"
    notes = json.loads(os.environ.get(HOST_NOTES_ENV, "[]"))
    return "; ".join([f"pytest could not start there ({message})"] + notes)


if __name__ == "__channelexec__":
    serve(channel)  # type: ignore[name-defined]  # noqa: F821
