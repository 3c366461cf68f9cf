"""Service containers, the user's side: ``service()`` makes a fixture.

    redis = pytest_isolate.service("redis", ["redis-server", "--save", ""], ready=pytest_isolate.tcp(6379))

    @pytest.mark.isolated(network="backend")
    def test_cache(redis):
        socket.create_connection((redis.host, redis.port))

A service is a sibling container on the test's private network, started by the
container host before the first test that uses it and stopped when its scope ends
(services_host.py). The fixture, evaluated inside the test's container, gives the
test what it needs to reach it (services_container.py). A test on network="none"
that uses a service joins the private network "services".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import signal
from typing import Any

import pytest

SCOPES = ("session", "package", "module", "class", "function")
DEFAULT_NETWORK = "services"
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 30.0
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
SERVICE_ATTRIBUTE = "_pytest_isolate_service"
_USER = re.compile(r"^([a-z_][a-z0-9_.-]{0,31}|[0-9]{1,10}(:[0-9]{1,10})?)$")


@dataclasses.dataclass(frozen=True)
class Ready:
    """When a service is ready: its TCP port listens, or its log matches a regex."""

    kind: str
    port: int | None = None
    pattern: str | None = None

    def describe(self) -> str:
        return f"TCP port {self.port} listening" if self.kind == "tcp" else f"its log matching {self.pattern!r}"


def tcp(port: int) -> Ready:
    """Ready once the service listens on TCP ``port`` (seen in its own network
    namespace, without connecting to it)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise pytest.UsageError(f"pytest_isolate.tcp(): got {port!r}; accepted: a TCP port, 1 to 65535")
    return Ready("tcp", port=port)


def log(pattern: str) -> Ready:
    """Ready once a line of the service's output matches ``pattern`` (a regex)."""
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise pytest.UsageError(f"pytest_isolate.log(): {pattern!r} is not a regular expression ({exc})") from None
    return Ready("log", pattern=pattern)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """service(..., snapshot=...): start the service once, stop it with
    ``stop_signal``, and start each instance from a copy of what it wrote."""

    stop_signal: int = signal.SIGTERM
    stop_timeout: float = DEFAULT_STOP_TIMEOUT


def snapshot(*, stop_signal: int = signal.SIGTERM, stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> Snapshot:
    """How a service's snapshot is taken: the signal that stops it cleanly, and how
    long it may take to exit (seconds)."""
    where = "pytest_isolate.snapshot()"
    if isinstance(stop_signal, bool) or not isinstance(stop_signal, int) or \
            stop_signal not in set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}:
        raise pytest.UsageError(f"{where}: stop_signal: got {stop_signal!r}; accepted: a signal the service exits "
                                "on cleanly, e.g. signal.SIGTERM or signal.SIGINT (not SIGKILL or SIGSTOP)")
    if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, (int, float)) or not 0 < stop_timeout < 3600:
        raise pytest.UsageError(f"{where}: stop_timeout: got {stop_timeout!r}; accepted: seconds, 0 to 3600")
    return Snapshot(int(stop_signal), float(stop_timeout))


@dataclasses.dataclass(frozen=True)
class Service:
    """What a test gets from a service's fixture."""

    name: str
    host: str  # its name on the network (/etc/hosts)
    address: str  # IPv4
    addresses: tuple[str, ...]  # IPv4 and IPv6
    port: int | None  # the port of tcp() readiness, if any
    log_path: str

    def log(self) -> str:
        """What the service wrote so far (stdout and stderr)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()


def service(name: str, command: list[str] | tuple[str, ...], *, ready: Ready | None = None,
            scope: str | None = None, env: dict[str, str] | None = None,
            ready_timeout: float = DEFAULT_READY_TIMEOUT, user: str | None = None,
            snapshot: bool | Snapshot = False):
    """A fixture named ``name`` whose value is the running service (Service).
    ``user``: who the command runs as inside its container (root by default).
    ``snapshot``: True or pytest_isolate.snapshot(...): each instance starts from a
    snapshot of the service's state, taken once (services_snapshot.py); ``scope``
    is then "function" unless given (else "session")."""
    where = f"pytest_isolate.service({name!r})"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise pytest.UsageError(f"pytest_isolate.service(): got the name {name!r}; accepted: a Python identifier "
                                "(it is the fixture's name and the service's host name), e.g. 'redis'")
    if isinstance(command, str) or not isinstance(command, (list, tuple)) or not command or \
            not all(isinstance(part, str) and "\0" not in part for part in command) or not command[0]:
        raise pytest.UsageError(f"{where}: command: got {command!r}; accepted: a non-empty list of strings, "
                                "e.g. ['redis-server', '--save', '']")
    if ready is not None and not isinstance(ready, Ready):
        raise pytest.UsageError(f"{where}: ready: got {ready!r}; accepted: pytest_isolate.tcp(PORT), "
                                "pytest_isolate.log(REGEX) or None (ready once started)")
    if snapshot is True:
        snapshot = Snapshot()
    elif snapshot is False or snapshot is None:
        snapshot = None
    elif not isinstance(snapshot, Snapshot):
        raise pytest.UsageError(f"{where}: snapshot: got {snapshot!r}; accepted: True, False or "
                                "pytest_isolate.snapshot(stop_signal=..., stop_timeout=...)")
    if scope is None:
        scope = "function" if snapshot else "session"
    if scope not in SCOPES:
        raise pytest.UsageError(f"{where}: scope: got {scope!r}; accepted: {', '.join(SCOPES)}")
    env = dict(env or {})
    if not all(isinstance(k, str) and k and "=" not in k and "\0" not in k and isinstance(v, str) and "\0" not in v
               for k, v in env.items()):
        raise pytest.UsageError(f"{where}: env: accepted: a dict of str to str")
    if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) or not 0 < ready_timeout < 3600:
        raise pytest.UsageError(f"{where}: ready_timeout: got {ready_timeout!r}; accepted: seconds, 0 to 3600")
    if user is not None and (not isinstance(user, str) or not _USER.fullmatch(user)):
        raise pytest.UsageError(f"{where}: user: got {user!r}; accepted: a user name of the image, a uid, or "
                                "UID:GID, e.g. 'postgres' or '999:999'")
    spec = {"name": name, "argv": list(command), "env": env, "scope": scope, "ready_timeout": float(ready_timeout),
            "ready": dataclasses.asdict(ready) if ready else None, "user": user,
            "snapshot": dataclasses.asdict(snapshot) if snapshot else None}

    def fixture():
        from . import services_container

        found = services_container.current(name)
        if found is None:
            pytest.fail(f"the service {name!r} runs only for isolated tests: mark the test "
                        "@pytest.mark.isolated (or run with --isolate)", pytrace=False)
        return found

    fixture.__name__ = name
    fixture.__doc__ = f"The service {name!r}: {' '.join(command)}"
    setattr(fixture, SERVICE_ATTRIBUTE, spec)
    return pytest.fixture(name=name, scope="session" if scope == "package" else scope)(fixture)


# -- the controller: which services a test uses -------------------------------------------

def specs_for(item: pytest.Item) -> list[dict[str, Any]]:
    """The services ``item`` uses (fixtures made by service(), the ones in force for
    it), each with the key of its instance: a scope's instance serves the tests of
    that scope."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found = []
    for name in item.fixturenames:
        definitions = info.name2fixturedefs.get(name) or ()
        if not definitions:
            continue
        spec = getattr(definitions[-1].func, SERVICE_ATTRIBUTE, None)
        if spec is None:
            continue
        instance = instance_of(spec["scope"], item.nodeid)
        digest = hashlib.sha256(json.dumps([spec, instance], sort_keys=True).encode()).hexdigest()[:16]
        found.append(dict(spec, key=f"{spec['name']}-{digest}", instance=instance))
    return found


def instance_of(scope: str, nodeid: str) -> str:
    """Which instance of a ``scope``-scoped service the test ``nodeid`` uses (the host
    stops an instance when a test of another one comes: services_host.py)."""
    if scope in ("session", "package"):
        return ""
    if scope == "module":
        return nodeid.split("::", 1)[0]
    if scope == "class":
        return nodeid.rsplit("::", 1)[0]
    return nodeid
