"""The one link every process boundary speaks: typed messages ``(name, {fields})``.

Model: youki's ``channel.rs`` + ``message.rs``. Every message has a name in
``MESSAGES``, which says which fields it carries and of which types; a receiver says
which names it expects, and anything else is ``Unexpected``, with what was expected
and what came. One encoding: the UTF-8 JSON of ``[name, {fields}]`` -- JSON because
its parser is safe on any bytes (marshal "is not intended to be secure against
erroneous or maliciously constructed data", the Python docs), and a test's events are
written by hostile code. Binary fields (compiled seccomp programs) travel as base64.

Carriers, one framing each kind:

* a stream (a test's events memfd, the job pipe): frames of a 4-byte big-endian
  length and the JSON body, read by ``Reader`` (incremental, capped);
* a datagram socket (host <-> factory, host <-> zygote, with fds passed alongside):
  one frame per datagram, ``Channel``;
* text (the launcher's argv and environment, the fresh interpreter's job): the JSON
  body alone, ``to_text`` / ``from_text``;
* the controller <-> host link is execnet (the transport the user asked for). To the
  host, messages travel as text (execnet then carries one str instead of serialising
  nested containers in Python, ≈ 0.2 ms a test on each side); from the host, as
  ``(name, {fields})`` tuples, since they carry bytes (a test's events). Both are
  checked against the same registry; another transport would only replace the
  carrier.

What a test wrote is decoded by the controller alone; the deep checks of its events
(reports, warnings, ...) are boundary.py's.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# What one test may write in all, unless the run says otherwise (hosts.settings_caps).
DEFAULT_STREAM_CAP = 64 << 20
# The largest datagram between the runtime's own processes.
MAX_DATAGRAM = 1 << 22
# Most fds one datagram carries (a test's files, its job pipe, its namespaces).
MAX_FDS = 16

_ANY = object
_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))

# name -> {field: type(s)}. Fields not named here are refused; all named ones required.
MESSAGES: dict[str, dict[str, object]] = {
    # launcher: argv in (the spec), environment out (what the host must know)
    "spec": {"entries": list, "sources": list, "cwd": str, "hostname": str,
             "env": (dict, type(None)), "python_path": list,
             "library_path": _OPT_STR, "allow": list, "networks": list,
             "outbound": _OPT_STR},  # slirp4netns's path, if a test asks for outbound=True  # env: an image's own, replacing ours
    "launched": {"error": _OPT_STR, "notes": list, "factory_fd": (int, type(None)), "mounts_unlocked": _OPT_STR},
    # host <-> factory (namespace fds and init's pidfd come with "built")
    "build": {"id": int, "mounts": list, "hostname": str, "network": str, "hosts": list,
              "host_number": (int, type(None)), "watch_ports": bool,  # these two: services
              "snapshot": (dict, type(None)),  # a service's snapshot (snapshots.py)
              "allow": list, "netem": list, "outbound": bool},
    "relay": {"targets": list},  # factory -> relay: listening sockets and init's pidfd come along
    "outbound": {},  # factory -> relay: the container's network namespace and init's pidfd come along
    "outbound_ready": {"error": _OPT_STR},  # relay -> factory
    "built": {"id": int, "addresses": list},
    "build_failed": {"id": int, "message": str, "step": str},
    # host <-> zygote (a test's files, its job pipe and namespaces come with "fork")
    "zygote_ready": {"pid": (int, type(None))},
    "fork": {"config": dict, "finished": list},
    "forked": {"pid": int},
    "fork_failed": {"message": str},
    "reap": {"pid": int},
    "reaped": {"pid": int, "status": int, "usage": dict},
    # host -> test (the job pipe), and the fresh interpreter's job (environment)
    "job": {"nodeid": str, "fresh_arg": str, "deadline": _OPT_NUM, "capture_cap": int, "services": dict,
            "container": dict},
    "service_job": {"argv": list},  # a service's process (services_container.py)
    "fresh_job": {"job": dict, "files": dict, "start": dict},
    # test -> host -> controller: a test's events (checked deeply by boundary.py)
    "report": {"data": _ANY},
    "warning": {"warning": _ANY, "when": _ANY, "nodeid": _ANY, "location": _ANY},
    "testsuite_property": {"name": _ANY, "value": _ANY},
    "coverage": {"data": _ANY},  # the lines the test ran (coverage_container.py -> coverage_support.py)
    "session_exit": {"reason": _ANY, "returncode": _ANY},
    "container_error": {"message": _ANY, "step": _ANY},
    "not_collected": {"message": _ANY},
    "hypothesis_write": {"op": _ANY, "path": _ANY, "key": _ANY, "value": _ANY, "dest": _ANY},
    # controller -> host
    "start": {"entries": list, "args": list, "option_dict": dict, "workerinput": dict, "sys_path": list,
              "argv": list, "collect": bool, "shared": list, "own_stdlib": bool,
              "own_packages": bool},
    "run": {"nodeid": str, "mode": str, "timeout": _OPT_NUM, "fresh_arg": str, "seccomp_programs": list,
            "in_zygote": bool, "events_cap": int, "capture_cap": int, "container_config": dict,
            "services": list},
    "zygote": {},
    "shutdown": {},
    # host -> controller (checked deeply by the controller: a host runs test code)
    "ready": {"collected": _ANY, "host_pid": _ANY, "rss": _ANY, "seconds": _ANY, "notes": _ANY,
              "shared": _ANY},  # shared fixtures: {"names", "seconds", "notes"}
    "closed": {"teardown_error": _ANY},  # the answer to shutdown
    "host_error": {"message": _ANY},
    "zygote_pid": {"pid": _ANY},
    "events": {"chunk": _ANY},
    "done": {"status": _ANY, "timed_out": _ANY, "tampered": _ANY, "stdout": _ANY, "stderr": _ANY,
             "crashlog": _ANY, "rusage": _ANY, "duration": _ANY, "events": _ANY},
}

# What each receiver takes.
TEST_EVENTS = ("report", "warning", "testsuite_property", "session_exit", "container_error", "not_collected",
               "hypothesis_write")
TEST_EVENTS += ("coverage",)  # when the controller measures coverage (coverage_support.py)
FROM_HOST = ("ready", "host_error", "zygote_pid", "events", "done", "closed")
TO_HOST = ("run", "zygote", "shutdown")


class Unexpected(Exception):
    """A message that is not one of those expected, or not of its registered shape."""

    @classmethod
    def got(cls, expected, what: str) -> "Unexpected":
        return cls(f"expected {' or '.join(expected)}, got {what}")


def check(message, expected: tuple[str, ...]) -> tuple[str, dict]:
    """``message`` as ``(name, fields)`` if it is one of ``expected``, with the fields
    its registry entry names, of their types; Unexpected otherwise."""
    if not (isinstance(message, (tuple, list)) and len(message) == 2 and isinstance(message[0], str)
            and isinstance(message[1], dict)):
        raise Unexpected.got(expected, "something that is not (name, {fields})")
    name, fields = message
    if name not in expected:
        raise Unexpected.got(expected, repr(name[:40]))
    shape = MESSAGES[name]
    if fields.keys() != shape.keys():
        missing = sorted(shape.keys() - fields.keys())[:3]
        extra = sorted(str(k)[:40] for k in fields.keys() - shape.keys())[:3]
        raise Unexpected(f"{name} with fields missing {missing} or unknown {extra}")
    for field, kind in shape.items():
        if not isinstance(fields[field], kind) or (kind in (int, _NUM) and isinstance(fields[field], bool)):
            raise Unexpected(f"{name} with a {type(fields[field]).__name__} for {field}")
    return name, fields


def message(name: str, /, **fields) -> tuple[str, dict]:
    """A message to send, checked against its registry entry (a bug here is ours)."""
    return check((name, fields), (name,))


# -- the encoding ------------------------------------------------------------------------------

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


def _body(name: str, fields: dict) -> bytes:
    try:
        return json.dumps([name, fields], separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        return json.dumps([name, plain(fields)], separators=(",", ":")).encode()


def _parse(body: bytes | str) -> list:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Unexpected(f"a message that is not JSON ({type(exc).__name__})") from None


def encode(name: str, fields: dict) -> bytes:
    """One frame: length, then the JSON body."""
    body = _body(name, fields)
    return _HEADER.pack(len(body)) + body


def to_text(name: str, /, **fields) -> str:
    return _body(*message(name, **fields)).decode()


def from_text(text: str, expected: str) -> dict:
    return check(_parse(text), (expected,))[1]


def read_text(text, expected: tuple[str, ...]) -> tuple[str, dict]:
    """A message that came as text (e.g. over execnet), one of ``expected``."""
    if not isinstance(text, str):
        raise Unexpected.got(expected, "something that is not text")
    return check(_parse(text), expected)


def binary(data: bytes) -> str:
    return base64.b64encode(data).decode()


def from_binary(text: str) -> bytes:
    return base64.b64decode(text)


# -- streams -----------------------------------------------------------------------------------

def new_stream(name: str = "pytest-isolate-events") -> int:
    """The events file of one test: a memfd, not a pipe (see supervisor.py)."""
    return os.memfd_create(name, os.MFD_CLOEXEC)


def send(fd: int, name: str, fields: dict | None = None) -> None:
    """Write one frame to a stream (all of it: a memfd or pipe may take it in parts)."""
    view = memoryview(encode(name, fields or {}))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_one(fd: int, expected: str | tuple[str, ...]) -> dict | None:
    """The single frame a trusted writer sent on ``fd``, read to end-of-file (None if
    it sent nothing at all); the fd is closed."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    if not chunks:
        return None
    data = b"".join(chunks)
    return check(_parse(data[HEADER_SIZE:]), (expected,) if isinstance(expected, str) else expected)[1]


class Reader:
    """Incremental decoder of an untrusted stream: feed() bytes, get the complete
    messages; at most ``cap`` bytes in all. The first thing that is not a frame sets
    ``problem`` (what broke, in words); the reader then takes nothing more. The
    messages' names and fields are the caller's to check (``check``)."""

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
                raise Unexpected(f"more than {self.cap} bytes")
            self._buffer += data
            while len(self._buffer) >= HEADER_SIZE:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size == 0 or size > self.cap:
                    raise Unexpected(f"a frame of {size} bytes")
                if len(self._buffer) < HEADER_SIZE + size:
                    break
                body = bytes(self._buffer[HEADER_SIZE: HEADER_SIZE + size])
                del self._buffer[: HEADER_SIZE + size]
                value = _parse(body)
                if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                        and isinstance(value[1], dict)):
                    raise Unexpected("a frame that is not [name, {data}]")
                found.append((value[0], value[1]))
        except Unexpected as exc:
            self.problem = str(exc)
            self._buffer.clear()
        return found

    def leftover(self) -> int:
        return len(self._buffer)


# -- datagrams between the runtime's own processes ---------------------------------------------

class Channel:
    """One end of a SOCK_SEQPACKET socketpair: a message per datagram, fds alongside."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(one), cls(two)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        self.socket.close()

    def send(self, name: str, fds: list[int] = (), /, **fields) -> None:
        body = _body(*message(name, **fields))
        if fds:
            socket.send_fds(self.socket, [body], list(fds))
        else:
            self.socket.send(body)

    def receive(self, *expected: str) -> tuple[str, dict, list[int]] | None:
        """The next message, one of ``expected``, and the fds it brought; None when
        the other end is gone. Unexpected (its fds closed) for anything else."""
        body, fds, _, _ = socket.recv_fds(self.socket, MAX_DATAGRAM, MAX_FDS)
        if not body:
            for fd in fds:
                os.close(fd)
            return None
        try:
            name, fields = check(_parse(body), expected)
        except Unexpected:
            for fd in fds:
                os.close(fd)
            raise
        return name, fields, fds
