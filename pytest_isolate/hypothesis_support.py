"""Hypothesis's example database across the container boundary.

In a container the project is read-only, so Hypothesis cannot save the failing
examples it finds, and its default database (``.hypothesis/examples``) warns that it
is "unusable" each time a test looks at it. Here:

* **In the container** (the host's session, a fresh interpreter's, the test process)
  the default database reads the directory the controller's Hypothesis uses (its
  absolute path comes in the workerinput, ``WORKERINPUT_KEY``), read-only and without
  the warning. Writes (``save``, ``delete``, ``move``) of any
  ``DirectoryBasedExampleDatabase`` whose directory is not writable in the container
  are recorded instead of lost: each is one ``hypothesis_write`` event on the test's
  own events file, sent when Hypothesis makes it (so a test that crashes or times out
  after finding a failure still has it saved). A database the container can write
  (a ``:rw`` mount, ``tmp_path``) is written as usual.
* **In the controller** each write is checked (boundary rules: sizes, base64) and,
  once the test's process has ended and unless it tampered with its channel, applied
  through Hypothesis's own ``DirectoryBasedExampleDatabase`` API to a database the
  controller itself finds in the test's settings (``@settings(database=...)``, the
  loaded profile, else the default): the path a write names only selects one of those
  directories, it is never opened as such. A hostile test can therefore at most add
  or remove examples of the project's database, which it could do in a plain run too.

Nothing here imports Hypothesis unless the session already did.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
import warnings
from typing import Callable

import pytest

WORKERINPUT_KEY = "isolate_hypothesis_examples"
EVENT = "hypothesis_write"
OPS = ("save", "delete", "move")
MAX_KEY = 1 << 12  # Hypothesis's keys: a 48-byte digest and a suffix (".secondary", ...)
MAX_VALUE = 16 << 20  # one example (its choices, serialised)
MAX_WRITES = 100_000  # a test's writes, beyond which they are dropped
MAX_PATH = 4096


# -- the controller: where its default database is ------------------------------------------

def examples_directory() -> str | None:
    """The absolute directory of the controller's default database, if this session
    uses Hypothesis (else None: nothing is imported for it); "" if the controller
    cannot write it either (Hypothesis then warns and keeps examples in memory, in
    the container as in a plain run)."""
    if "hypothesis" not in sys.modules:
        return None
    try:
        from hypothesis.configuration import storage_directory
        from hypothesis.database import _usable_dir

        path = os.path.abspath(storage_directory("examples", intent_to_write=False).path)
        return path if _usable_dir(path) else ""
    except Exception:  # pragma: no cover - a Hypothesis without storage_directory
        return None


# -- the container: reading read-only, recording writes ---------------------------------------

_container: dict = {"examples": None, "send": None, "installed": False, "usable": {}}


class ContainerHypothesis:
    """Registered in every in-container session (the host's, a fresh interpreter's)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_header(self, config: pytest.Config) -> None:
        # Hypothesis's header (-v) reads the default database: set it up first.
        if "hypothesis" in sys.modules or (config.get_verbosity() >= 1 and "_hypothesis_pytestplugin" in sys.modules):
            install()


def setup_container(config: pytest.Config, workerinput: dict) -> None:
    examples = workerinput.get(WORKERINPUT_KEY)
    _container["examples"] = examples if isinstance(examples, str) and (examples == "" or os.path.isabs(examples)) \
        else None
    config.pluginmanager.register(ContainerHypothesis(), "isolate-hypothesis")


def start_test(send: Callable[..., None]) -> None:
    """In the test's process, before it runs: its writes become events."""
    _container["send"] = send
    _container["usable"] = {}  # this test's mounts, not the host's
    if "hypothesis" in sys.modules:
        install()


def install() -> None:
    if _container["installed"]:
        return
    try:
        from hypothesis import database
        from hypothesis.utils.conventions import not_set

        directory_class = database.DirectoryBasedExampleDatabase
        original_db_for_path = database._db_for_path
        originals = {op: getattr(directory_class, op) for op in OPS}
    except (ImportError, AttributeError):  # another Hypothesis: left as it is
        return
    _container["installed"] = True

    def _db_for_path(path=None):
        if path is not_set:
            examples = _default_examples()
            if examples is not None:
                # The controller's directory, never "unusable" (Hypothesis's warning):
                # it is read here, and what cannot be written here is recorded.
                return directory_class(examples)
        return original_db_for_path(path)

    database._db_for_path = _db_for_path

    def recording(op: str):
        original = originals[op]

        def write(self, *args, **kwargs):
            if _record(self, op, args, kwargs):
                return None
            return original(self, *args, **kwargs)

        write.__name__ = write.__qualname__ = op
        write.__doc__ = original.__doc__
        return write

    for op in OPS:
        setattr(directory_class, op, recording(op))


def _default_examples() -> str | None:
    if _container["examples"] is not None:
        return _container["examples"] or None  # "": unusable in the controller too
    try:
        from hypothesis.configuration import storage_directory

        return os.path.abspath(storage_directory("examples", intent_to_write=False).path)
    except Exception:  # pragma: no cover
        return None


def _usable(path: str) -> bool:
    """Does a write there last (cached per directory)? Not where Hypothesis itself
    could not write (the read-only project), nor on the container's root, an overlay
    that is gone with it (a directory outside the image); a ``:rw`` mount or a tmpfs
    the test made (``tmp_path``) is written as usual."""
    known = _container["usable"].get(path)
    if known is None:
        try:
            from hypothesis.database import _usable_dir

            known = bool(_usable_dir(path))
        except Exception:  # pragma: no cover
            known = os.access(path, os.W_OK)
        if known:
            existing = path
            while not os.path.exists(existing) and existing != os.path.dirname(existing):
                existing = os.path.dirname(existing)
            try:
                known = os.stat(existing).st_dev != os.stat("/").st_dev
            except OSError:
                known = False
        _container["usable"][path] = known
    return known


_PARAMETERS = {"save": ("key", "value"), "delete": ("key", "value"), "move": ("src", "dest", "value")}


def _record(db, op: str, args: tuple, kwargs: dict) -> bool:
    """Send one write of ``db`` as an event, if it could not be made here; True if so."""
    send = _container["send"]
    if send is None:
        return False
    names = _PARAMETERS[op]
    values = dict(zip(names, args), **kwargs)
    if len(args) > len(names) or set(values) != set(names):
        return False  # not a call Hypothesis's own method takes: let it say so
    path = os.path.abspath(db.path)
    if _usable(path):
        return False
    key, value, dest = values.get("key", values.get("src")), values["value"], values.get("dest")
    if key == getattr(db, "_metakeys_name", None):  # Hypothesis's own index: the controller's save keeps it
        return True
    try:
        send(EVENT, op=op, path=path, key=_b64(key), value=_b64(value), dest=None if dest is None else _b64(dest))
    except (TypeError, OSError):  # not bytes; or the events file is full: lost, as a failed write is
        pass
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


# -- the controller: checking and applying ----------------------------------------------------

class DatabaseWrites:
    """One test's database writes, checked as they come, applied when it has ended."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.writes: list[tuple[str, str, bytes, bytes | None, bytes]] = []
        self.dropped = 0

    def add(self, data) -> None:
        write = check_write(data)
        if write is None or len(self.writes) >= MAX_WRITES:
            self.dropped += 1
            return
        self.writes.append(write)

    def apply(self) -> None:
        """Each write, in order, to the directory it names if that is one of the
        test's databases (as this process sees its settings); others are dropped."""
        if not self.writes:
            return
        try:
            targets = databases(self.item)
        except Exception:  # pragma: no cover - a Hypothesis of another shape
            targets = {}
        for op, path, key, dest, value in self.writes:
            db = targets.get(path)
            if db is None:
                continue
            try:
                if op == "move":
                    db.move(key, dest, value)
                else:
                    getattr(db, op)(key, value)
            except Exception:  # as Hypothesis itself: a failed write is no test failure
                pass
        self.writes.clear()


def check_write(data) -> tuple[str, str, bytes, bytes | None, bytes] | None:
    """A ``hypothesis_write`` event as (op, path, key, dest, value); None when it is
    over a size cap (dropped). Anything malformed is Tampering."""
    from . import boundary

    data = boundary.mapping(data, "a database write")
    op = data.get("op")
    if op not in OPS:
        raise boundary.Tampering(f"a database write of an unknown kind {str(op)[:40]!r}")
    path = boundary.text(data.get("path"), "a database path", MAX_PATH)
    if not os.path.isabs(path) or "\0" in path:
        raise boundary.Tampering("a database path that is not absolute")
    key = _unb64(data.get("key"), "a database key", MAX_KEY)
    value = _unb64(data.get("value"), "a database value", MAX_VALUE)
    dest = _unb64(data.get("dest"), "a database key", MAX_KEY) if op == "move" else None
    if op != "move" and data.get("dest") is not None:
        raise boundary.Tampering(f"a database {op} with a destination")
    if key is None or value is None or (op == "move" and dest is None):
        return None
    return op, os.path.normpath(path), key, dest, value


def _unb64(value, what: str, cap: int) -> bytes | None:
    from . import boundary

    if not isinstance(value, str):
        raise boundary.Tampering(f"{what} is not base64 text")
    if len(value) > (cap + 2) // 3 * 4:
        return None
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise boundary.Tampering(f"{what} is not base64") from None


def databases(item: pytest.Item) -> dict[str, object]:
    """The directory databases a test's Hypothesis writes to here, by absolute path:
    those of its settings (``@settings``, else the profile's at decoration) and of the
    current profile; through ``MultiplexedDatabase``, never into ``ReadOnlyDatabase``."""
    try:
        from hypothesis import settings
        from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase
    except ImportError:
        return {}
    found: dict[str, object] = {}

    def walk(db, depth: int = 0) -> None:
        if isinstance(db, DirectoryBasedExampleDatabase):
            found.setdefault(os.path.normpath(os.path.abspath(db.path)), db)
        elif isinstance(db, MultiplexedDatabase) and depth < 8:
            for inner in getattr(db, "_wrapped", ()):
                walk(inner, depth + 1)

    try:
        function = getattr(item, "obj", None)
    except Exception:
        function = None
    with warnings.catch_warnings():  # the controller's own "unusable" warning: its plain run shows it
        warnings.simplefilter("ignore")
        for chosen in (getattr(function, "_hypothesis_internal_use_settings", None), settings.default):
            try:
                walk(chosen.database)
            except Exception:
                continue
    return found
