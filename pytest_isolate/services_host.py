"""Service containers, in the container host: start them, wait until they are ready,
stop them when their scope ends.

A service is built like a test's container (the factory, a zygote, the same
hardening), on the test's private network with a fixed address (.0.2 upwards), its
name as hostname; its process execs the command (services_container.exec_service).
It lives in the host's pid namespace, so it dies with the host: with the run, also
after a SIGKILLed pytest, with no reaper. Its output goes to a log file in the
host's private /tmp, bound read-only into the tests that use it and read for
readiness and for the report of a failed test.

Readiness is seen from outside without touching the service: a TCP port in LISTEN
in its /proc/net/tcp{,6} (opened by the factory inside its network namespace), or
a regex over its log. A service that exits first, or is not ready in time, fails
the test that waits for it, with its log.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time

from pytest_isolate import services_container
from pytest_isolate.runtime import link, pipeline

LOG_DIR = "/tmp/.pytest-isolate-services"
LOG_CAP_IN_ERRORS = 16 << 10
_LISTEN = "0A"


class ServiceError(Exception):
    """A service that could not start or get ready; the message has its log."""


class Running:
    def __init__(self, spec: dict, network: str, number: int, prepared: pipeline.Prepared, log: str) -> None:
        self.spec = spec
        self.network = network
        self.number = number
        self.prepared = prepared
        self.log = log  # its file name in LOG_DIR
        self.addresses = prepared.namespaces.addresses

    def info(self) -> dict:
        ready = self.spec["ready"] or {}
        return {"host": self.spec["name"], "address": self.addresses[0], "addresses": self.addresses,
                "port": ready.get("port"), "log": self.log}


class Services:
    def __init__(self, factory: pipeline.InitFactory, masks: list) -> None:
        self.factory = factory
        self.masks = masks
        self.running: dict[str, Running] = {}  # by key
        self._numbers: dict[str, set[int]] = {}  # network -> host numbers in use
        self.snapshots: set[str] = set()  # the names of those taken (services_snapshot.py)

    def mounts(self, found: dict) -> list[dict]:
        """What a test that uses services gets: their logs, read-only."""
        if not found:
            return []
        return [{"type": "bind", "dst": services_container.LOGS, "stage_src": LOG_DIR, "src": LOG_DIR, "ro": True}]

    def hosts(self, network: str) -> list[list[str]]:
        """The /etc/hosts lines of the services on ``network``."""
        return [[address, r.spec["name"]] for r in self.running.values() if r.network == network
                for address in r.addresses]

    def ensure(self, specs: list[dict], network: str, nodeid: str, zygote, seccomp_programs: list) -> dict:
        """Stop the services whose scope ended; start (and wait for) those this test
        needs; name -> what its fixture returns (services_container.current)."""
        from pytest_isolate.services import instance_of

        wanted = {spec["key"] for spec in specs}
        for key, running in list(self.running.items()):
            scope = running.spec["scope"]
            if key not in wanted and running.spec["instance"] != instance_of(scope, nodeid):
                self.stop(key)
        found = {}
        for spec in specs:
            running = self.running.get(spec["key"])
            if running is not None and running.network != network:
                raise ServiceError(f"the service {spec['name']!r} runs on the network {running.network!r}, and this "
                                   f"test is on {network!r}: put the tests of one service instance on one network")
            if running is None:
                snapshot = None
                if spec.get("snapshot"):
                    from pytest_isolate import services_snapshot

                    snapshot = services_snapshot.copy_of(self, spec, network, zygote, seccomp_programs)
                running = self._start(spec, network, zygote, seccomp_programs, snapshot)
            found[spec["name"]] = running.info()
        return found

    def after_test(self) -> None:
        for key, running in list(self.running.items()):
            if running.spec["scope"] == "function":
                self.stop(key)

    def stop(self, key: str) -> None:
        running = self.running.pop(key)
        self._numbers[running.network].discard(running.number)
        prepared = running.prepared
        # The service's process is the zygote's child: its pid namespace (and so init)
        # ends only once the zygote has reaped it. So: kill it, reap it, then the rest.
        if prepared.test:
            try:
                signal.pidfd_send_signal(prepared.test_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            prepared.zygote.reap(prepared.test)
            prepared.test = 0
        if prepared.test_pidfd >= 0:
            os.close(prepared.test_pidfd)
            prepared.test_pidfd = -1
        prepared.namespaces.end(wait=5)
        prepared.close_files()

    def shutdown(self) -> None:
        for key in list(self.running):
            self.stop(key)

    def _start(self, spec: dict, network: str, zygote, seccomp_programs: list,
               snapshot: dict | None = None) -> Running:
        used = self._numbers.setdefault(network, set())
        number = next(n for n in range(2, 255) if n not in used)  # 253 services per network at once
        os.makedirs(LOG_DIR, mode=0o755, exist_ok=True)
        log = f"{spec['key']}.log"
        log_path = f"{LOG_DIR}/{log}"
        os.close(os.open(log_path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        os.chmod(log_path, 0o666)  # a service with user= writes it too (it is bound into its container alone)
        mounts = [{"type": "bind", "dst": services_container.OWN_LOG, "stage_src": log_path, "src": log_path,
                   "ro": False}]
        build = {"mounts": mounts, "hostname": spec["name"], "network": network, "hosts": self.hosts(network),
                 "allow": [], "netem": [], "outbound": False}
        container = self.factory.wait(self.factory.request(build, host_number=number, watch_ports=True,
                                                           snapshot=snapshot))
        config = dict(build, env=spec["env"], cwd="/", cap_add=[], system_paths="masked", landlock=None,
                      rlimits=[], seccomp_programs=seccomp_programs, masks=self.masks, user=spec["user"])
        prepared = pipeline.Prepared(config, container, zygote)
        try:
            prepared.started()
        except OSError as exc:
            prepared.cancel()
            raise ServiceError(f"the service {spec['name']!r} could not start: {exc}") from None
        prepared.go_service(spec["argv"])
        used.add(number)
        running = self.running[spec["key"]] = Running(spec, network, number, prepared, log)
        try:
            self._wait_until_ready(running, log_path)
        except ServiceError:
            self.stop(spec["key"])
            raise
        return running

    def _wait_until_ready(self, running: Running, log_path: str) -> None:
        spec, prepared = running.spec, running.prepared
        ready = spec["ready"]
        deadline = time.monotonic() + spec["ready_timeout"]
        pattern = re.compile(ready["pattern"]) if ready and ready["kind"] == "log" else None
        delay = 0.001
        while True:
            exited = select.select([prepared.test_pidfd], [], [], 0)[0]
            if exited:
                status, _ = prepared.zygote.reap(prepared.test)
                prepared.test = 0  # reaped: stop() must not reap it again
                why = _container_error(prepared.events_fd)
                if why:
                    raise ServiceError(f"the service {spec['name']!r} could not start: {why}")
                raise ServiceError(f"the service {spec['name']!r} ({' '.join(spec['argv'])}) exited "
                                   f"{_describe(status)} before it was ready; its log:\n{_tail(log_path)}")
            if ready is None:
                if os.fstat(prepared.file("crashlog")).st_size:  # it reached its exec
                    return
            elif ready["kind"] == "tcp" and ready["port"] in _listening(prepared.namespaces.watched):
                return
            elif pattern is not None and pattern.search(_tail(log_path, 1 << 20)):
                return
            if time.monotonic() > deadline:
                what = "its command to start" if ready is None else f"TCP port {ready['port']} listening" \
                    if ready["kind"] == "tcp" else f"its log matching {ready['pattern']!r}"
                raise ServiceError(f"the service {spec['name']!r} was not ready after {spec['ready_timeout']:g} s "
                                   f"(waiting for {what}); its log:\n{_tail(log_path)}")
            select.select([prepared.test_pidfd], [], [], delay)
            delay = min(delay * 2, 0.05)


def _container_error(events_fd: int) -> str | None:
    """Why a service's process stopped before its command: the container_error our
    own code wrote before the exec (the command itself never holds that file)."""
    data = os.pread(events_fd, 1 << 16, 0)
    for name, fields in link.Reader(1 << 16).feed(data):
        if name == "container_error" and isinstance(fields.get("message"), str):
            return fields["message"][:4096]
    return None


def _listening(files: list[int]) -> set[int]:
    """The TCP ports in LISTEN in /proc/net/tcp and tcp6 (the fds the factory opened
    inside the service's network namespace)."""
    ports = set()
    for fd in files:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        for line in b"".join(chunks).decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tail(path: str, cap: int = LOG_CAP_IN_ERRORS) -> str:
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - cap))
            return file.read(cap).decode("utf-8", "replace")
    except OSError as exc:
        return f"(its log cannot be read: {exc.strerror})"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"on signal {os.WTERMSIG(status)}"
    return f"with status {os.waitstatus_to_exitcode(status)}"
