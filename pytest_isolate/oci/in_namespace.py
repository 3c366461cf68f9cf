"""Store work on files that belong to the user's subordinate range (rootless).

Rootless with a subordinate range, layers are unpacked with the image's owners: their
files belong to host ids of the range, which the user may not chown to, nor delete
once a directory of theirs is not the user's. Container root of a ranged user
namespace may do both (as ``podman unshare``): unpacking and removing such files run
in a forked child that entered one (subids.enter_ranged), with the same mapping the
containers get. Its result, or its exception, comes back as a small JSON answer,
checked here: the child handles a layer of an untrusted image, so nothing it sends
is unpickled or evaluated; an exception is rebuilt from its class's name (looked up
among the called function's module's, or OSError by its errno) and its words.
"""

from __future__ import annotations

import errno
import json
import os
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
            raise OSError(errno.EIO, f"the subordinate-range helper process died (status {status:#x})")
        return answer(data, function)


def answer(data: bytes, function: Callable[..., Any]) -> Any:
    """The child's answer: its result (an int or None: what the store's functions
    return), or its exception raised here. Anything else is a broken helper."""
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if isinstance(message, dict) and set(message) == {"result"}:
        result = message["result"]
        if result is None or (isinstance(result, int) and not isinstance(result, bool)):
            return result
    elif isinstance(message, dict) and set(message) == {"error", "words", "errno", "filename"}:
        name, words, number, filename = message["error"], message["words"], message["errno"], message["filename"]
        if isinstance(name, str) and isinstance(words, str) and (number is None or type(number) is int) and \
                (filename is None or isinstance(filename, str)):
            raise _rebuilt(function, name, words[:4096], number, filename)
    raise OSError(errno.EIO, "the subordinate-range helper process sent a broken answer")


def _rebuilt(function: Callable[..., Any], name: str, words: str, number: int | None,
             filename: str | None) -> BaseException:
    """The child's exception: a class of ``function``'s own module by its name (e.g.
    the store's StoreError), an OSError by its errno (PermissionError for EACCES, as
    the child's was), else an OSError that says what it was."""
    kind = getattr(function, "__globals__", {}).get(name)
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, OSError):
        with_message = kind.__new__(kind)
        Exception.__init__(with_message, words)
        return with_message
    if number is not None:
        return OSError(number, words, filename) if filename is not None else OSError(number, words)
    return OSError(errno.EIO, f"{name}: {words}")


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
                result = {"result": function(reader, *args)}
        else:
            result = {"result": function(*args)}
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        is_os = isinstance(exc, OSError) and exc.errno is not None
        result = {"error": type(exc).__name__, "words": (exc.strerror if is_os else str(exc))[:4096],
                  "errno": exc.errno if is_os else None,
                  "filename": str(exc.filename) if is_os and exc.filename is not None else None}
    try:
        data = json.dumps(result).encode()
    except (TypeError, ValueError):  # a result the store's functions never give
        data = json.dumps({"error": "TypeError", "words": "an answer that is not JSON", "errno": None,
                           "filename": None}).encode()
    try:
        os.write(answer_w, data)  # a pipe write is whole up to its buffer; answers are small
    finally:
        os._exit(0)
