"""Store work on files that belong to the user's subordinate range (rootless).

Rootless with a subordinate range, layers are unpacked with the image's owners: their
files belong to host ids of the range, which the user may not chown to, nor delete
once a directory of theirs is not the user's. Container root of a ranged user
namespace may do both (as ``podman unshare``): unpacking and removing such files run
in a forked child that entered one (subids.enter_ranged), with the same mapping the
containers get. Its result, or its exception, comes back pickled.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, BinaryIO, Callable

from ..runtime import process, subids

_CHUNK = 1 << 20
_MAX_ANSWER = 1 << 20


class Namespace:
    """Runs functions as container root of ``mapping``'s ranged user namespace."""

    def __init__(self, mapping: subids.Mapping) -> None:
        self.mapping = mapping

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return self._run(None, function, args)

    def call_fed(self, stream: BinaryIO, function: Callable[..., Any], *args: Any) -> Any:
        """``function(reader, *args)`` where the child's ``reader`` yields what this
        process reads from ``stream``, to its end: the caller's wrappers (digests,
        progress) see every byte here."""
        return self._run(stream, function, args)

    def _run(self, stream: BinaryIO | None, function: Callable[..., Any], args: tuple) -> Any:
        parent = os.getpid()
        answer_r, answer_w = os.pipe()
        feed_r, feed_w = os.pipe() if stream is not None else (None, None)
        pid = os.fork()
        if pid == 0:  # single-threaded from here on: it may unshare
            _child(parent, answer_r, answer_w, feed_r, feed_w, function, args)
        os.close(answer_w)
        failure = None
        if stream is not None:
            os.close(feed_r)
            try:
                _pump(stream, feed_w)
            except BaseException as exc:  # noqa: BLE001 - a read error of ours: the child sees EOF
                failure = exc
            finally:
                os.close(feed_w)
        try:
            with os.fdopen(answer_r, "rb") as f:
                data = f.read(_MAX_ANSWER + 1)
        finally:
            _, status = os.waitpid(pid, 0)
        if failure is not None:
            raise failure
        if not data or len(data) > _MAX_ANSWER:
            raise OSError(5, f"the subordinate-range helper process died (status {status:#x})")
        ok, value = pickle.loads(data)  # our own child's: trusted as this process is
        if ok == "unpicklable":
            raise _rebuilt(function, *value)
        if not ok:
            raise value
        return value


def _rebuilt(function: Callable[..., Any], name: str, message: str) -> BaseException:
    """The child's exception that pickle could not name: its class is looked up in
    ``function``'s own module (a class pickle cannot find by its module's name, as when
    that module was imported again since, is still the one its code raises)."""
    kind = getattr(function, "__globals__", {}).get(name)
    if isinstance(kind, type) and issubclass(kind, Exception):
        with_message = kind.__new__(kind)
        Exception.__init__(with_message, message)
        return with_message
    return OSError(5, message)


def _pump(stream: BinaryIO, fd: int) -> None:
    """Copy ``stream`` into the pipe; once the child stopped reading (it failed and
    says why), read the rest anyway for the caller's digest check."""
    open_pipe = True
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while open_pipe and view:
            try:
                view = view[os.write(fd, view):]
            except BrokenPipeError:
                open_pipe = False


def _child(parent, answer_r, answer_w, feed_r, feed_w, function, args) -> None:
    try:
        os.close(answer_r)
        if feed_w is not None:
            os.close(feed_w)
        subids.enter_ranged(subids.rootless_mapping())
        process.die_with_parent(parent)  # set after the uid change, which clears it
        if feed_r is not None:
            with os.fdopen(feed_r, "rb") as reader:
                result = (True, function(reader, *args))
        else:
            result = (True, function(*args))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        result = (False, exc)
    try:
        data = pickle.dumps(result)
    except Exception:  # an unpicklable exception: its class's name and its words
        data = pickle.dumps(("unpicklable", (type(result[1]).__name__, str(result[1])[:2000])))
    try:
        os.write(answer_w, data)  # a pipe write is whole up to its buffer; answers are small
    finally:
        os._exit(0)
