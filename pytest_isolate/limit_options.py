"""Validators of the resource-limit options (options.py's table holds them)."""

from __future__ import annotations

import re
from typing import Any

from .options import MAX_INT64, OptionError, PID_MAX_LIMIT, _key_values, _show


_SIZE = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,9})?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: Any, what: str) -> int:
    """Docker's sizes: bytes, or a number with b, k, m, g (binary multiples)."""
    accepted = f"{what}: a number of bytes, or a size like '64m', '512k', '1.5g'"
    if isinstance(value, bool):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and _SIZE.fullmatch(value):
        number, unit, _ = _SIZE.fullmatch(value).groups()
        size = int(float(number) * _UNITS[unit.lower()])
    else:
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    if not 0 < size <= MAX_INT64:
        raise OptionError(f"got {_show(value)}; accepted: {accepted} (> 0 and below 8 EiB)")
    return size


def parse_memory(value: Any, base: str) -> int | None:
    if value is None:
        return None
    size = parse_size(value, "memory")
    if size < 4 << 20:
        raise OptionError(f"got {_show(value)}; accepted: at least 4m (Docker's minimum is 6m)")
    return size


def parse_memory_swap(value: Any, base: str) -> int | None:
    """memory + swap, as Docker's --memory-swap; -1: unlimited swap."""
    if value is None:
        return None
    if value in (-1, "-1"):
        return -1
    return parse_size(value, "memory_swap (memory plus swap, or -1 for unlimited)")


def parse_cpus(value: Any, base: str) -> float | None:
    accepted = "a number of CPUs > 0 (a quota, like Docker's --cpus: 0.5 is half of one CPU)"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    try:
        cpus = float(value)
    except (ValueError, OverflowError):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}") from None
    if not 0.01 <= cpus < 1e6:  # also rejects nan and inf
        raise OptionError(f"got {_show(value)}; accepted: {accepted}, at least 0.01")
    return cpus


def parse_pids(value: Any, base: str) -> int | None:
    accepted = f"a number of processes and threads from 2 (the container's init and the test) to {PID_MAX_LIMIT}"
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,8}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= PID_MAX_LIMIT:
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    return value


RLIMITS = ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
           "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")


def parse_ulimits(value: Any, base: str) -> tuple[tuple[str, int, int], ...]:
    """{"nofile": 1024, "core": 0} or {"nofile": (soft, hard)}; on the command line
    and in ini files NAME=SOFT[:HARD]. -1 means unlimited."""
    accepted = ("a dict of rlimit names (" + ", ".join(RLIMITS) + ") to a limit or (soft, hard), "
                "e.g. {'nofile': 1024, 'core': 0}; NAME=SOFT[:HARD] on the command line")
    if isinstance(value, (str, list, tuple)):
        value = {name: (limit.partition(":")[0].strip(), limit.partition(":")[2].strip() or limit.strip())
                 for name, limit in _key_values(value, accepted).items()}
    if not isinstance(value, dict):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    result = []
    for name, limit in value.items():
        if name not in RLIMITS:
            raise OptionError(f"unknown rlimit {_show(name)}; accepted: {accepted}")
        soft, hard = limit if isinstance(limit, (tuple, list)) and len(limit) == 2 else (limit, limit)
        soft, hard = (_rlimit_number(v) for v in (soft, hard))
        if soft is None or hard is None or (hard != -1 and (soft == -1 or soft > hard)):
            raise OptionError(f"bad limit for {_show(name)}: {_show(limit)}; accepted: integers (-1 = unlimited), "
                              "soft <= hard")
        result.append((name, soft, hard))
    return tuple(result)


def _rlimit_number(value: Any) -> int | None:
    """An rlimit value (-1: unlimited), or None when it is not one."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,19}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_INT64:
        return None
    return value
