"""Small named events from a test's container: ``(name, data)`` frames.

A frame is a 4-byte big-endian length and the UTF-8 JSON of ``[name, data]``. The
stream is written by the test, which is hostile code, and decoded by the controller
(``boundary.py``): JSON because its parser is safe on any bytes, whereas marshal's "is
not intended to be secure against erroneous or maliciously constructed data" (the
Python docs). ``plain`` turns anything JSON cannot carry (e.g. a user property holding
a custom object) into its repr instead of failing the test.

A test writes its frames to a memfd of its own that the host made, not to a pipe:
nothing wakes the host while the test runs, and whatever the test wrote before a
crash is still there to read. The host never decodes it; it only reads it, within
a cap, once the test's process has ended (see supervisor.py).
"""

from __future__ import annotations

import json
import os
import struct

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# What one test may write in all, unless the run says otherwise (boundary.events_cap).
DEFAULT_STREAM_CAP = 64 << 20


def plain(value, _depth=0):
    """``value`` with every part JSON cannot carry replaced by its repr()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _depth > 50:
        return repr(value)
    if isinstance(value, dict):
        return {str(plain(k, _depth + 1)): plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, _depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(name: str, data: dict) -> bytes:
    try:
        body = _json([name, data])
    except (TypeError, ValueError, RecursionError):
        body = _json([name, plain(data)])
    return _HEADER.pack(len(body)) + body


def new_stream() -> int:
    """The events file of one test."""
    return os.memfd_create("pytest-isolate-events", os.MFD_CLOEXEC)


def send(fd: int, name: str, data: dict | None = None) -> None:
    view = memoryview(encode(name, data or {}))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Broken(Exception):
    pass


class Reader:
    """Incremental decoder of an untrusted stream: feed() bytes, get the complete
    events; at most ``cap`` bytes in all. The first thing that is not a frame sets
    ``problem`` (what broke, in words); the reader then takes nothing more."""

    def __init__(self, cap: int = DEFAULT_STREAM_CAP) -> None:
        self.cap = cap
        self.total = 0
        self.problem: str | None = None
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, dict]]:
        found: list[tuple[str, dict]] = []
        if self.problem is not None:
            return found
        try:
            self.total += len(data)
            if self.total > self.cap:
                raise _Broken(f"more than {self.cap} bytes")
            self._buffer += data
            while len(self._buffer) >= HEADER_SIZE:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size == 0 or size > self.cap:
                    raise _Broken(f"a frame of {size} bytes")
                if len(self._buffer) < HEADER_SIZE + size:
                    break
                body = bytes(self._buffer[HEADER_SIZE: HEADER_SIZE + size])
                del self._buffer[: HEADER_SIZE + size]
                found.append(_decode(body))
        except _Broken as exc:
            self.problem = str(exc)
            self._buffer.clear()
        return found

    def leftover(self) -> int:
        return len(self._buffer)


def _decode(body: bytes) -> tuple[str, dict]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Broken(f"a frame that is not JSON ({type(exc).__name__})") from None
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], dict)):
        raise _Broken("a frame that is not [name, {data}]")
    return value[0], value[1]
