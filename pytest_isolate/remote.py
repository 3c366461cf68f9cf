"""The container host's pytest glue: collects once, then runs each test in a
container of its own.

Like xdist's ``remote.py`` this module is shipped to the other process by execnet
(``gateway.remote_exec(remote)``) and imports nothing of the plugin: only pytest,
reporter.py / fresh.py / coverage_container.py (the in-container side) and the stdlib-only
``pytest_isolate.runtime``. It speaks the typed messages of runtime/link.py:

    controller -> host   start, then any of: run, zygote, shutdown
    host -> controller   ready | host_error; zygote_pid (the limits zygote, for
                         cgroup.procs); per test, every 0.25 s of a long test, the
                         events written so far (events), then done; closed (the
                         answer to shutdown, after the shared fixtures' teardown)

What a test writes (its events, its captured output, its crash log) is untrusted:
the host does not decode it, it only reads it within caps and passes the bytes on;
the controller checks them (boundary.py). Why a test could not run at all
(container_error, not_collected) the host says the same way, as events.

For each test the host takes a container that the factory built ahead
(runtime/pipeline.py) and has its zygote fork the test process into it. The
zygote's payload either runs the collected item in that process (mode "fork",
reporter.py) or execs a fresh interpreter that collects and runs just that node id
(mode "fresh", fresh.py). The test is over when its process has ended
(runtime/supervisor.py).
"""

from __future__ import annotations

import gc
import os
import site
import sys
import time

import pytest

from pytest_isolate import (
    container_info, coverage_container, fresh, reporter, services_container, services_host, shared_container,
)
from pytest_isolate.runtime import hugepages, launch, link, masks, pipeline, process
from pytest_isolate.runtime.supervisor import Supervisor, read_capped
from pytest_isolate.runtime.zygote import Zygote

CRASHLOG_CAP = 1 << 20
# How long after the timeout (when faulthandler dumps the stack) the container dies.
KILL_GRACE = 0.25


def _resident_bytes() -> int | None:
    """This process's resident memory (VmRSS): what every fork of it maps."""
    rss = process.status_field("VmRSS")  # ["38212", "kB"]
    return int(rss[0]) * 1024 if rss else None


class Host:
    """The container host's session: collects once, then has a container made per test."""

    def __init__(self, config: pytest.Config, channel, start: dict, launched: dict) -> None:
        self.config = config
        self.channel = channel
        self.start = start
        self.launched = launched
        self.fixtures = reporter.ContainerFixtures()
        self.items: dict[str, pytest.Item] = {}
        self.collect_errors: list[str] = []
        self.started = time.perf_counter()
        self._zygotes: dict[bool, Zygote] = {}  # by "in the limits cgroup"
        # No properties with side effects on this plugin object: pytest < 8.3 getattr()s
        # every attribute of a plugin when it registers it (looking for fixtures), which
        # once forked the zygote before collection, with no items.
        self.pipeline = pipeline.Pipeline(pipeline.InitFactory(link.Channel.from_fd(launched["factory_fd"])))
        self.masks = masks.system_path_masks()
        self.shared = shared_container.Shared()
        self.services = services_host.Services(self.pipeline.factory, self.masks)
        self.ready = False

    def send(self, name: str, /, **fields) -> None:
        self.channel.send(link.message(name, **fields))

    # -- the session -----------------------------------------------------------------------

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session):
        if not self.start["collect"]:  # mode "fresh": every test collects for itself
            session.items = []
            self.pytest_collection_finish(session)
            return True
        return None

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = {item.nodeid: item for item in session.items}
        reporter.silence_session_output(self.start["session_output_fd"])
        self.ready = True
        # Before anything is forked: every test inherits them (shared_container.py).
        self.shared.set_up(session, self.items, self.start["shared"])
        self.send("ready", collected=len(self.items), host_pid=process.outer_pid(), rss=_resident_bytes(),
                  seconds=time.perf_counter() - self.started, notes=self.launched["notes"],
                  shared={"names": self.shared.names, "seconds": self.shared.seconds, "notes": self.shared.notes})

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        # Every container is forked from here: move what collection built out of the
        # collector's reach, or the first gc in each child copies the whole heap ...
        gc.collect()
        gc.freeze()
        # ... and map it with huge pages: forks of a big session then cost little more
        # than forks of a small one (runtime/hugepages.py).
        hugepages.collapse()
        while True:
            name, fields = link.read_text(self.channel.receive(), link.TO_HOST)
            if getattr(self, "controller_" + name)(**fields) is False:
                return True

    # -- what the controller asks ------------------------------------------------------------

    def controller_zygote(self) -> None:
        """The controller puts the limits zygote into the limits cgroup."""
        self.send("zygote_pid", pid=self.zygote(in_limits=True).pid)

    def controller_shutdown(self) -> bool:
        self.services.shutdown()
        self.pipeline.shutdown()
        self.send("closed", teardown_error=self.shared.tear_down())
        return False

    def controller_run(self, nodeid: str, container_config: dict, mode: str, timeout, fresh_arg: str,
                       seccomp_programs: list, in_zygote: bool, events_cap: int, capture_cap: int,
                       services: list) -> None:
        if nodeid not in self.items and mode == "fork":
            why = "\n".join(self.collect_errors) or "it was not collected there"
            self._cannot_run("not_collected", message=f"{nodeid} was not collected in its container host:\n"
                             f"{why[:CRASHLOG_CAP]}")
            return
        unlocked = self.launched["mounts_unlocked"]
        if unlocked and "CAP_SYS_ADMIN" in container_config["cap_add"]:
            self._cannot_run("container_error", message=(
                f"cap_add=SYS_ADMIN is refused here: the image's mounts could not be locked "
                f"({unlocked}), so the test could make them writable"), step="mount locking")
            return
        started = time.perf_counter()
        network = container_config["network"]
        try:  # before the test's container: its /etc/hosts names them
            found = self.services.ensure(services, network, nodeid, self.zygote(in_limits=False), seccomp_programs)
        except (services_host.ServiceError, OSError, pipeline.InitError) as exc:
            self._cannot_run("container_error", message=str(exc)[:CRASHLOG_CAP], step="services")
            return
        config = dict(container_config, seccomp_programs=seccomp_programs, masks=self.masks,
                      mounts=container_config["mounts"] + self.shared.mounts + self.services.mounts(found),
                      hosts=self.services.hosts(network) + [list(h) for h in container_config["allow_hosts"]])
        # Limited tests are forked by the zygote in their cgroup and waited for to the
        # end: the next one must not share its limits with this one's leftovers.
        zygote = self.zygote(in_limits=in_zygote)
        try:
            test = self.pipeline.take(config, zygote)
        except (OSError, pipeline.InitError) as exc:
            self._cannot_run("container_error", message=str(exc)[:CRASHLOG_CAP],
                             step=getattr(exc, "step", "start"))
            return
        deadline = time.monotonic() + timeout if timeout else None
        test.go(nodeid=nodeid, fresh_arg=fresh_arg, deadline=deadline, capture_cap=capture_cap, services=found,
                container=dict(container_config["describe"], addresses=test.namespaces.addresses))
        if not in_zygote:
            self.pipeline.prepare_next(config, zygote)  # while this test runs
        supervisor = Supervisor(test.test_pidfd, test.events_fd, deadline and deadline + KILL_GRACE,
                                kill=test.namespaces.end, cap=events_cap,
                                relay=lambda chunk: self.send("events", chunk=chunk))
        rest = supervisor.wait()
        os.close(test.test_pidfd)
        test.test_pidfd = -1
        status, rusage = zygote.reap(test.test)
        clean = status == 0 and not supervisor.timed_out and supervisor.tampered is None
        # The kernel tears the rest down, off our path; but what a test that did not
        # end cleanly left (or a limited test, whose cgroup the next one uses) must
        # be gone before the next test starts.
        test.namespaces.end(wait=0 if clean and not in_zygote else 5)
        self.send("done", status=status, timed_out=supervisor.timed_out, tampered=supervisor.tampered,
                  stdout=read_capped(test.file("stdout"), capture_cap, "captured stdout"),
                  stderr=read_capped(test.file("stderr"), capture_cap, "captured stderr"),
                  crashlog="" if clean else read_capped(test.file("crashlog"), CRASHLOG_CAP, "the crash log"),
                  rusage=rusage, duration=time.perf_counter() - started, events=rest)
        test.close_files()
        self.services.after_test()

    def _cannot_run(self, event: str, **fields) -> None:
        """The test never ran: why, as the one event of a test that ended without status."""
        self.send("done", status=None, timed_out=False, tampered=None, stdout="", stderr="", crashlog="",
                  rusage={}, duration=0.0, events=link.encode(*link.message(event, **fields)))

    # -- what the containers need ------------------------------------------------------------

    def zygote(self, in_limits: bool) -> Zygote:
        """The zygote that forks the tests (runtime/zygote.py), made after gc.freeze();
        a second one forks the limited tests, from inside the limits cgroup."""
        if in_limits not in self._zygotes:
            # pytest's capture files and the session's output stay the same all session.
            keep = reporter.capture_fds(self.config) | {self.start["session_output_fd"]}
            test = fresh.payload(self.start) if self.start["mode"] == "fresh" else self._run_item

            def payload(job: dict, files: dict) -> None:
                if "argv" in job:  # a service's process (services_host.py)
                    services_container.exec_service(job, files)
                test(job, files)

            self._zygotes[in_limits] = Zygote(payload, keep)
        return self._zygotes[in_limits]

    def _run_item(self, job: dict, files: dict) -> None:
        """The payload in mode "fork": run the collected item, in the test's process."""
        test = reporter.TestReporter(self.config, files, job["capture_cap"])
        self.fixtures.reporter = test
        self.shared.forget_in_test()
        services_container.set_current(job["services"])
        container_info.set_current(job["container"])
        test.run_item(self.items[job["nodeid"]], job["deadline"])


def serve(channel) -> None:
    launched = link.from_text(os.environ.pop(launch.LAUNCHED_ENV), "launched")
    if launched["error"]:
        channel.send(link.message("host_error", message=launched["error"]))
        return
    _, start = link.read_text(channel.receive(), ("start",))
    try:
        if start["own_packages"]:  # an image's interpreter and pytest: this plugin first
            sys.path[:] = list(dict.fromkeys(start["sys_path"] + sys.path))
        elif start["own_stdlib"]:  # an image's interpreter: its standard library, our packages
            own = [p for p in sys.path if not {"site-packages", "dist-packages"} & set(p.split("/"))]
            sys.path[:] = own + start["sys_path"]
            for path in start["sys_path"]:
                if {"site-packages", "dist-packages"} & set(path.split("/")):
                    site.addsitedir(path)  # its .pth files: editable installs
        else:
            sys.path[:] = start["sys_path"]
        start = dict(start, sys_path=list(sys.path))  # a fresh interpreter's (fresh.py)
        sys.argv[:] = start["argv"]  # e.g. doctest.testmod() reads '-v' from it
        start = dict(start, session_output_fd=reporter.quiet_session_output(kept=True),
                     mode="fork" if start["collect"] else "fresh")
        config = reporter.make_config(start["option_dict"], start["args"], start["workerinput"])
        coverage_container.prepare(start["workerinput"])
        host = Host(config, channel, start, launched)
        config.pluginmanager.register(host, "isolate-host")
        config.pluginmanager.register(host.fixtures, "isolate-fixtures")
        config.pluginmanager.register(services_container.LogSections(), "isolate-service-logs")
    except Exception as exc:  # e.g. the project's pytest.toml unreadable in the image
        channel.send(link.message("host_error", message=_start_failure(exc, launched["notes"])))
        return
    status = config.hook.pytest_cmdline_main(config=config)
    if not host.ready:  # pytest stopped before collecting: say why, not just EOF
        output = reporter.session_output_tail(start["session_output_fd"])
        channel.send(link.message("host_error", message=f"pytest stopped there before collecting "
                                  f"(exit status {int(status) if status is not None else '?'}):\n{output}"))


def _start_failure(exc: Exception, notes: list[str]) -> str:
    """Why pytest could not start in the host, with what the stage noted (a bind that
    could not be idmapped explains most permission errors)."""
    message = process.describe_error(exc)
    if isinstance(exc, OSError) and exc.filename:
        message += f": {exc.filename}"
    return "; ".join([f"pytest could not start there ({message})"] + notes)


if __name__ == "__channelexec__":
    serve(channel)  # type: ignore[name-defined]  # noqa: F821
