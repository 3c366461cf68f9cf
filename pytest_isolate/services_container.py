"""Service containers, inside: what a test's fixture returns, the log sections of a
failed test's report, and the service process's exec.

Imports nothing of the plugin but services.py's dataclass (like remote.py, this runs
in container hosts and test processes).
"""

from __future__ import annotations

import os

import pytest

# Where a test sees the services' logs (read-only), and a service its own (services_host.py).
LOGS = "/run/pytest-isolate/services"
OWN_LOG = "/run/pytest-isolate/log"
LOG_SECTION_CAP = 64 << 10
_current: dict[str, dict] = {}


def set_current(services: dict) -> None:
    """The services of this test process's job: name -> {host, address, addresses, port}."""
    _current.clear()
    _current.update(services)


def current(name: str):
    from .services import Service

    found = _current.get(name)
    if found is None:
        return None
    return Service(name=name, host=found["host"], address=found["address"], addresses=tuple(found["addresses"]),
                   port=found["port"], log_path=f"{LOGS}/{found['log']}")


def log_tail(name: str) -> str:
    found = _current.get(name)
    if found is None:
        return ""
    try:
        with open(f"{LOGS}/{found['log']}", "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - LOG_SECTION_CAP))
            data = file.read(LOG_SECTION_CAP)
    except OSError as exc:
        return f"(its log cannot be read: {exc.strerror})"
    prefix = f"[... the first {size - len(data)} bytes left out ...]\n" if size > len(data) else ""
    return prefix + data.decode("utf-8", "replace")


class LogSections:
    """A failed test's report carries the log of every service it used."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed and _current:
            for name in sorted(_current):
                report.sections.append((f"service {name} log", log_tail(name)))


def exec_service(job: dict, files: dict) -> None:
    """The payload of a service's process: its output into its log, then its command."""
    log = os.open(OWN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(files["crashlog"], b"exec\n")  # the host's sign that it got this far (ready=None)
    os.closerange(3, 1 << 16)  # nothing of the host's: the command gets 0, 1, 2
    argv = job["argv"]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"pytest-isolate: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
        os._exit(127)
