"""Turning what a container sent back into ordinary pytest reports, in the controller.

The test's events are checked as they come (boundary.py) and held; they are acted on
only once the host has seen the test's process end ("done"). The host's own
observations decide how the test ended:

* the process exited with status 0 after reporting every phase: its reports are
  logged, as in a plain run;
* it did not (a signal, ``os._exit``, a timeout, a lost link, a container that could
  not be built): the missing phase -- derived from the reports actually received -- is
  reported as a failure through ``pytest_runtest_makereport``, so ``xfail`` applies to
  it as to any failure, with the reason, the faulthandler traceback and the output
  captured before the crash. A process that dies after reporting a pass crashed;
* it broke the protocol: the test fails with "the test tampered with its report
  channel" and its own reports are dropped.
"""

from __future__ import annotations

import os
import signal

import pytest

from . import boundary, flake, hypothesis_support
from .options import Settings
from .runtime import link


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _test_frames(crashlog: str) -> str:
    """A faulthandler dump without the frames of pytest, pluggy and the runtime."""
    kept = []
    for line in crashlog.splitlines():
        if line.startswith("  File ") and any(p in line for p in ("/_pytest/", "/pluggy/", "/pytest_isolate/")):
            if not kept or kept[-1] != "  ...":
                kept.append("  ...")
            continue
        if line.startswith("  File \"<string>\""):
            continue
        kept.append(line)
    return "\n".join(kept)


# How a refused or unroutable connection, or a failed name lookup, reads in a report.
_NETWORK_SIGNS = ("Connection refused", "[Errno 111]", "Network is unreachable", "[Errno 101]",
                  "Name or service not known", "[Errno -2]", "Temporary failure in name resolution", "[Errno -3]",
                  "ECONNREFUSED", "ENETUNREACH")


def _hint(report: pytest.TestReport, settings: Settings) -> str | None:
    """What to do about a failure that isolation caused, in one line."""
    text = report.longreprtext
    if "Read-only file system" in text or "[Errno 30]" in text:
        return ("The host's directories are read-only in the container (/tmp, /dev/shm and the tmp_path "
                "fixture are writable, and thrown away after the test): write to tmp_path, or mount a "
                'writable directory: @pytest.mark.isolated(mounts=["SRC:DST:rw"]).')
    if any(sign in text for sign in _NETWORK_SIGNS):
        if settings.network == "none":
            return ("The container has no network but its own lo (network='none'): 127.0.0.1 is the container's, "
                    "not this machine's, and nothing else is reachable. Put the test and its servers on a private "
                    "network: @pytest.mark.isolated(network='NAME'), or let it reach a port of this machine: "
                    "allow=['127.0.0.1:PORT'] (see docs/networks.md).")
        return (f"The container is on the private network {settings.network!r}: only that network's containers are "
                "reachable, by the names in its /etc/hosts, and this machine's ports named in allow=[...]; "
                "nothing else is.")
    writable = [m for m in settings.mounts if not m.readonly]
    if writable and ("Permission denied" in text or "[Errno 13]" in text) and os.geteuid() == 0:
        from .runtime import user_ns

        uid = user_ns.host_uid_of_container_root()
        return (f"Container root is host uid {uid} (run as root, the containers' root is unprivileged): a :rw "
                f"mount source must be writable by that uid, e.g. chown {uid} SRC (or run pytest as a user: "
                f"container root is then you). Writable mounts: {', '.join(m.src for m in writable)}.")
    return None


class Replay:
    def __init__(self, item: pytest.Item, settings: Settings, events_cap: int, capture_cap: int,
                 log=None) -> None:
        self.item = item
        # Where the reports go: pytest's logreport, or a run's list (flake.py).
        self.log = log or (lambda report: item.ihook.pytest_runtest_logreport(report=report))
        self.settings = settings
        self.config = item.config
        self.events_cap = events_cap
        self.capture_cap = capture_cap
        self.reader = link.Reader(events_cap)
        self.phases = boundary.Phases()
        self.reports: list[pytest.TestReport] = []
        self.warnings: list[dict] = []
        self.properties: list[tuple[str, object]] = []
        self.tampered: str | None = None  # how the test broke the protocol
        self.problem: str | None = None  # why the container could not run the test
        self.done: dict = {}
        self.session_exit: dict | None = None  # pytest.exit() inside the container
        self.usage = None  # limits.Usage, set by the controller after "done"
        self.oom: str | None = None  # why, when the OOM killer ended the test
        self.hypothesis = hypothesis_support.DatabaseWrites(item)  # its example database's writes
        # Coverage (coverage_support.py): the controller's check when it measures, the checked data.
        self.check_coverage = None
        self.coverage: dict | None = None

    # -- what comes in -----------------------------------------------------------------------

    def host_events(self, data: dict) -> None:
        """What a long test wrote so far."""
        if not isinstance(data["chunk"], bytes):
            raise boundary.Tampering("events that are not bytes")
        self._feed(data["chunk"])

    def host_done(self, data: dict) -> None:
        """What the host saw of the test (its own observations), and the rest of its events."""
        self.done = boundary.check_done(data, self.events_cap, self.capture_cap)
        self._feed(self.done.pop("events"))
        if self.done["tampered"] and not self.tampered:
            self.tampered = self.done["tampered"]

    def _feed(self, chunk: bytes) -> None:
        if self.tampered:
            return
        try:
            for message in self.reader.feed(chunk):
                try:
                    event, data = link.check(message, link.TEST_EVENTS)
                except link.Unexpected as exc:
                    raise boundary.Tampering(f"an unexpected event: {exc}") from None
                getattr(self, "event_" + event)(data)
            if self.reader.problem:
                raise boundary.Tampering(f"its event stream broke: {self.reader.problem}")
        except boundary.Tampering as exc:
            self.tampered = str(exc)
        except RecursionError:
            self.tampered = "a structure nested too deep"

    def event_report(self, data) -> None:
        data = boundary.mapping(data, "a report event").get("data")
        checked = boundary.check_report(data, self.item.nodeid, self.item.location, pytest.TestReport)
        subtest = boundary.is_subtest(checked)
        self.phases.check(checked["when"], checked["outcome"], subtest)
        try:
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=checked)
        except Exception as exc:
            raise boundary.Tampering(f"a report pytest cannot read ({type(exc).__name__})") from None
        if not isinstance(report, pytest.TestReport):
            raise boundary.Tampering("a report pytest cannot read")
        if checked.get("_subtest.context") is not None and hasattr(report, "context"):
            # SubtestContext repr()s its kwargs again when deserialised: undo that.
            kwargs = boundary.mapping(checked["_subtest.context"], "a subtest").get("kwargs") or {}
            object.__setattr__(report.context, "kwargs", dict(boundary.mapping(kwargs, "a subtest's kwargs")))
        # The flakiness figures are the controller's to write (flake.py): a test's own are dropped.
        report.user_properties = [p for p in report.user_properties
                                  if not (isinstance(p, (tuple, list)) and p and str(p[0]).startswith(flake.PREFIX))]
        self.reports.append(report)

    def event_warning(self, data) -> None:
        self.warnings.append(boundary.check_warning(data, self.item.nodeid))

    def event_testsuite_property(self, data) -> None:
        self.properties.append(boundary.check_property(data))

    def event_session_exit(self, data) -> None:
        self.session_exit = boundary.check_session_exit(data)

    def event_coverage(self, data) -> None:
        if self.check_coverage is None or self.coverage is not None:
            raise boundary.Tampering("coverage data that was not asked for")
        self.coverage = self.check_coverage(data)

    def event_container_error(self, data) -> None:
        self._container_error(boundary.check_problem(data, "a container error"))

    def event_hypothesis_write(self, data) -> None:
        self.hypothesis.add(data)

    def event_not_collected(self, data) -> None:
        self.problem = f"pytest-isolate: {boundary.check_problem(data, 'not collected')['message']}"

    def cannot_start(self, message: str, step: str) -> None:
        self._container_error({"message": message, "step": step})

    def _container_error(self, data: dict) -> None:
        self.problem = (f"pytest-isolate could not start the test's container "
                        f"(in its {data['step']}): {data['message']}\n"
                        "Run `python -m pytest_isolate doctor` to see what this machine offers.")

    def host_failed(self, message: str) -> None:
        self.problem = f"pytest-isolate: {message}"

    # -- what happened, in words ---------------------------------------------------------

    def _clean(self) -> bool:
        """The host saw the process exit with status 0, and every phase was reported."""
        return (not self.tampered and not self.problem and self.done.get("status") == 0
                and not self.done.get("timed_out") and self.phases.complete())

    def _reason(self, phase: str) -> str:
        if self.problem:
            return self.problem
        if self.oom:
            return self.oom
        if self.done.get("timed_out"):
            return (f"Timeout: the test ran longer than timeout={self.settings.timeout:g}s "
                    f"(setup, call and teardown together); its container was killed "
                    f"during {phase}.")
        status = self.done.get("status")
        after = " after it had reported it" if phase in self.phases.seen else ""
        if status is None:
            return f"Crashed: the container ended during {phase} without a status."
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            return (f"Crashed: the test's process was killed by signal {number} ({_signal_name(number)}) "
                    f"during {phase}{after}.")
        return (f"Crashed: the test's process exited with status {os.WEXITSTATUS(status)} during "
                f"{phase}{after}, before pytest finished the test.")

    def _crashed_phase(self) -> str:
        """The first phase not reported; when all were, the call (or the teardown
        where there was no call): a process that dies after its reports crashed."""
        seen = self.phases.seen
        if "setup" not in seen:
            return "setup"
        if "call" not in seen and self.phases.setup_passed and not self.config.getoption("setuponly", False):
            return "call"
        if "teardown" not in seen:
            return "teardown"
        return "call" if "call" in seen else "teardown"

    # -- reports ---------------------------------------------------------------------------

    def _ensure_xfail_state(self):
        """The xfail marks of the item, evaluated here as pytest's setup would have."""
        try:
            from _pytest.skipping import evaluate_xfail_marks, xfailed_key
        except ImportError:  # pragma: no cover - a future pytest moved them
            return None
        if xfailed_key not in self.item.stash:
            try:
                self.item.stash[xfailed_key] = evaluate_xfail_marks(self.item)
            except Exception:
                return None
        return self.item.stash[xfailed_key]

    def _unreachable_outcome(self) -> str | None:
        """A call outcome the test could not have had: with a static xfail mark, a
        plain pass (a strict one fails when the test passes)."""
        if self.config.getoption("runxfail", False):
            return None
        xfailed = self._ensure_xfail_state()
        if not xfailed:
            return None
        for report in self.reports:
            if report.when == "call" and report.passed and not boundary.is_subtest(report.__dict__):
                if xfailed.strict or not xfailed.run or not getattr(report, "wasxfail", None):
                    return "a pass that its xfail mark rules out"
        return None

    def _report(self, phase: str, error: BaseException | None, sections=()) -> pytest.TestReport:
        def container_phase():  # pytrace=False errors show as their message alone
            if error is not None:
                raise error

        info = pytest.CallInfo.from_call(container_phase, when=phase)
        report = self.item.ihook.pytest_runtest_makereport(item=self.item, call=info)
        report.sections.extend(sections)
        return report

    def finish(self, nextitem: pytest.Item | None) -> None:
        """Log what the test reported, or what happened instead; the teardown last."""
        if not self.tampered:
            self.tampered = self._unreachable_outcome()
        if not self.tampered:  # written as in a plain run, whatever the outcome
            self.hypothesis.apply()
        for warning in self.warnings:
            self.config.hook.pytest_warning_recorded.call_historic(kwargs=warning)
        for name, value in self.properties:
            self._record_testsuite_property(name, value)
        if self.session_exit is not None and self.done.get("status") == 0 and not self.tampered:
            # As in a plain run: pytest.exit() skips the rest of the protocol and
            # ends the session, with its reason and return code.
            raise pytest.exit.Exception(self.session_exit["reason"], self.session_exit["returncode"])
        if self.tampered:
            teardown = self._report_tampering()
        elif self._clean():
            for report in self.reports[:-1]:
                self._log(report)
            teardown = self.reports[-1]
        else:
            teardown = self._report_crash()
        teardown = with_controller_teardown(self.item, teardown, nextitem)
        if self.usage is not None:  # junitxml reads properties from the teardown report
            teardown.user_properties = list(teardown.user_properties) + self.usage.properties()
            # The report itself says it for limited tests (and with -vv), so that a
            # plain isolated failure reads exactly as it would without isolation.
            if self.settings.has_cgroup_limits() or self.config.get_verbosity() >= 2:
                teardown.sections.append(("pytest-isolate usage (after teardown)", self.usage.text()))
        self._log(teardown)

    def _log(self, report: pytest.TestReport) -> None:
        elapsed = self.done.get("duration")
        if elapsed is not None and report.duration > elapsed:  # a timing claim of the test
            report.duration = elapsed
        if report.failed:
            hint = _hint(report, self.settings)
            if hint:
                report.sections.append(("pytest-isolate hint", hint))
        self.log(report)

    def _report_tampering(self) -> pytest.TestReport:
        message = (f"pytest-isolate: {boundary.TAMPERED}: {self.tampered}. Its container was killed "
                   "and what it reported was dropped.")
        report = self._report("call", pytest.fail.Exception(message, pytrace=False))
        report.outcome = "failed"  # not an xfail: the test broke the protocol, it did not fail
        if hasattr(report, "wasxfail"):
            del report.wasxfail
        report.duration = self.done.get("duration") or 0.0
        setup = self._report("setup", None)
        self._log(setup)
        self._log(report)
        return self._report("teardown", None)

    def _report_crash(self) -> pytest.TestReport:
        phase = self._crashed_phase()
        order = boundary.PHASES.index(phase)
        kept = [r for r in self.reports if boundary.PHASES.index(r.when) < order]
        for report in kept:
            self._log(report)
        message = self._reason(phase)
        crashlog = (self.done.get("crashlog") or "").strip()
        if crashlog:
            message += "\n\nfaulthandler traceback:\n" + _test_frames(crashlog)
        sections = [(f"Captured {stream} {phase}", self.done.get(stream) or "")
                    for stream in ("stdout", "stderr") if self.done.get(stream)]
        self._ensure_xfail_state()
        report = self._report(phase, pytest.fail.Exception(message, pytrace=False), sections)
        report.duration = self.done.get("duration") or 0.0
        if phase == "teardown":
            return report
        self._log(report)
        # junitxml writes a test's <system-out> from its teardown report, which in a
        # plain run carries the sections of every phase.
        return self._report("teardown", None, sections)

    def _record_testsuite_property(self, name: str, value: object) -> None:
        try:
            from _pytest.junitxml import xml_key
        except ImportError:  # pragma: no cover - a future pytest moved it
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is not None:
            xml.add_global_property(name, value)


def with_controller_teardown(item: pytest.Item, teardown: pytest.TestReport, nextitem) -> pytest.TestReport:
    """Tear down what plain tests set up here and ``nextitem`` does not need.

    The container ran its own setup and teardown; this process only has to keep
    pytest's SetupState in the shape it expects before the next item. An error
    there belongs to this item's teardown, as it would in a plain run.
    """
    setupstate = getattr(item.session, "_setupstate", None)
    if setupstate is None or not getattr(setupstate, "stack", True):
        return teardown

    def controller_teardown():
        __tracebackhide__ = True
        setupstate.teardown_exact(nextitem)

    info = pytest.CallInfo.from_call(controller_teardown, when="teardown")
    if info.excinfo is None:
        return teardown
    report = item.ihook.pytest_runtest_makereport(item=item, call=info)
    if teardown.passed:
        report.sections = teardown.sections + report.sections
        return report
    teardown.sections.append(("teardown in the pytest process", str(report.longrepr)))
    return teardown
