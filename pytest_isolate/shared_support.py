"""Shared session fixtures, the controller's side: the ini key
``isolate_shared_fixtures`` names session-scoped fixtures that a fork-mode container
host sets up once, before it forks any test (shared_container.py does that).

Here: the names are checked at collection (a name that is no fixture, a fixture that
is not session-scoped or is parametrized is a usage error that says so), each host is
told which fixtures its tests use and through which test to set them up, and what
hosts answer (what they set up, what they left to each test, a teardown's failure) is
checked and summarised.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import pytest

from . import boundary

INI = "isolate_shared_fixtures"
HELP = ("session-scoped fixtures that a fork-mode container host sets up once, before it forks "
        "the tests: each test gets a copy-on-write copy; torn down once, at the end")
MAX_NAMES = 1000
MAX_NOTE = 4096
MAX_TEARDOWN_TEXT = 64 << 10


def _fixture_names(session: pytest.Session) -> set[str]:
    """Every fixture name pytest knows (its registry's name differs across versions)."""
    manager = session._fixturemanager
    names: set[str] = set()
    for attribute in ("_arg2fixturedefs", "_arg2node2fixturedefs", "_arg2nodeid2fixturedefs"):
        names.update(getattr(manager, attribute, None) or ())
    return names


def check_names(names: Iterable[str], session: pytest.Session, items: list[pytest.Item], source: str) -> list[str]:
    """The configured names: each a fixture; those the tests use session-scoped and
    not parametrized."""
    where = f"ini key {INI} {source}"
    known = _fixture_names(session)
    used: dict[str, list] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for name, defs in (info.name2fixturedefs.items() if info is not None else ()):
            used.setdefault(name, []).extend(defs)
    checked = []
    for name in names:
        if name not in known and name not in used:
            close = difflib.get_close_matches(name, sorted(known | set(used)), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise pytest.UsageError(f"{where}: {name!r} is not a fixture{hint}")
        for fixturedef in used.get(name, ()):
            owner = fixturedef.baseid or "a plugin"
            if fixturedef.scope != "session":
                raise pytest.UsageError(
                    f"{where}: fixture {name!r} ({owner}) has scope {fixturedef.scope!r}; only "
                    f"session-scoped fixtures can be set up once for all tests: make it scope=\"session\", "
                    f"or take it off {INI}")
            if fixturedef.params is not None:
                raise pytest.UsageError(
                    f"{where}: fixture {name!r} ({owner}) is parametrized; a shared fixture has one "
                    f"value: take it off {INI}")
        checked.append(name)
    return checked


def first_users(names: list[str], items: Iterable[pytest.Item]) -> list[list[str]]:
    """[nodeid, name] for the first of ``items`` that uses each definition of each
    name: the host sets the fixture up through that test's request."""
    wanted, seen = [], set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in names:
            defs = info.name2fixturedefs.get(name) if name in item.fixturenames else None
            if defs and id(defs[-1]) not in seen:
                seen.add(id(defs[-1]))
                wanted.append([item.nodeid, name])
    return wanted


class HostShared:
    """What one host set up (checked: a host runs test code)."""

    def __init__(self, data) -> None:
        data = boundary.mapping(data, "the shared fixtures")
        if set(data) != {"names", "seconds", "notes"}:
            raise boundary.Tampering("the shared fixtures are not names, seconds and notes")
        self.names = boundary.strings(data["names"], "a shared fixture's name", 256)[:MAX_NAMES]
        self.seconds = boundary.number(data["seconds"], "the shared fixtures' setup time")
        self.notes = boundary.strings(data["notes"], "a note on the shared fixtures", MAX_NOTE)[:MAX_NAMES]

    def summary(self) -> list[str]:
        lines = []
        if self.names:
            lines.append(f"  shared fixtures set up once in {self.seconds:.2f}s: {', '.join(self.names)}")
        return lines + [f"  note: {note}" for note in self.notes]


def teardown_error(data) -> str | None:
    return boundary.text(data, "the shared fixtures' teardown error", MAX_TEARDOWN_TEXT, none=True)
