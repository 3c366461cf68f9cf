"""Options: one table, three sources (ini < command line < marker), one validator each.

Every value is checked here, before any container starts; a bad one is a
``pytest.UsageError`` that names where it came from, the option and what is accepted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

MODES = ("fork", "fresh")
IMAGES = ("host",)
DEFAULT_HOSTNAME = "isolated"
# Labels of letters, digits and '-' (not at either end), joined by dots; Linux takes
# up to 64 characters in all (HOST_NAME_MAX).
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]+(?<!-)(\.(?!-)[A-Za-z0-9-]+(?<!-))*$")
_ENV_NAME = re.compile(r"^[^=\0]+$")
# Destinations a mount may not cover: the container's own /proc, /dev and /sys, and
# the runtime's private directories.
_RESERVED_DESTINATIONS = ("/proc", "/dev", "/sys", "/.pytest-isolate")


class OptionError(ValueError):
    """A bad value; the message says what is accepted."""


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


# -- validators: (raw value, base dir for relative paths) -> value ---------------------

def parse_mode(value: Any, base: str) -> str:
    if value not in MODES:
        raise OptionError(f"got {value!r}; accepted: {', '.join(map(repr, MODES))}")
    return value


def parse_image(value: Any, base: str) -> str:
    if value not in IMAGES:
        raise OptionError(f"got {value!r}; accepted: 'host' (a read-only view of this host)")
    return value


def parse_timeout(value: Any, base: str) -> float | None:
    """Seconds > 0; None, 0 or "none" mean no timeout (as in pytest-timeout)."""
    accepted = "a number of seconds > 0, or None / 0 for no timeout"
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise OptionError(f"got {value!r}; accepted: {accepted}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"got {value!r}; accepted: {accepted}") from None
    if seconds == 0:
        return None
    if not seconds > 0 or seconds == float("inf"):  # also rejects nan
        raise OptionError(f"got {value!r}; accepted: {accepted}")
    return seconds


def parse_hostname(value: Any, base: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _HOSTNAME.match(value):
        raise OptionError(
            f"got {value!r}; accepted: a hostname of at most 64 characters "
            "(letters, digits, '-' and '.')"
        )
    return value


def parse_env(value: Any, base: str) -> tuple[tuple[str, str], ...]:
    """A dict, or KEY=VALUE strings (command line and ini)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise OptionError(f"got {item!r}; accepted: KEY=VALUE")
            key, _, val = item.partition("=")
            pairs[key.strip()] = val
        value = pairs
    if not isinstance(value, dict):
        raise OptionError(f"got {value!r}; accepted: a dict of str to str, e.g. {{'A': '1'}}")
    result = []
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise OptionError(f"bad variable name {key!r}; accepted: a non-empty str without '='")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise OptionError(f"bad value for {key!r}: {val!r}; accepted: a str (or a number)")
        if "\0" in str(val):
            raise OptionError(f"bad value for {key!r}: it contains a NUL byte")
        result.append((key, str(val)))
    return tuple(result)


def parse_mounts(value: Any, base: str) -> tuple[Mount, ...]:
    """SRC:DST[:ro|rw] strings; a relative SRC is taken from ``base``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {value!r}; accepted: a list of 'SRC:DST[:ro|rw]' strings")
    mounts = []
    for spec in value:
        if not isinstance(spec, str):
            raise OptionError(f"got {spec!r}; accepted: 'SRC:DST[:ro|rw]'")
        parts = spec.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            src, dst, flag = parts
        elif len(parts) == 2:
            (src, dst), flag = parts, "ro"
        else:
            raise OptionError(f"got {spec!r}; accepted: 'SRC:DST[:ro|rw]' (ro is the default)")
        if not src or not dst:
            raise OptionError(f"got {spec!r}; SRC and DST must not be empty")
        src = os.path.realpath(os.path.join(base, os.path.expanduser(src)))
        if not os.path.exists(src):
            raise OptionError(f"{spec!r}: the source {src} does not exist")
        if not dst.startswith("/"):
            raise OptionError(f"{spec!r}: the destination must be an absolute path")
        dst = os.path.normpath(dst)
        if dst == "/" or ".." in dst.split("/"):
            raise OptionError(f"{spec!r}: the destination must be below / and without '..'")
        if any(dst == r or dst.startswith(r + "/") for r in _RESERVED_DESTINATIONS):
            raise OptionError(f"{spec!r}: {dst} is reserved for the container's own mounts")
        mounts.append(Mount(src, dst, flag == "ro"))
    return tuple(mounts)


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the marker keyword
    parse: Callable[[Any, str], Any]
    help: str
    metavar: str
    multiple: bool = False  # env and mounts accumulate across sources

    @property
    def flag(self) -> str:
        return "--isolate-" + self.name.replace("_", "-").rstrip("s") if self.multiple \
            else "--isolate-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "isolate_" + self.name


OPTIONS = (
    Option("mode", parse_mode, "fork: fork each container from a host that collected once "
           "(default); fresh: a fresh interpreter per test", "fork|fresh"),
    Option("image", parse_image, "root filesystem of the containers (default: host, a "
           "read-only view of this host)", "IMAGE"),
    Option("timeout", parse_timeout, "seconds before a test's container is killed and the "
           "test fails (default: none)", "SECONDS"),
    Option("hostname", parse_hostname, f"hostname inside the containers (default: {DEFAULT_HOSTNAME})",
           "NAME"),
    Option("env", parse_env, "set an environment variable inside the containers (repeatable)",
           "KEY=VALUE", multiple=True),
    Option("mounts", parse_mounts, "bind a host path into the containers, read-only unless "
           ":rw (repeatable)", "SRC:DST[:ro|rw]", multiple=True),
)
BY_NAME = {option.name: option for option in OPTIONS}


def merge(layers: list[dict[str, Any]]) -> Settings:
    """Fold parsed layers, lowest priority first: later scalars win, env keys merge
    (later wins per key) and mounts add up (a later mount of the same DST wins)."""
    values: dict[str, Any] = {}
    env: dict[str, str] = {}
    mounts: dict[str, Mount] = {}
    for layer in layers:
        for name, value in layer.items():
            if name == "env":
                env.update(value)
            elif name == "mounts":
                mounts.update((m.dst, m) for m in value)
            else:
                values[name] = value
    return Settings(env=tuple(env.items()), mounts=tuple(mounts.values()), **values)
