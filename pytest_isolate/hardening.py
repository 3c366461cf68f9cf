"""The hardening options: seccomp profiles (read and compiled once, here, in the
controller), kept capabilities, Landlock and the masking of system paths."""

from __future__ import annotations

import json
import os
from typing import Any

from .options import OptionError, _no_nul, _show

MAX_PROFILE_SIZE = 1 << 20


def parse_seccomp(value: Any, base: str) -> str:
    """"default", "unconfined", or the path of a profile in Docker's JSON format."""
    accepted = "'default', 'unconfined', or the path of a seccomp profile in Docker's JSON format"
    if value in ("default", "unconfined"):
        return value
    if not isinstance(value, str) or not value:
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    _no_nul(value, "the profile path")
    path = os.path.realpath(os.path.join(base, os.path.expanduser(value)))
    try:
        if not os.path.isfile(path):
            raise OptionError(f"{path!r} is not a regular file; accepted: {accepted}")
        if os.path.getsize(path) > MAX_PROFILE_SIZE:
            raise OptionError(f"{path!r} is larger than {MAX_PROFILE_SIZE} bytes; accepted: {accepted}")
        with open(path) as f:
            profile = json.load(f)
    except OSError as exc:
        raise OptionError(f"cannot read {path!r}: {exc.strerror}; accepted: {accepted}") from None
    except (ValueError, RecursionError) as exc:
        raise OptionError(f"{path!r} is not JSON ({_show(str(exc))}); accepted: {accepted}") from None
    from .runtime import seccomp

    _profiles[path] = profile
    try:  # check and compile it now, so that a bad profile is a usage error
        seccomp.validate_profile(profile)
        seccomp_programs(path, ())
    except seccomp.SeccompError as exc:
        raise OptionError(f"{path!r}: {exc}") from None
    return path


# Profiles as read when their option was parsed: read once, whatever reads them later.
_profiles: dict[str, dict] = {}
_programs: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def seccomp_programs(setting: str, caps: tuple[str, ...]) -> list[str]:
    """The compiled seccomp programs (base64, as runtime/link.py carries them) a test
    with ``setting`` (parse_seccomp's value) and ``caps`` loads: compiled once each.
    The default profile comes with the terminal-injection filter. SeccompError if
    the profile cannot be compiled (e.g. libseccomp is missing)."""
    key = (setting, tuple(sorted(caps)))
    if setting == "unconfined":
        return []
    if key not in _programs:
        from .runtime import link, seccomp, seccomp_default

        if setting == "default":
            programs = [seccomp.compile_profile(seccomp_default.default_profile(), set(caps)),
                        seccomp.argument_filter(seccomp_default.TERMINAL_INJECTION)]
        else:
            if setting not in _profiles:  # a setting made without parse_seccomp
                with open(setting) as f:
                    _profiles[setting] = json.load(f)
            programs = [seccomp.compile_profile(_profiles[setting], set(caps))]
        _programs[key] = [link.binary(program) for program in programs]
    return _programs[key]


def parse_cap_add(value: Any, base: str) -> tuple[str, ...]:
    """Capability names, with or without CAP_, any case; "ALL" grants every one."""
    from .runtime.capabilities import NUMBERS

    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {_show(value)}; accepted: a list of capability names, e.g. ['CAP_NET_ADMIN']")
    names = set()
    for item in value:
        name = item.upper() if isinstance(item, str) and item.isascii() else None
        if name == "ALL":
            names.update(NUMBERS)
            continue
        if name and not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in NUMBERS:
            raise OptionError(f"unknown capability {_show(item)}; accepted: names from capabilities(7), "
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
        raise OptionError(f"got {_show(value)}; accepted: True, False, or a list of absolute paths "
                          "(inside the container) that stay writable")
    return tuple("/" + os.path.normpath(_no_nul(v, "the path")).lstrip("/") for v in value)


def parse_system_paths(value: Any, base: str) -> str:
    if value not in ("masked", "unconfined"):
        raise OptionError(f"got {_show(value)}; accepted: 'masked' (Docker's masked and read-only "
                          "/proc and /sys paths) or 'unconfined'")
    return value
