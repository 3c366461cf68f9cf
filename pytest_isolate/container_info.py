"""The ``isolated_container`` fixture: what a test's container is (hostname, network,
addresses), the limits in force and how they are enforced, and what it used so far.

The host puts the description into the test's job (remote.py, fresh.py); the fixture
reads it inside the container. In a plain test it fails with what to do.
"""

from __future__ import annotations

import dataclasses
import resource
from typing import Any

import pytest

_current: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Usage:
    cpu_seconds: float  # the test's process and the children it waited for
    max_rss: int  # bytes, its largest process


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    hostname: str
    network: str  # "none" or the private network's name
    addresses: tuple[str, ...]  # on the private network (IPv4, IPv6); none on "none"
    limits: dict  # memory, memory_swap, cpus, pids (None: no limit), timeout (s), ulimits
    enforcement: str  # how the limits are enforced ("cgroup v1", "best-effort ...", "" without limits)
    services: tuple[str, ...]  # the services the test uses

    def usage(self) -> Usage:
        """What this test used so far."""
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return Usage(cpu_seconds=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
                     max_rss=max(own.ru_maxrss, children.ru_maxrss) * 1024)


def set_current(description: dict) -> None:
    _current.clear()
    _current.update(description)


def current() -> ContainerInfo | None:
    if not _current:
        return None
    d = _current
    return ContainerInfo(hostname=d["hostname"], network=d["network"], addresses=tuple(d["addresses"]),
                         limits=dict(d["limits"]), enforcement=d["enforcement"], services=tuple(d["services"]))


@pytest.fixture
def isolated_container() -> ContainerInfo:
    """The container of an isolated test: hostname, network, addresses, limits and usage."""
    info = current()
    if info is None:
        pytest.fail("isolated_container describes the container of an isolated test: mark the test "
                    "@pytest.mark.isolated (or run with --isolate)", pytrace=False)
    return info
