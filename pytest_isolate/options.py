"""Options: one table, three sources (ini < command line < marker), one validator each.

Every value is checked here, before any container starts; a bad one is a
``pytest.UsageError`` that names where it came from, the option and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

MODES = ("fork", "fresh")
IMAGES = ("host",)
DEFAULT_HOSTNAME = "isolated"
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


def parse_seccomp(value: Any, base: str) -> str:
    """"default", "unconfined", or the path of a profile in Docker's JSON format."""
    accepted = "'default', 'unconfined', or the path of a seccomp profile in Docker's JSON format"
    if value in ("default", "unconfined"):
        return value
    if not isinstance(value, str) or not value:
        raise OptionError(f"got {value!r}; accepted: {accepted}")
    path = os.path.realpath(os.path.join(base, os.path.expanduser(value)))
    try:
        with open(path) as f:
            profile = json.load(f)
    except OSError as exc:
        raise OptionError(f"cannot read {path}: {exc.strerror}; accepted: {accepted}") from None
    except ValueError as exc:
        raise OptionError(f"{path} is not JSON ({exc}); accepted: {accepted}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("syscalls", []), list):
        raise OptionError(f"{path} is not a seccomp profile (no 'syscalls' list); accepted: {accepted}")
    from .runtime import seccomp

    try:  # compile it once now, so that a bad profile is a usage error
        seccomp.compile_profile(profile)
    except (seccomp.SeccompError, KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"{path}: {exc}") from None
    return path


def parse_cap_add(value: Any, base: str) -> tuple[str, ...]:
    """Capability names, with or without CAP_, any case; "ALL" grants every one."""
    from .runtime.capabilities import NUMBERS

    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {value!r}; accepted: a list of capability names, e.g. ['CAP_NET_ADMIN']")
    names = set()
    for item in value:
        name = item.upper() if isinstance(item, str) else None
        if name == "ALL":
            names.update(NUMBERS)
            continue
        if name and not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in NUMBERS:
            raise OptionError(f"unknown capability {item!r}; accepted: names from capabilities(7), "
                              "e.g. CAP_NET_ADMIN, or ALL")
        names.add(name)
    return tuple(sorted(names, key=NUMBERS.get))


def parse_landlock(value: Any, base: str) -> tuple[str, ...] | None:
    """False/None: off. True: writes only to /tmp, /dev/shm, the devices and :rw
    mounts. A list (or comma-separated string): those paths are writable too."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("", "0", "false", "off", "no", "none"):
            return None
        if lowered in ("1", "true", "on", "yes"):
            return ()
        value = [v.strip() for v in value.split(",") if v.strip()]
    if value is None or value is False:
        return None
    if value is True:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise OptionError(f"got {value!r}; accepted: True, False, or a list of absolute paths "
                          "(inside the container) that stay writable")
    return tuple(os.path.normpath(v) for v in value)


def parse_system_paths(value: Any, base: str) -> str:
    if value not in ("masked", "unconfined"):
        raise OptionError(f"got {value!r}; accepted: 'masked' (Docker's masked and read-only "
                          "/proc and /sys paths) or 'unconfined'")
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
        singular = {"mounts": "mount"}.get(self.name, self.name)
        return "--isolate-" + singular.replace("_", "-")

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
    Option("seccomp", parse_seccomp, "seccomp profile: default (Docker-like allowlist), "
           "unconfined, or a profile file in Docker's JSON format", "PROFILE"),
    Option("cap_add", parse_cap_add, "capabilities kept inside the containers' user namespace "
           "(repeatable; default: none)", "CAP", multiple=True),
    Option("landlock", parse_landlock, "restrict writes with Landlock to /tmp, /dev/shm, the "
           "devices, :rw mounts and these comma-separated paths (on/off/PATHS)", "on|off|PATHS"),
    Option("system_paths", parse_system_paths, "masked (default): Docker's masked and read-only "
           "/proc and /sys paths; unconfined: leave them", "masked|unconfined"),
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
