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

    def handle(self, name: str, data: dict) -> None:
        if name == "report":
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data["data"])
            context = data["data"].get("_subtest.context")
            if context and hasattr(report, "context"):
                # SubtestContext repr()s its kwargs again when deserialised: undo that.
                object.__setattr__(report.context, "kwargs", dict(context["kwargs"]))
            self.seen.setdefault(report.when, report)
            self.item.ihook.pytest_runtest_logreport(report=report)
        elif name == "warning":
            location = data.get("location")
            self.config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
                warning_message=_warning_message(data["warning"]), when=data["when"],
                nodeid=data["nodeid"], location=tuple(location) if location else None,
            ))
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

    def _log(self, phase: str, error: BaseException | None, sections=()) -> None:
        def call():
            if error is not None:
                raise error

        info = pytest.CallInfo.from_call(call, when=phase)
        report = self.item.ihook.pytest_runtest_makereport(item=self.item, call=info)
        report.sections.extend(sections)
        self.item.ihook.pytest_runtest_logreport(report=report)

    def finish(self) -> None:
        if self.finished or self.done.get("finished"):
            return
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
        self._log(phase, pytest.fail.Exception(message, pytrace=False), sections)
        if phase != "teardown":
            self._log("teardown", None)

    def teardown_controller_side(self, nextitem: pytest.Item | None) -> None:
        """Tear down what plain tests set up here and ``nextitem`` does not need.

        The container ran its own setup and teardown; this process only has to keep
        its SetupState in the shape pytest expects before the next item.
        """
        setupstate = getattr(self.item.session, "_setupstate", None)
        if setupstate is None or not getattr(setupstate, "stack", True):
            return
        info = pytest.CallInfo.from_call(lambda: setupstate.teardown_exact(nextitem), when="teardown")
        if info.excinfo is not None:
            report = self.item.ihook.pytest_runtest_makereport(item=self.item, call=info)
            self.item.ihook.pytest_runtest_logreport(report=report)
