"""Shared session fixtures, in the container host: set up once, before any test is
forked, inherited copy-on-write by every test, torn down once when the host shuts
down (``isolate_shared_fixtures``; the controller's side is shared_support.py).

Runs in the container host and, after the fork, in each test process; imports
nothing of the plugin. It drives pytest's own fixture machinery, so a shared
fixture's value, its cached error or skip, and its dependencies behave as in one
plain session: the host plays "the session before its first test".

The order is forced:
1. The session is pushed onto pytest's SetupState first: a session fixture files its
   finalizer with the session node, which must be on that stack.
2. Each fixture is set up through the first isolated test that uses it (its
   request resolves overrides as that test would). What it leaves that a fork cannot
   carry (open file descriptors: the test process closes them; threads: a fork has
   one) is found by comparing before and after, and such a fixture is torn down
   again and left to each test, with a note saying why.
3. In each test process, before its test runs, the session's finalizers and those
   of every fixture the host set up are dropped: the test tears down only what it
   set up itself, never the host's fixtures.
4. When the host shuts down, pytest's SetupState tears the session down, once.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest

MAX_TEARDOWN_TEXT = 64 << 10


def _open_fds() -> set[int]:
    try:
        own = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return set()
    try:
        return {int(fd) for fd in os.listdir(own)} - {own}
    finally:
        os.close(own)


def _describe_fd(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _fresh_request(item: pytest.Item | None):
    """A request of the test's own kind that the test never sees: what it caches of
    a fixture the host then gives back must not stay with the test."""
    request = getattr(item, "_request", None)
    try:
        return type(request)(item, _ispytest=True) if request is not None else None
    except Exception:  # noqa: BLE001 - a request type of another kind: not shared
        return None


def _fixturedef(item: pytest.Item, name: str):
    """The definition ``item`` uses for ``name`` (the closest override)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get(name) if info is not None else None
    return defs[-1] if defs else None


def _undo(finalizers: list, since: int) -> None:
    """Tear down what one fixture's setup added to the session (it and the session
    fixtures it set up for itself), newest first, as pytest would."""
    added = finalizers[since:]
    del finalizers[since:]
    for finalizer in reversed(added):
        try:
            finalizer()
        except BaseException:  # noqa: B036 - its teardown's failure is its own
            pass


def _is_internal(path: str) -> bool:
    return path == __file__ or os.sep + "_pytest" + os.sep in path or os.sep + "pluggy" + os.sep in path


class Shared:
    """What the host set up; ``notes`` say what was left to each test, and why."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.notes: list[str] = []
        self.seconds = 0.0
        self._session = None
        self._set_up: list = []
        # What they wrote under tmp_path_factory: each test sees it copy-on-write.
        self.mounts: list[dict] = []

    def set_up(self, session: pytest.Session, items: dict[str, pytest.Item], wanted: list) -> None:
        """``wanted``: [nodeid, fixture name] pairs, the first isolated test that uses
        each fixture (from the controller)."""
        if not wanted:
            return
        started = time.perf_counter()
        setupstate = session._setupstate
        if session not in setupstate.stack:
            setupstate.setup(session)  # the session node has nothing to set up itself
        self._session = session
        for nodeid, name in wanted:
            item = items.get(nodeid)
            request = _fresh_request(item)
            fixturedef = _fixturedef(item, name) if item is not None else None
            if request is None or fixturedef is None or getattr(fixturedef, "cached_result", None) is not None:
                continue  # not collected here, or set up already (a dependency of another)
            finalizers = setupstate.stack[session][0]
            before, fds, threads = len(finalizers), _open_fds(), threading.active_count()
            try:
                request.getfixturevalue(name)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: B036 - cached by pytest: each test raises it (error, skip)
                pass
            left = {fd: _describe_fd(fd) for fd in sorted(_open_fds() - fds)}
            left = {fd: what for fd, what in left.items() if what is not None}  # gone by now: not left
            extra_threads = threading.active_count() - threads
            if left or extra_threads > 0:
                what = ", ".join(list(left.values())[:5]) + (" ..." if len(left) > 5 else "")
                why = (f"{len(left)} file descriptor{'s' if len(left) != 1 else ''} open ({what}), which the "
                       "test process closes" if left else f"{extra_threads} thread{'s' if extra_threads != 1 else ''}"
                       " running, which a forked test does not have")
                self.notes.append(f"shared fixture {name!r} is set up in each test instead: it left {why}; "
                                  "share what it computes, and open files, sockets and threads in a "
                                  "function-scoped fixture")
                _undo(finalizers, before)
                continue
            self.names.append(name)
        # Every fixture the host set up (dependencies too) filed its finish() here.
        self._set_up = [getattr(f.func, "__self__", None) for f in setupstate.stack[session][0]
                        if isinstance(f, functools.partial)]
        basetemp = getattr(getattr(session.config, "_tmp_path_factory", None), "_basetemp", None)
        if basetemp is not None:
            self.mounts = [{"type": "overlay", "dst": str(basetemp), "src": str(basetemp)}]
        self.seconds = time.perf_counter() - started

    def forget_in_test(self) -> None:
        """In a test's process: the host's finalizers are not this test's to run."""
        session = self._session
        if session is None:
            return
        stack = session._setupstate.stack
        if session in stack:
            finalizers, exc = stack[session]
            stack[session] = (finalizers[:1], exc)  # [session.teardown], as pytest pushed it
        for fixturedef in self._set_up:
            finalizers = getattr(fixturedef, "_finalizers", None)
            if finalizers is not None:
                finalizers.clear()

    def tear_down(self) -> str | None:
        """Once, at the host's end: the session's teardown; the error's text, if any."""
        session, self._session = self._session, None
        if session is None:
            return None
        try:
            session._setupstate.teardown_exact(None)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: B036 - reported by the controller
            info = pytest.ExceptionInfo.from_exception(exc)
            # From the fixture's frames on: this module and pytest's are not the user's.
            info.traceback = info.traceback.filter(lambda entry: not _is_internal(str(entry.path)))
            return str(info.getrepr(style="long", chain=True))[:MAX_TEARDOWN_TEXT]
        return None
