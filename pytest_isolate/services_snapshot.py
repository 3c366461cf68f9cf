"""Snapshots of services (service(..., snapshot=True)), in the container host.

Before the first instance of such a service, the host starts it once, the
"template", in a container whose overlay upper directory the factory keeps
(runtime/snapshots.py); waits until it is ready, as for any service; then stops it
with its stop signal and waits for it to exit, so what it wrote is complete on
disk. Every instance after that ("copies") starts its command again on a root that
stacks the template's upper directory under a fresh one of its own: the state the
template left (e.g. an initdb'd PostgreSQL cluster), never what another copy wrote.

A snapshot is taken once per container host (under xdist, once per worker) and kept
until the host ends; the same service with other settings (command, env, user,
readiness, stop signal) has a snapshot of its own. A template that is not ready in
time, does not exit within stop_timeout, or exits otherwise than with status 0 or
on its stop signal fails the test that waited for it; the next one tries again.
"""

from __future__ import annotations

import hashlib
import os
import json
import select
import signal

from pytest_isolate import services_host

_PER_INSTANCE = ("scope", "instance", "key")


def name_of(spec: dict) -> str:
    """The snapshot's name: a digest of what makes the service's state."""
    settings = {k: v for k, v in spec.items() if k not in _PER_INSTANCE}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def copy_of(services: services_host.Services, spec: dict, network: str, zygote, seccomp_programs: list) -> dict:
    """What the factory needs to build a copy of ``spec``'s snapshot (taken now if
    this host has none yet)."""
    name = name_of(spec)
    if name not in services.snapshots:
        _take(services, spec, name, network, zygote, seccomp_programs)
        services.snapshots.add(name)
    return {"role": "copy", "name": name}


def _take(services: services_host.Services, spec: dict, name: str, network: str, zygote,
          seccomp_programs: list) -> None:
    template = dict(spec, key=f"{spec['name']}-snapshot-{name[:16]}")
    running = services._start(template, network, zygote, seccomp_programs, snapshot={"role": "template", "name": name})
    prepared, stop = running.prepared, spec["snapshot"]
    signal_name = signal.Signals(stop["stop_signal"]).name
    log_path = f"{services_host.LOG_DIR}/{running.log}"
    try:
        signal.pidfd_send_signal(prepared.test_pidfd, stop["stop_signal"])
    except ProcessLookupError:
        pass
    if not select.select([prepared.test_pidfd], [], [], stop["stop_timeout"])[0]:
        services.stop(template["key"])  # SIGKILL: what it wrote may be half done
        raise services_host.ServiceError(
            f"the service {spec['name']!r} did not exit within {stop['stop_timeout']:g} s of {signal_name}, so "
            f"its snapshot was not taken: make it exit on {signal_name}, or give pytest_isolate.snapshot("
            f"stop_signal=..., stop_timeout=...); its log:\n{services_host._tail(log_path)}")
    status, _ = prepared.zygote.reap(prepared.test)
    prepared.test = 0  # reaped: stop() must not reap it again
    services.stop(template["key"])  # ends its container: its overlay goes, its upper directory stays
    if status != 0 and not (os.WIFSIGNALED(status) and
                            os.WTERMSIG(status) == stop["stop_signal"]):
        raise services_host.ServiceError(
            f"the service {spec['name']!r} exited {services_host._describe(status)} on {signal_name}, not "
            f"cleanly, so its snapshot was not taken; its log:\n{services_host._tail(log_path)}")
