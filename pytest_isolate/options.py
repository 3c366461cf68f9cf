"""Options: one table, three sources (ini < command line < marker), one validator each.

Every value is checked here, before any container starts; a bad one is a
``pytest.UsageError`` that names where it came from, the option and what is accepted.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from typing import Any, Callable

MODES = ("fork", "fresh")
PULL_POLICIES = ("missing", "always", "never")
MAX_FLAKE_RUNS = 100_000
DEFAULT_HOSTNAME = "isolated"
PID_MAX_LIMIT = 4194304  # the kernel's largest pids.max
MAX_INT64 = (1 << 63) - 1
DEFAULT_CAPTURE_LIMIT = 8 << 20
MAX_CAPTURE_LIMIT = 1 << 30
# What stays writable under ``landlock`` (inside the container), besides :rw mounts.
LANDLOCK_WRITABLE = ("/tmp", "/dev/shm", "/dev/pts", "/dev/null", "/dev/zero", "/dev/full",
                     "/dev/random", "/dev/urandom", "/dev/tty")
# Labels of letters, digits and '-' (not at either end), joined by dots; Linux takes
# up to 64 characters in all (HOST_NAME_MAX).
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]+(?<!-)(\.(?!-)[A-Za-z0-9-]+(?<!-))*$")
_ENV_NAME = re.compile(r"^[^=\0]+$")
# Destinations a mount may not cover: the container's own /proc, /dev and /sys, and
# the runtime's private directories.
_RESERVED_DESTINATIONS = ("/proc", "/dev", "/sys", "/.pytest-isolate")


class OptionError(ValueError):
    """A bad value; the message says what is accepted."""


def _show(value: Any) -> str:
    """repr() for messages: bounded, and safe for values whose repr fails."""
    try:
        text = repr(value)
    except Exception:
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _no_nul(text: str, what: str) -> str:
    if "\0" in text:
        raise OptionError(f"{what} {_show(text)} contains a NUL byte")
    return text


@dataclasses.dataclass(frozen=True)
class Mount:
    src: str
    dst: str
    readonly: bool = True


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved container options of one test."""

    mode: str = "fork"
    image: str = "host"
    timeout: float | None = None
    hostname: str = DEFAULT_HOSTNAME
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    seccomp: str = "default"
    cap_add: tuple[str, ...] = ()
    landlock: tuple[str, ...] | None = None  # extra writable paths when on
    system_paths: str = "masked"
    memory: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    pids: int | None = None
    ulimits: tuple[tuple[str, int, int], ...] = ()
    limits: str = "strict"
    capture_limit: int = DEFAULT_CAPTURE_LIMIT
    python: str = "auto"
    network: str = "none"
    allow: tuple[tuple[str, int, str, str], ...] = ()  # (address, port, protocol, host name or "")
    netem: tuple[tuple[str, float], ...] = ()
    outbound: bool = False
    flake: int = 1  # runs of each test, each in a fresh container (flake.py)

    def image_key(self) -> str:
        """The image with the interpreter its container host runs: one host each."""
        return self.image if self.python == "auto" else f"{self.image} (python {self.python})"

    def problem(self) -> tuple[str, str] | None:
        """(option, why) when options that are fine alone do not fit together."""
        if self.python != "auto" and self.image == "host":
            return "python", "python= picks an interpreter inside an image; the host image runs pytest's own"
        if self.netem and self.network == "none":
            return "netem", "it shapes a private network's traffic: name one too, e.g. network='backend'"
        if self.memory_swap not in (None, -1):
            if self.memory is None:
                return "memory_swap", "it needs memory too (it is memory plus swap, as in Docker)"
            if self.memory_swap < self.memory:
                return "memory_swap", "it is memory plus swap, so it cannot be below memory"
        return None

    def has_cgroup_limits(self) -> bool:
        return any(v is not None for v in (self.memory, self.memory_swap, self.cpus, self.pids))


# -- validators: (raw value, base dir for relative paths) -> value ---------------------

def parse_mode(value: Any, base: str) -> str:
    if value not in MODES:
        raise OptionError(f"got {_show(value)}; accepted: {', '.join(map(repr, MODES))}")
    return value


def parse_image(value: Any, base: str) -> str:
    """An image reference (oci/reference.py), normalised: relative paths made absolute."""
    from .oci import reference

    try:
        return str(reference.parse(value, base))
    except reference.ReferenceError as exc:
        raise OptionError(str(exc)) from None


def parse_timeout(value: Any, base: str) -> float | None:
    """Seconds > 0; None, 0 or "none" mean no timeout (as in pytest-timeout)."""
    accepted = "a number of seconds > 0, or None / 0 for no timeout"
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}") from None
    if seconds == 0:
        return None
    if not seconds > 0 or seconds == float("inf"):  # also rejects nan
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    return seconds


def parse_hostname(value: Any, base: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _HOSTNAME.fullmatch(value):
        raise OptionError(
            f"got {_show(value)}; accepted: a hostname of at most 64 characters "
            "(letters, digits, '-' and '.')"
        )
    return value


def _key_values(value: Any, accepted: str) -> Any:
    """KEY=VALUE strings (command line and ini) as a dict; anything else as it is."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value
    pairs = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise OptionError(f"got {_show(item)}; accepted: {accepted}")
        key, _, val = item.partition("=")
        pairs[key.strip()] = val
    return pairs


def parse_env(value: Any, base: str) -> tuple[tuple[str, str], ...]:
    """A dict, or KEY=VALUE strings (command line and ini)."""
    value = _key_values(value, "KEY=VALUE")
    if not isinstance(value, dict):
        raise OptionError(f"got {_show(value)}; accepted: a dict of str to str, e.g. {{'A': '1'}}")
    result = []
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise OptionError(f"bad variable name {_show(key)}; accepted: a non-empty str without '='")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise OptionError(f"bad value for {_show(key)}: {_show(val)}; accepted: a str (or a number)")
        try:
            text = str(val)
        except ValueError:  # an int too large to print
            raise OptionError(f"bad value for {_show(key)}: {_show(val)}; accepted: a str (or a number)") from None
        if "\0" in text:
            raise OptionError(f"bad value for {_show(key)}: it contains a NUL byte")
        result.append((key, text))
    return tuple(result)


def parse_mounts(value: Any, base: str) -> tuple[Mount, ...]:
    """SRC:DST[:ro|rw] strings; a relative SRC is taken from ``base``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {_show(value)}; accepted: a list of 'SRC:DST[:ro|rw]' strings")
    mounts = []
    for spec in value:
        if not isinstance(spec, str):
            raise OptionError(f"got {_show(spec)}; accepted: 'SRC:DST[:ro|rw]'")
        parts = spec.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            src, dst, flag = parts
        elif len(parts) == 2:
            (src, dst), flag = parts, "ro"
        else:
            raise OptionError(f"got {_show(spec)}; accepted: 'SRC:DST[:ro|rw]' (ro is the default)")
        if not src or not dst:
            raise OptionError(f"got {_show(spec)}; SRC and DST must not be empty")
        _no_nul(spec, "the mount")
        src = os.path.realpath(os.path.join(base, os.path.expanduser(src)))
        if not os.path.exists(src):
            raise OptionError(f"{_show(spec)}: the source {src!r} does not exist")
        if not dst.startswith("/"):
            raise OptionError(f"{_show(spec)}: the destination must be an absolute path")
        dst = "/" + os.path.normpath(dst).lstrip("/")  # normpath keeps a leading "//"
        if dst == "/" or ".." in dst.split("/"):
            raise OptionError(f"{_show(spec)}: the destination must be below / and without '..'")
        if any(dst == r or dst.startswith(r + "/") for r in _RESERVED_DESTINATIONS):
            raise OptionError(f"{_show(spec)}: {dst} is reserved for the container's own mounts")
        mounts.append(Mount(src, dst, flag == "ro"))
    return tuple(mounts)


def parse_python(value: Any, base: str) -> str:
    """auto, or an absolute path inside the image."""
    if value == "auto":
        return value
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or posixpath.normpath(value) != value:
        raise OptionError(f"got {_show(value)}; accepted: 'auto' (the image's Python of pytest's version) or an "
                          "absolute, normalised path in the image, e.g. '/usr/local/bin/python3.12'")
    return value


def parse_limits_mode(value: Any, base: str) -> str:
    if value not in ("strict", "best-effort"):
        raise OptionError(f"got {_show(value)}; accepted: 'strict' (a limit that cannot be enforced "
                          "fails the test) or 'best-effort' (fall back to rlimits, and say so)")
    return value


def parse_capture_limit(value: Any, base: str) -> int:
    """What the controller takes of one test's captured output, per stream and report
    section; the rest is cut off with a marker."""
    if value is None:
        return DEFAULT_CAPTURE_LIMIT
    size = parse_size(value, "capture_limit")
    if not 4096 <= size <= MAX_CAPTURE_LIMIT:
        raise OptionError(f"got {_show(value)}; accepted: a size from 4k to 1g (default 8m)")
    return size


from .hardening import (  # noqa: E402 - they use OptionError and _show above
    parse_cap_add, parse_landlock, parse_seccomp, parse_system_paths,
)
from .network_options import parse_allow, parse_netem, parse_network, parse_outbound  # noqa: E402
from .limit_options import (  # noqa: E402, F401 - parse_size and RLIMITS are used elsewhere too
    RLIMITS, parse_cpus, parse_memory, parse_memory_swap, parse_pids, parse_size, parse_ulimits,
)


def parse_flake(value: Any, base: str) -> int:
    """How many times each test runs: 1 (the default: once) to MAX_FLAKE_RUNS."""
    accepted = f"a number of runs from 1 (once, the default) to {MAX_FLAKE_RUNS}"
    if value is None:
        return 1
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,6}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FLAKE_RUNS:
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the marker keyword
    parse: Callable[[Any, str], Any]
    help: str
    metavar: str
    multiple: bool = False  # env and mounts accumulate across sources

    @property
    def flag(self) -> str:
        singular = {"mounts": "mount", "ulimits": "ulimit"}.get(self.name, self.name)
        return "--isolate-" + singular.replace("_", "-")

    @property
    def ini(self) -> str:
        return "isolate_" + self.name


OPTIONS = (
    Option("mode", parse_mode, "fork: fork each container from a host that collected once "
           "(default); fresh: a fresh interpreter per test", "fork|fresh"),
    Option("image", parse_image, "root filesystem of the containers: host (default, a read-only "
           "view of this host), oci:PATH[:TAG], docker-archive:PATH[:NAME:TAG] or dir:PATH", "IMAGE"),
    Option("timeout", parse_timeout, "seconds before a test's container is killed and the "
           "test fails (default: none)", "SECONDS"),
    Option("hostname", parse_hostname, f"hostname inside the containers (default: {DEFAULT_HOSTNAME})",
           "NAME"),
    Option("env", parse_env, "set an environment variable inside the containers (repeatable)",
           "KEY=VALUE", multiple=True),
    Option("mounts", parse_mounts, "bind a host path into the containers, read-only unless "
           ":rw (repeatable)", "SRC:DST[:ro|rw]", multiple=True),
    Option("network", parse_network, "none (default: only lo) or the name of a private network the "
           "containers of this run share", "none|NAME"),
    Option("allow", parse_allow, "a service of this machine the containers may reach, through a relay; "
           "HOST an IP address, localhost or a host name (repeatable)", "HOST:PORT[/tcp|udp]", multiple=True),
    Option("netem", parse_netem, "network faults on a private network: delay, jitter, loss, rate "
           "(repeatable), e.g. delay=50ms", "KEY=VALUE", multiple=True),
    Option("outbound", parse_outbound, "let the containers reach the outside, through slirp4netns "
           "(default: no)", "yes|no"),
    Option("seccomp", parse_seccomp, "seccomp profile: default (Docker-like allowlist), "
           "unconfined, or a profile file in Docker's JSON format", "PROFILE"),
    Option("cap_add", parse_cap_add, "capabilities kept inside the containers' user namespace "
           "(repeatable; default: none)", "CAP", multiple=True),
    Option("landlock", parse_landlock, "restrict writes with Landlock to /tmp, /dev/shm, the "
           "devices, :rw mounts and these comma-separated paths (on/off/PATHS)", "on|off|PATHS"),
    Option("system_paths", parse_system_paths, "masked (default): Docker's masked and read-only "
           "/proc and /sys paths; unconfined: leave them", "masked|unconfined"),
    Option("memory", parse_memory, "memory limit of each container, e.g. 64m (cgroup)", "SIZE"),
    Option("memory_swap", parse_memory_swap, "memory plus swap limit, e.g. 128m; -1: unlimited "
           "swap (default: as much swap as memory)", "SIZE"),
    Option("cpus", parse_cpus, "CPU quota of each container, e.g. 0.5 (cgroup)", "CPUS"),
    Option("pids", parse_pids, "most processes and threads in each container (cgroup)", "N"),
    Option("ulimits", parse_ulimits, "rlimits inside the containers (repeatable), e.g. nofile=1024 "
           "or core=0", "NAME=SOFT[:HARD]", multiple=True),
    Option("limits", parse_limits_mode, "strict (default): a limit that cannot be enforced fails "
           "the test; best-effort: fall back to rlimits and report it", "strict|best-effort"),
    Option("capture_limit", parse_capture_limit, "most captured output taken from a test, per stream "
           "and report section; the rest is cut off with a marker (default: 8m)", "SIZE"),
    Option("python", parse_python, "the interpreter the container host runs in an image: auto (default: "
           "the image's Python of pytest's version) or a path in the image", "auto|PATH"),
    Option("flake", parse_flake, "run each test N times, each in a fresh container, and report its failure "
           "rate and a verdict: stable, flaky or broken (default: 1, once)", "N"),
)
BY_NAME = {option.name: option for option in OPTIONS}


def merge(layers: list[dict[str, Any]]) -> Settings:
    """Fold parsed layers, lowest priority first: later scalars win, env keys merge
    (later wins per key) and mounts add up (a later mount of the same DST wins)."""
    values: dict[str, Any] = {}
    env: dict[str, str] = {}
    mounts: dict[str, Mount] = {}
    ulimits: dict[str, tuple[str, int, int]] = {}
    for layer in layers:
        for name, value in layer.items():
            if name == "env":
                env.update(value)
            elif name == "mounts":
                mounts.update((m.dst, m) for m in value)
            elif name == "ulimits":
                ulimits.update((u[0], u) for u in value)
            else:
                values[name] = value
    return Settings(env=tuple(env.items()), mounts=tuple(mounts.values()),
                    ulimits=tuple(ulimits.values()), **values)
