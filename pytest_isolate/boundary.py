"""The trust boundary: what comes back from a container, checked before the
controller acts on it.

A test is hostile code, and so is a container host, which imports the test modules
to collect them. So everything they send is untrusted input: the events a test
wrote (runtime/link.py decodes them, safely, within a cap), and the messages of
its host. This module checks each: its type, its fields, their sizes; and that the
reports are for the running item, in phase order, each phase once. Nothing is ever
imported, unpickled or evaluated because a container said so.

A violation raises ``Tampering``: the test fails with "the test tampered with its
report channel", its container is gone, and the run goes on.
"""

from __future__ import annotations

import builtins
import math
import sys
import types
import warnings
from typing import Any

TAMPERED = "the test tampered with its report channel"
MAX_TEXT = 16 << 20  # a report's longest string (a traceback, captured output)
MAX_NAME = 4096  # names, paths, reasons
PHASES = ("setup", "call", "teardown")
OUTCOMES = ("passed", "failed", "skipped")


class Tampering(Exception):
    """What came back breaks the protocol; the message says how."""


# -- values ------------------------------------------------------------------------------

def text(value: Any, what: str, cap: int = MAX_NAME, none: bool = False) -> str | None:
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise Tampering(f"{what} is not a string")
    if len(value) > cap:
        raise Tampering(f"{what} is longer than {cap} characters")
    return value


def integer(value: Any, what: str, low: int, high: int, none: bool = False) -> int | None:
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Tampering(f"{what} is not an integer from {low} to {high}")
    return value


def number(value: Any, what: str, none: bool = False) -> float | None:
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Tampering(f"{what} is not a finite number")
    return float(value)


def mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise Tampering(f"{what} is not a mapping")
    return value


def sequence(value: Any, what: str, length: int | None = None) -> list:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise Tampering(f"{what} is not a list" + (f" of {length}" if length is not None else ""))
    return list(value)


def strings(value: Any, what: str, cap: int = MAX_TEXT) -> list[str]:
    return [text(v, what, cap) for v in sequence(value, what)]


# -- reports -------------------------------------------------------------------------------

_FILE_LOCATION = {"path": str, "lineno": int, "message": str}


def _file_location(value: Any, what: str) -> None:
    value = mapping(value, what)
    if set(value) != set(_FILE_LOCATION):
        raise Tampering(f"{what} has unexpected fields")
    text(value["path"], f"{what}.path", MAX_TEXT)
    integer(value["lineno"], f"{what}.lineno", -1, 1 << 31)
    text(value["message"], f"{what}.message", MAX_TEXT)


def _repr_traceback(value: Any, what: str) -> None:
    value = mapping(value, what)
    if set(value) - {"reprentries", "extraline", "style"}:
        raise Tampering(f"{what} has unexpected fields")
    text(value.get("extraline"), f"{what}.extraline", MAX_TEXT, none=True)
    text(value.get("style"), f"{what}.style", none=True)
    for entry in sequence(value.get("reprentries"), f"{what}.reprentries"):
        entry = mapping(entry, f"{what} entry")
        data = mapping(entry.get("data"), f"{what} entry data")
        strings(data.get("lines"), f"{what} entry lines")
        if entry.get("type") == "ReprEntryNative":
            if set(data) - {"lines", "style"}:
                raise Tampering(f"{what} entry has unexpected fields")
            continue
        if entry.get("type") != "ReprEntry":
            raise Tampering(f"{what} entry of an unknown type")
        if set(data) - {"lines", "reprfuncargs", "reprlocals", "reprfileloc", "style"}:
            raise Tampering(f"{what} entry has unexpected fields")
        text(data.get("style"), f"{what} entry style")
        if data.get("reprfileloc"):
            _file_location(data["reprfileloc"], f"{what} entry location")
        if data.get("reprlocals"):
            locals_ = mapping(data["reprlocals"], f"{what} entry locals")
            if set(locals_) != {"lines"}:
                raise Tampering(f"{what} entry locals have unexpected fields")
            strings(locals_["lines"], f"{what} entry locals")
        if data.get("reprfuncargs"):
            funcargs = mapping(data["reprfuncargs"], f"{what} entry arguments")
            if set(funcargs) != {"args"}:
                raise Tampering(f"{what} entry arguments have unexpected fields")
            for pair in sequence(funcargs["args"], f"{what} entry arguments"):
                name, shown = sequence(pair, f"{what} entry argument", 2)
                text(name, f"{what} entry argument")
                text(shown, f"{what} entry argument", MAX_TEXT)


def _longrepr(value: Any) -> Any:
    """A report's longrepr: None, a string, a skip's (path, lineno, reason), or an
    exception's serialised form; returned in the shape pytest's deserialiser wants."""
    if value is None or isinstance(value, str):
        return text(value, "longrepr", MAX_TEXT, none=True)
    if isinstance(value, list):
        path, lineno, reason = sequence(value, "longrepr", 3)
        return (text(path, "longrepr path", MAX_TEXT), integer(lineno, "longrepr line", -1, 1 << 31, none=True),
                text(reason, "longrepr reason", MAX_TEXT))
    value = mapping(value, "longrepr")
    if set(value) - {"reprcrash", "reprtraceback", "sections", "chain"}:
        raise Tampering("longrepr has unexpected fields")
    if value.get("reprcrash") is not None:
        _file_location(value["reprcrash"], "longrepr.reprcrash")
    _repr_traceback(value.get("reprtraceback"), "longrepr.reprtraceback")
    for section in sequence(value.get("sections", []), "longrepr.sections"):
        for part in sequence(section, "longrepr section", 3):
            text(part, "longrepr section", MAX_TEXT)
    if value.get("chain") is not None:
        for link in sequence(value["chain"], "longrepr.chain"):
            traceback, crash, description = sequence(link, "longrepr chain link", 3)
            _repr_traceback(traceback, "longrepr chain traceback")
            if crash is not None:
                _file_location(crash, "longrepr chain crash")
            text(description, "longrepr chain description", MAX_TEXT, none=True)
    return value


def check_report(data: Any, item_nodeid: str, item_location: tuple, report_class: type) -> dict:
    """A serialised TestReport of the running item, checked field by field and
    returned as pytest_report_from_serializable takes it (tuples where pytest
    expects tuples: JSON has none)."""
    data = mapping(data, "a report")
    if data.get("nodeid") != item_nodeid:
        raise Tampering(f"a report for another test ({str(data.get('nodeid'))[:200]!r})")
    when = data.get("when")
    if when not in PHASES:
        raise Tampering(f"a report for an unknown phase {str(when)[:40]!r}")
    outcome = data.get("outcome")
    if outcome not in OUTCOMES + ("rerun",):
        raise Tampering(f"a report with an unknown outcome {str(outcome)[:40]!r}")
    checked: dict[str, Any] = {"nodeid": item_nodeid, "when": when, "outcome": outcome,
                               "location": tuple(item_location)}
    checked["longrepr"] = _longrepr(data.get("longrepr"))
    keywords = mapping(data.get("keywords", {}), "keywords")
    checked["keywords"] = {text(k, "a keyword"): 1 for k in keywords}
    checked["sections"] = [tuple(text(part, "a report section", MAX_TEXT) for part in sequence(s, "a section", 2))
                           for s in sequence(data.get("sections", []), "sections")]
    checked["user_properties"] = [(text(name, "a user property name"), value) for name, value in
                                  (sequence(p, "a user property", 2) for p in
                                   sequence(data.get("user_properties", []), "user_properties"))]
    for key in ("duration", "start", "stop"):
        checked[key] = max(number(data.get(key, 0.0), key), 0.0)
    for key, value in data.items():
        if key in checked or key in ("location", "$report_type"):
            continue
        # Reports may carry a plugin's extra attributes, but none that would shadow
        # what the report class has (a method, a property): pytest calls those.
        if not isinstance(key, str) or key.startswith("__") or hasattr(report_class, key):
            raise Tampering(f"a report with the field {str(key)[:80]!r}")
        checked[key] = value
    if "wasxfail" in checked:
        text(checked["wasxfail"], "wasxfail", MAX_TEXT)
    if "$report_type" in data:
        checked["$report_type"] = text(data["$report_type"], "$report_type")
    return checked


def is_subtest(data: dict) -> bool:
    return "_subtest.context" in data or "_report_type" in data


class Phases:
    """The order reports must come in: setup, call (when setup passed), teardown;
    subtests during the call; a rerun (pytest-rerunfailures) starts again."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.setup_passed = False

    def check(self, when: str, outcome: str, subtest: bool) -> None:
        if self.seen and self.seen[-1] == "teardown":
            raise Tampering(f"a {when} report after the teardown")
        if subtest:
            if when != "call" or self.seen != ["setup"] or not self.setup_passed:
                raise Tampering(f"a subtest report during {when}")
            return
        expected = "setup" if not self.seen else "call" if self.seen == ["setup"] and self.setup_passed else "teardown"
        if when != expected and not (when == "teardown" and self.seen == ["setup"]):
            raise Tampering(f"a {when} report where a {expected} report was due")
        if outcome == "rerun":
            self.seen, self.setup_passed = [], False
            return
        self.seen.append(when)
        if when == "setup":
            self.setup_passed = outcome == "passed"

    def complete(self) -> bool:
        return bool(self.seen) and self.seen[-1] == "teardown"


# -- warnings ------------------------------------------------------------------------------

def warning_category(module: Any, name: Any) -> type[Warning] | None:
    """A warning class named by a container: a builtin, or a class of a module this
    process has already imported. Never imports anything."""
    if not isinstance(name, str) or not isinstance(module, str):
        return None
    # The module's own namespace, not getattr(): a module-level __getattr__ (a lazy
    # loader) would import on the container's word.
    holder = builtins if module == "builtins" else sys.modules.get(module)
    found = holder.__dict__.get(name) if isinstance(holder, types.ModuleType) else None
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    return None


def check_warning(data: Any, item_nodeid: str) -> dict:
    data = mapping(data, "a warning")
    if data.get("nodeid") != item_nodeid:
        raise Tampering("a warning for another test")
    when = data.get("when")
    if when not in ("config", "collect", "runtest"):
        raise Tampering("a warning of an unknown phase")
    message = mapping(data.get("warning"), "a warning")
    text(message.get("message"), "a warning's message", MAX_TEXT)
    text(message.get("filename"), "a warning's file", MAX_TEXT)
    integer(message.get("lineno"), "a warning's line", -1, 1 << 31, none=True)
    module = text(message.get("category_module"), "a warning's category", none=True)
    name = text(message.get("category_name"), "a warning's category", none=True)
    category = warning_category(module, name) or UserWarning
    try:
        shown = category(message["message"])
    except Exception:
        category, shown = UserWarning, None
    if shown is None or (category is UserWarning and name not in (None, "UserWarning")):
        shown = UserWarning(f"{module}.{name}: {message['message']}")
    location = data.get("location")
    if location is not None:
        path, lineno, domain = sequence(location, "a warning's location", 3)
        location = (text(path, "a warning's location", MAX_TEXT), integer(lineno, "a line", -1, 1 << 31, none=True),
                    text(domain, "a warning's location", MAX_TEXT))
    return {"warning_message": warnings.WarningMessage(shown, category, message["filename"], message["lineno"]),
            "when": when, "nodeid": item_nodeid, "location": location}


# -- the other events ----------------------------------------------------------------------

def check_property(data: Any) -> tuple[str, Any]:
    data = mapping(data, "a testsuite property")
    value = data.get("value")
    if not (value is None or isinstance(value, (bool, int, float, str))):
        value = str(value)
    return text(data.get("name"), "a property name"), text(value, "a property value", MAX_TEXT) \
        if isinstance(value, str) else value


def check_session_exit(data: Any) -> dict:
    data = mapping(data, "pytest.exit()")
    return {"reason": text(data.get("reason"), "the reason of pytest.exit()", MAX_TEXT),
            "returncode": integer(data.get("returncode"), "the return code of pytest.exit()", 0, 255, none=True)}


def check_problem(data: Any, what: str) -> dict:
    data = mapping(data, what)
    return {"message": text(data.get("message"), f"{what}'s message", MAX_TEXT),
            "step": text(data.get("step", "?"), f"{what}'s step")}


# -- what the host sends -----------------------------------------------------------------------

def check_done(data: Any, events_cap: int, capture_cap: int) -> dict:
    """The host's "done" message: what it saw of the test (its own observations)."""
    data = mapping(data, "the host's report")
    rusage = mapping(data.get("rusage") or {}, "the test's usage")
    slack = 4096  # the truncation marker
    done = {
        "status": integer(data.get("status"), "the exit status", 0, 0xFFFF, none=True),
        "timed_out": bool(data.get("timed_out")),
        "tampered": text(data.get("tampered"), "the host's finding", none=True),
        "stdout": text(data.get("stdout", ""), "captured stdout", capture_cap + slack),
        "stderr": text(data.get("stderr", ""), "captured stderr", capture_cap + slack),
        "crashlog": text(data.get("crashlog", ""), "the crash log", (1 << 20) + slack),
        "duration": max(number(data.get("duration", 0.0), "the duration"), 0.0),
        "rusage": {"cpu_seconds": number(rusage.get("cpu_seconds"), "CPU time", none=True),
                   "max_rss": integer(rusage.get("max_rss"), "peak memory", 0, 1 << 62, none=True)},
    }
    chunk = data.get("events", b"")
    if not isinstance(chunk, bytes) or len(chunk) > events_cap:
        raise Tampering("the rest of the events is not within its cap")
    done["events"] = chunk
    return done
