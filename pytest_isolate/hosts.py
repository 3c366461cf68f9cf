"""The controller's end of one container host: an execnet gateway whose interpreter
sits in the image (the launcher, then remote.py), started, spoken to in the typed
messages of runtime/link.py (everything it sends is checked: a host runs test code),
watched, shut down and killed."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

import execnet
import pytest

from . import boundary, coverage_support, hypothesis_support, remote, shared_support
from .options import DEFAULT_HOSTNAME, LANDLOCK_WRITABLE, Settings
from .runtime import launch, link, rootfs

# Options that must differ in a container host (xdist's remote does the same).
HOST_OPTION_OVERRIDES = {
    "usepdb": False, "trace": False, "dist": "no", "numprocesses": None, "tx": [],
    "looponfail": False, "basetemp": None, "xmlpath": None,
    # pytest-cov must not start there (it would write into the read-only project):
    # the tests' coverage comes back as events (coverage_support.py).
    "cov_source": [],
}


class HostError(Exception):
    """A container host could not start or was lost; the message says why."""


# How long after a test's timeout the controller stops waiting for its host (which
# kills the container at the timeout) and kills the host instead.
WATCHDOG_GRACE = 30.0
# A host's messages besides a test's events and output: their longest string.
MAX_HOST_TEXT = 1 << 20
# How long a host may take to shut down: the shared fixtures' teardown runs then.
SHUTDOWN_TIMEOUT = 300.0


LINK_ERRORS = (EOFError, OSError, execnet.RemoteError, execnet.TimeoutError)


def _lost_link(exc: BaseException) -> HostError:
    last_line = (str(exc).strip().splitlines() or [""])[-1]
    return HostError(f"lost the link to the container host: {type(exc).__name__}: {last_line}")


def _plain_options(option_namespace) -> dict[str, Any]:
    """The parsed options as builtin values that execnet can carry."""
    result = {}
    for key, value in vars(option_namespace).items():
        if key == "file_or_dir":  # positional: given as args, argparse warns otherwise
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, (list, tuple)):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        try:
            execnet.dumps(value)
        except execnet.DumpError:
            continue
        result[key] = value
    result.update(HOST_OPTION_OVERRIDES)
    return result


def _absolute_arg(arg: str, base: str) -> str:
    path, sep, rest = arg.partition("::")
    return os.path.join(base, path) + sep + rest if path and not os.path.isabs(path) else arg


class ContainerHost:
    """One container host: an execnet gateway whose interpreter sits in the image."""

    def __init__(self, controller, mode: str, image: str, sources: list[dict]) -> None:
        self.controller = controller
        self.mode = mode
        self.image = image
        config = controller.config
        invocation_dir = str(config.invocation_params.dir)
        rootdir = str(config.rootpath)
        if invocation_dir == rootdir or invocation_dir.startswith(rootdir + os.sep):
            self.cwd = invocation_dir
        else:
            self.cwd = rootdir
        self.built = controller.image(image)
        self.entries = self.built.entries
        self.sources = sources
        base = rootdir if config.args_source == pytest.Config.ArgsSource.TESTPATHS else invocation_dir
        self.args = [_absolute_arg(a, base) for a in config.args]
        self.start_seconds = 0.0
        self.notes: list[str] = []
        self.collected = 0
        self.rss: int | None = None
        self.shared: shared_support.HostShared | None = None
        self.gateway = None
        self.channel = None
        self._zygote_pid: int | None = None
        self._host_pidfd: int | None = None

    def start(self) -> None:
        started = time.perf_counter()
        xspec = execnet.XSpec("popen")
        image = self.built
        xspec.python = launch.launcher_command(sys.executable, image.python, entries=self.entries,
                                               sources=self.sources, cwd=self.cwd, hostname=DEFAULT_HOSTNAME,
                                               env=image.env, python_path=image.sys_path or [],
                                               allow=sorted(map(list, self.controller.allowed.get(
                                                   (self.mode, self.image), ()))),
                                               networks=sorted(self.controller.networks.get(
                                                   (self.mode, self.image), ())),
                                               outbound=self.controller.outbound.get((self.mode, self.image)))
        try:
            with coverage_support.host_environment():
                self.gateway = self.controller.group.makegateway(xspec)
            self.channel = self.gateway.remote_exec(remote)
        except (*LINK_ERRORS, execnet.HostNotFound) as exc:
            raise _lost_link(exc) from None
        config = self.controller.config
        workerinput = dict(self.controller.workerinput)
        workerinput[coverage_support.SETTINGS_KEY] = self.controller.coverage.container_settings()
        examples = hypothesis_support.examples_directory()  # the container reads it, read-only
        if examples is not None:
            workerinput[hypothesis_support.WORKERINPUT_KEY] = examples
        try:
            self._send("start", entries=self.entries, args=self.args, option_dict=_plain_options(config.option),
                       workerinput=workerinput, argv=list(sys.argv), collect=self.mode == "fork",
                       shared=controller_shared(self), own_stdlib=image.sys_path is not None,
                       own_packages=image.pytest is not None,
                       sys_path=list(sys.path) if image.sys_path is None else image.sys_path)
        except HostError as exc:
            raise self._remote_failure() or exc from None
        try:
            name, data = self._receive(remote_errors=False)
        except execnet.RemoteError as exc:
            raise self._remote_failure(exc) from None
        except HostError as exc:
            raise HostError(f"the container host failed while starting ({exc})") from None
        if name == "host_error":
            message = boundary.text(data["message"], "the host's error", MAX_HOST_TEXT, none=True)
            raise HostError(
                f"the container host could not be built: {message}\n"
                "Run `python -m pytest_isolate doctor` to see what this machine offers."
            )
        if name != "ready":
            raise HostError(f"the container host answered {name} instead of starting")
        try:
            self.collected = boundary.integer(data["collected"], "the number collected", 0, 1 << 40)
            self.rss = boundary.integer(data["rss"], "the host's memory", 0, 1 << 62, none=True)
            self.notes = [boundary.text(n, "a note", MAX_HOST_TEXT) for n in
                          boundary.sequence(data["notes"], "the host's notes")][:100]
            self.shared = shared_support.HostShared(data["shared"])
            self._watch(boundary.integer(data["host_pid"], "the host's pid", 1, 1 << 30, none=True))
        except boundary.Tampering as exc:
            self.kill()
            raise HostError(f"the container host sent a broken start message ({exc})") from None
        self.start_seconds = time.perf_counter() - started

    def _remote_failure(self, error: execnet.RemoteError | None = None) -> HostError | None:
        """Why the host's end of the link ended before its first message, in one line
        instead of execnet's traceback: mostly an error importing this plugin's remote
        side there (e.g. pytest not importable by the image's interpreter)."""
        if error is None:
            try:
                self.channel.receive(timeout=10)
            except execnet.RemoteError as exc:
                error = exc
            except LINK_ERRORS:
                return None
        if error is None:
            return None
        last_line = (str(error).strip().splitlines() or [""])[-1][:4096]
        return HostError(f"the container host's Python ({self.built.python}) failed before it started: {last_line}")

    def _watch(self, pid: int | None) -> None:
        """Keep a pidfd of the host process (pid as this controller sees it), checked
        to be the launcher's child: the host says which pid it is, and is not trusted."""
        launcher = self._launcher()
        if pid is None or launcher is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            with open(f"/proc/{pid}/status") as f:
                parent = next((line.split()[1] for line in f if line.startswith("PPid:")), "")
        except OSError:
            parent = ""
        if parent != str(launcher.pid):
            os.close(fd)
            return
        self._host_pidfd = fd

    def _launcher(self):
        return getattr(getattr(self.gateway, "_io", None), "popen", None)

    def kill(self) -> None:
        """End this host and every container in it, and return once they are gone:
        the host is pid 1 of the pid namespace every container lies below, so when its
        process has exited, so has every process of its containers."""
        launcher = self._launcher()
        pidfd, self._host_pidfd = self._host_pidfd, None
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if launcher is not None:
                launcher.kill()  # the host dies with it (a parent-death signal), if not yet
            if pidfd is not None:
                select.select([pidfd], [], [], 10)
            if launcher is not None:
                launcher.wait(10)
        except (OSError, ValueError, TimeoutError, Exception):  # noqa: BLE001 - it is gone or going
            pass
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _receive(self, timeout: float | None = None, remote_errors: bool = True) -> tuple[str, dict]:
        """The host's next message (runtime/link.py: its name and fields checked; the
        fields' values are the caller's to check). ``remote_errors=False``: the
        caller takes execnet.RemoteError itself."""
        try:
            message = self.channel.receive(timeout)
        except LINK_ERRORS as exc:
            if not remote_errors and isinstance(exc, execnet.RemoteError):
                raise
            raise _lost_link(exc) from None
        try:
            return link.check(message, link.FROM_HOST)
        except link.Unexpected as exc:
            raise HostError(f"the container host broke its protocol ({exc})") from None

    def _send(self, name: str, /, **fields) -> None:
        try:
            self.channel.send(link.to_text(name, **fields))
        except LINK_ERRORS as exc:
            raise _lost_link(exc) from None

    def zygote_pid(self) -> int:
        """The pid of the host's limits zygote (started on first use): checked to lie in
        the host's pid namespace, since the controller writes it into cgroup.procs."""
        if self._zygote_pid is None:
            self._send("zygote")
            name, data = self._receive(60)
            if name != "zygote_pid":
                raise HostError(f"the container host answered {name} instead of starting its zygote")
            pid = data["pid"]
            if isinstance(pid, bool) or not isinstance(pid, int) or not self._in_host(pid):
                raise HostError(f"the container host named a zygote that is not its own ({str(pid)[:20]})")
            self._zygote_pid = pid
        return self._zygote_pid

    def _in_host(self, pid: int) -> bool:
        """Whether ``pid`` (as this controller sees it) lives in the host's pid namespace."""
        launcher = self._launcher()
        if launcher is None or pid <= 1:
            return False
        try:
            ns = os.stat(f"/proc/{launcher.pid}/ns/pid_for_children")
            theirs = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            return False
        return (ns.st_dev, ns.st_ino) == (theirs.st_dev, theirs.st_ino)

    def run(self, nodeid: str, settings: Settings, fresh_arg: str, plan, caps: tuple[int, int],
            programs: list[str], services: list[dict] = ()):
        """Send one test and yield what comes back: ("events", {chunk}) now and then,
        and last ("done", {...}). Their values unchecked: the caller checks (replay.py)."""
        mounts = [
            {"type": "bind", "dst": m.dst, "stage_src": rootfs.source_path(self.controller.source_index(m)),
             "ro": m.readonly, "src": m.src}
            for m in settings.mounts
        ]
        landlock = None
        if settings.landlock is not None:
            landlock = list(LANDLOCK_WRITABLE) + [m.dst for m in settings.mounts if not m.readonly]
            landlock += list(settings.landlock)
        events_cap, capture_cap = caps
        self._send("run", nodeid=nodeid, mode=settings.mode, timeout=settings.timeout, fresh_arg=fresh_arg,
                   seccomp_programs=programs, in_zygote=plan.group is not None, events_cap=events_cap,
                   capture_cap=capture_cap, services=list(services),
                   container_config={"hostname": settings.hostname, "network": settings.network,
                                     "allow": [list(target[:3]) for target in settings.allow],
                                     "allow_hosts": sorted({(t[0], t[3]) for t in settings.allow if t[3]}),
                                     "netem": [list(fault) for fault in settings.netem],
                                     "outbound": settings.outbound,
                                     "describe": _describe(settings, plan, services),
                                     "env": dict(settings.env),
                                     "mounts": mounts, "cwd": self.cwd, "cap_add": list(settings.cap_add),
                                     "system_paths": settings.system_paths, "landlock": landlock,
                                     "rlimits": [list(limit) for limit in plan.rlimits]})
        # The host ends the test at its timeout; this only guards against a host that
        # does not. The deadline is fixed now: nothing the host sends moves it.
        deadline = None if settings.timeout is None else time.monotonic() + settings.timeout + WATCHDOG_GRACE
        while True:
            name, data = self._receive(None if deadline is None else max(deadline - time.monotonic(), 0.001))
            if name not in ("events", "done"):
                raise HostError(f"the container host sent {name} while a test ran")
            yield name, data
            if name == "done":
                return

    def close(self) -> str | None:
        """Shut the host down; the shared fixtures' teardown error, if any."""
        error = None
        if self.channel is not None:
            try:
                self._send("shutdown")
                name, data = self._receive(SHUTDOWN_TIMEOUT)
                if name != "closed":
                    raise HostError(f"the container host answered {name} to shutdown")
                error = shared_support.teardown_error(data["teardown_error"])
                self.channel.waitclose(10)
            except Exception as exc:  # noqa: BLE001 - lost, hung or broken: it is killed
                self.kill()
                if self.shared is not None and self.shared.names:
                    error = f"the container host did not shut down cleanly ({exc}), nor tear down its shared fixtures"
        if self._host_pidfd is not None:
            os.close(self._host_pidfd)
            self._host_pidfd = None
        return error


def controller_shared(host: ContainerHost) -> list:
    """What a host sets up once: [nodeid, fixture name] pairs (fork mode only)."""
    return host.controller.shared_wanted.get((host.mode, host.image), []) if host.mode == "fork" else []


def settings_caps(settings: Settings) -> tuple[int, int]:
    """(events cap, capture cap) of one test: what its host reads of it, at most.
    A report carries the captured output of its phases (each section capped in the
    container), so the events may take several times the capture cap."""
    capture = settings.capture_limit
    return 8 * capture + (16 << 20), capture


def _describe(settings: Settings, plan, services) -> dict:
    """What the isolated_container fixture says (container_info.py); the host adds
    the addresses."""
    limits = {"memory": settings.memory, "memory_swap": settings.memory_swap, "cpus": settings.cpus,
              "pids": settings.pids, "timeout": settings.timeout,
              "ulimits": {name: [soft, hard] for name, soft, hard in settings.ulimits}}
    return {"hostname": settings.hostname, "network": settings.network, "limits": limits,
            "enforcement": plan.enforcement, "services": [spec["name"] for spec in services]}
