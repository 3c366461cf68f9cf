"""Turning a container's events back into ordinary pytest reports, in the controller.

Reports the container sent are logged as they arrive. If the container did not
finish the test protocol (a signal, ``os._exit``, a timeout, a lost link, a container
that could not be built), the missing phase is reported as a failure through
``pytest_runtest_makereport`` -- so ``xfail`` applies to it as to any failure -- with
the reason, the faulthandler traceback and the output captured before the crash.
"""

from __future__ import annotations

import importlib
import os
import signal
import warnings

import pytest

from .options import Settings


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _warning_message(data: dict) -> warnings.WarningMessage:
    category: type[Warning] = UserWarning
    try:
        found = getattr(importlib.import_module(data["category_module"]), data["category_name"])
        if isinstance(found, type) and issubclass(found, Warning):
            category = found
    except Exception:
        pass
    try:
        message = category(data["message"])
    except Exception:
        category, message = UserWarning, UserWarning(f"{data['category_name']}: {data['message']}")
    return warnings.WarningMessage(message, category, data["filename"], data["lineno"])


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


class Replay:
    def __init__(self, item: pytest.Item, settings: Settings) -> None:
        self.item = item
        self.settings = settings
        self.config = item.config
        self.seen: dict[str, pytest.TestReport] = {}
        self.finished = False
        self.problem: str | None = None  # why the container could not run the test
        self.done: dict = {}
        self.session_exit: dict | None = None  # pytest.exit() inside the container
        self.usage = None  # limits.Usage, set by the controller after "done"
        self.oom: str | None = None  # why, when the OOM killer ended the test

    def handle(self, name: str, data: dict) -> None:
        if name == "report":
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data["data"])
            context = data["data"].get("_subtest.context")
            if context and hasattr(report, "context"):
                # SubtestContext repr()s its kwargs again when deserialised: undo that.
                object.__setattr__(report.context, "kwargs", dict(context["kwargs"]))
            self.seen.setdefault(report.when, report)
            if report.when != "teardown":  # finish() logs it, after the controller's part
                self.item.ihook.pytest_runtest_logreport(report=report)
        elif name == "warning":
            location = data.get("location")
            self.config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
                warning_message=_warning_message(data["warning"]), when=data["when"],
                nodeid=data["nodeid"], location=tuple(location) if location else None,
            ))
        elif name == "testsuite_property":
            self._record_testsuite_property(data["name"], data["value"])
        elif name == "session_exit":
            self.session_exit = data
        elif name == "finished":
            self.finished = True
        elif name == "container_error":
            self.problem = (f"pytest-isolate could not start the test's container "
                            f"(in its {data.get('step', '?')}): {data.get('message')}\n"
                            "Run `python -m pytest_isolate doctor` to see what this machine offers.")
        elif name in ("corrupt", "not_collected"):
            self.problem = f"pytest-isolate: {data.get('message')}"
        elif name == "done":
            self.done = data
            if "not_collected" in data:
                self.problem = (f"pytest-isolate: {self.item.nodeid} was not collected in its "
                                f"container host:\n{data['not_collected']}")

    def _record_testsuite_property(self, name: str, value: object) -> None:
        try:
            from _pytest.junitxml import xml_key
        except ImportError:  # pragma: no cover - a future pytest moved it
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is not None:
            xml.add_global_property(name, value)

    def host_failed(self, message: str) -> None:
        self.problem = f"pytest-isolate: {message}"

    # -- what happened, in words ---------------------------------------------------------

    def _crashed_phase(self) -> str | None:
        setup = self.seen.get("setup")
        if setup is None:
            return "setup"
        if "call" not in self.seen and setup.passed and not self.config.getoption("setuponly", False):
            return "call"
        if "teardown" not in self.seen:
            return "teardown"
        return None

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
        if status is None:
            return f"Crashed: the container ended during {phase} without a status."
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            return f"Crashed: the test's process was killed by signal {number} ({_signal_name(number)}) during {phase}."
        return (f"Crashed: the test's process exited with status {os.WEXITSTATUS(status)} during "
                f"{phase}, before pytest finished the test.")

    # -- reports ---------------------------------------------------------------------------

    def _ensure_xfail_state(self) -> None:
        """The xfail marks of the item, evaluated here as pytest's setup would have."""
        try:
            from _pytest.skipping import evaluate_xfail_marks, xfailed_key
        except ImportError:  # pragma: no cover - a future pytest moved them
            return
        if xfailed_key not in self.item.stash:
            try:
                self.item.stash[xfailed_key] = evaluate_xfail_marks(self.item)
            except Exception:
                pass

    def _report(self, phase: str, error: BaseException | None, sections=()) -> pytest.TestReport:
        def container_phase():  # pytrace=False errors show as their message alone
            if error is not None:
                raise error

        info = pytest.CallInfo.from_call(container_phase, when=phase)
        report = self.item.ihook.pytest_runtest_makereport(item=self.item, call=info)
        report.sections.extend(sections)
        return report

    def finish(self, nextitem: pytest.Item | None) -> None:
        """Report what the container could not, then the teardown, once."""
        if self.session_exit is not None:
            # As in a plain run: pytest.exit() skips the rest of the protocol and
            # ends the session, with its reason and return code.
            raise pytest.exit.Exception(self.session_exit["reason"], self.session_exit["returncode"])
        if not (self.finished or self.done.get("finished")):
            self._report_crash()
        teardown = self.seen.get("teardown") or self._report("teardown", None)
        teardown = self._with_controller_teardown(teardown, nextitem)
        if self.usage is not None:  # junitxml reads properties from the teardown report
            teardown.user_properties = list(teardown.user_properties) + self.usage.properties()
            # The report itself says it for limited tests (and with -vv), so that a
            # plain isolated failure reads exactly as it would without isolation.
            if self.settings.has_cgroup_limits() or self.config.get_verbosity() >= 2:
                teardown.sections.append(("pytest-isolate usage (after teardown)", self.usage.text()))
        self.item.ihook.pytest_runtest_logreport(report=teardown)

    def _report_crash(self) -> None:
        phase = self._crashed_phase()
        if phase is None:
            return  # every phase was reported; the process only failed on its way out
        message = self._reason(phase)
        crashlog = (self.done.get("crashlog") or "").strip()
        if crashlog:
            message += "\n\nfaulthandler traceback:\n" + _test_frames(crashlog)
        sections = [(f"Captured {stream} {phase}", self.done.get(stream) or "")
                    for stream in ("stdout", "stderr") if self.done.get(stream)]
        self._ensure_xfail_state()
        report = self._report(phase, pytest.fail.Exception(message, pytrace=False), sections)
        if phase == "teardown":
            self.seen["teardown"] = report
        else:
            self.item.ihook.pytest_runtest_logreport(report=report)

    def _with_controller_teardown(self, teardown: pytest.TestReport, nextitem) -> pytest.TestReport:
        """Tear down what plain tests set up here and ``nextitem`` does not need.

        The container ran its own setup and teardown; this process only has to keep
        pytest's SetupState in the shape it expects before the next item. An error
        there belongs to this item's teardown, as it would in a plain run.
        """
        setupstate = getattr(self.item.session, "_setupstate", None)
        if setupstate is None or not getattr(setupstate, "stack", True):
            return teardown

        def controller_teardown():
            __tracebackhide__ = True
            setupstate.teardown_exact(nextitem)

        info = pytest.CallInfo.from_call(controller_teardown, when="teardown")
        if info.excinfo is None:
            return teardown
        report = self.item.ihook.pytest_runtest_makereport(item=self.item, call=info)
        if teardown.passed:
            report.sections = teardown.sections + report.sections
            return report
        teardown.sections.append(("teardown in the pytest process", str(report.longrepr)))
        return teardown
