"""Small named events between a container and its host: ``(name, data)`` frames.

A frame is a 4-byte big-endian length and a ``marshal`` dump of ``(name, data)``.
marshal is in every Python, fast, and only takes builtin types, which is exactly what
execnet forwards too; ``plain`` converts anything else (e.g. a user property holding
a custom object) to its repr instead of failing the test.

A test writes its frames to a file of its own (a memfd the host made) rather than
to a pipe: nothing wakes the host while the test runs, and whatever the test wrote
before a crash is still there to read. The test wakes the host once, through a
pipe, when it has finished (see container.Supervisor).

The reader never trusts the stream: a test can write to its own event fd, so a
malformed frame ends the stream with a ``corrupt`` event instead of an exception.
"""

from __future__ import annotations

import marshal
import os
import struct

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


def plain(value, _depth=0):
    """``value`` with every non-builtin part replaced by its repr()."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if _depth > 50:
        return repr(value)
    if isinstance(value, dict):
        return {plain(k, _depth + 1): plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v, _depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def encode_body(value) -> bytes:
    """marshal of ``value``, with what marshal cannot take replaced by its repr()."""
    try:
        return marshal.dumps(value)
    except ValueError:
        return marshal.dumps(plain(value))


def encode(name: str, data: dict) -> bytes:
    body = encode_body((name, data))
    return _HEADER.pack(len(body)) + body


def new_stream() -> tuple[int, int, int]:
    """(events file, notify read end, notify write end) for one test."""
    notify_r, notify_w = os.pipe2(os.O_CLOEXEC)
    return os.memfd_create("pytest-isolate-events", os.MFD_CLOEXEC), notify_r, notify_w


def send(fd: int, name: str, data: dict | None = None) -> None:
    view = memoryview(encode(name, data or {}))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Reader:
    """Incremental decoder: feed() bytes, then iterate the complete events."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.corrupt = False

    def feed(self, data: bytes) -> list[tuple[str, dict]]:
        if self.corrupt:
            return []
        self._buffer += data
        events = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                return events + [self._fail(f"frame of {size} bytes")]
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
            del self._buffer[: _HEADER.size + size]
            try:
                name, payload = marshal.loads(body)
                if not isinstance(name, str) or not isinstance(payload, dict):
                    raise ValueError("not a (name, dict) pair")
            except Exception as exc:
                return events + [self._fail(str(exc))]
            events.append((name, payload))
        return events

    def leftover(self) -> int:
        return len(self._buffer)

    def _fail(self, why: str) -> tuple[str, dict]:
        self.corrupt = True
        self._buffer.clear()
        return ("corrupt", {"message": f"the container's event stream was corrupted ({why})"})
