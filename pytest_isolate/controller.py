"""The controller side: a container host per mode and image (hosts.py), the plan of
mounts, limits and shared fixtures, and the replay of what the containers report as
ordinary pytest reports (replay.py)."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
import warnings

import execnet
import pytest

from . import boundary, coverage_support, images, shared_support
from .hardening import seccomp_programs
from .hosts import ContainerHost, HostError, settings_caps
from .limits import Limiter, human
from .options import Settings
from .replay import Replay
from .runtime import paths


class Controller:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.group = execnet.Group()
        self.hosts: dict[tuple[str, str], ContainerHost] = {}
        self.failed_hosts: dict[tuple[str, str], str] = {}
        self.sources: list[dict] = []
        self._images: dict[str, images.Image] = {}
        self._image_specs: dict[str, tuple[str, str]] = {}  # image key -> (reference, python)
        self._source_index: dict[tuple[str, bool], int] = {}
        self.workerinput = dict(getattr(config, "workerinput", None) or {
            "workerid": "master", "workercount": 1, "testrunuid": uuid.uuid4().hex,
        })
        self.workerinput["isolate_host"] = True
        self.tests_run = 0
        self.limiter = Limiter()
        self.usages: list = []
        self.shared_wanted: dict[tuple[str, str], list] = {}
        self.allowed: dict[tuple[str, str], set] = {}  # (mode, image key) -> allow= targets
        self.networks: dict[tuple[str, str], set] = {}  # (mode, image key) -> network names
        self.outbound: dict[tuple[str, str], str] = {}  # (mode, image key) -> slirp4netns, for outbound=True
        self.teardown_errors: list[str] = []
        self.pull_policy = "missing"
        self.insecure_registries: tuple[str, ...] = ()
        self.coverage = coverage_support.CoverageCollector(config)
        config.pluginmanager.register(self.coverage, "isolate-coverage-collector")

    def image(self, key: str) -> images.Image:
        """What an image (by Settings.image_key: the reference and the interpreter) is
        made of; pulled into the store as --isolate-pull says. ImageProblem when tests
        cannot run in it."""
        if key not in self._images:
            config = self.config
            project = [str(config.rootpath)] + ([str(config.inipath)] if config.inipath else [])
            image, python = self._image_specs.get(key, (key, "auto"))
            self._images[key] = images.resolve(image, project, self.pull_policy, self._pull_progress(), python,
                                               self.insecure_registries)
        return self._images[key]

    def _pull_progress(self):
        """Where a pull during the run says what it does: on a terminal, unless -q."""
        if not sys.stderr.isatty() or self.config.get_verbosity() < 0:
            return None

        def progress(what: str, done: int, total: int) -> None:
            end = "\n" if done + 1 >= total else ""
            sys.stderr.write(f"\rpytest-isolate: pulling {what}\033[K{end}")
            sys.stderr.flush()

        return progress

    def image_entries(self, image: str) -> list[dict]:
        return self.image(image).entries

    def plan(self, planned: list[tuple[pytest.Item, Settings]]) -> None:
        """Check mounts against their image and learn every source up front: hosts
        bind them when they start."""
        for item, settings in planned:
            self._image_specs[settings.image_key()] = (settings.image, settings.python)
            # What the host's relay may connect to: every allow= of its tests.
            self.allowed.setdefault((settings.mode, settings.image_key()), set()).update(
                target[:3] for target in settings.allow)
            if settings.outbound:
                self.outbound[(settings.mode, settings.image_key())] = _slirp4netns(item)
            if settings.network != "none":  # made ahead by the factory (factory.serve)
                self.networks.setdefault((settings.mode, settings.image_key()), set()).add(settings.network)
            try:
                self.image(settings.image_key())
            except images.ImageProblem as exc:
                option = "python" if settings.python != "auto" else "image"
                raise pytest.UsageError(f"{item.nodeid}: invalid {option!r}: {exc}") from None
            for mount in settings.mounts:
                problem = images.unmountable(self.image_entries(settings.image_key()), mount.dst)
                if problem:
                    raise pytest.UsageError(f"{item.nodeid}: invalid 'mounts': {problem}")
                try:
                    self.source_index(mount)
                except OSError as exc:
                    raise pytest.UsageError(f"{item.nodeid}: invalid 'mounts': the source {mount.src} cannot be "
                                            f"opened: {exc.strerror}") from None

    def plan_shared(self, names: list[str], planned: list[tuple[pytest.Item, Settings]]) -> None:
        """Which shared fixtures each fork-mode host sets up, through which test."""
        for image in {settings.image_key() for _, settings in planned}:
            users = [item for item, settings in planned if settings.mode == "fork" and settings.image_key() == image]
            self.shared_wanted[("fork", image)] = shared_support.first_users(names, users)

    def source_index(self, mount) -> int:
        """The number of a mount source; pinned the first time (OSError if it cannot
        be reached without a symlink): every host checks it mounts that object."""
        key = (mount.src, mount.readonly)
        if key not in self._source_index:
            pin = list(paths.pin(mount.src))
            self._source_index[key] = len(self.sources)
            self.sources.append({"src": mount.src, "ro": mount.readonly, "pin": pin})
        return self._source_index[key]

    def host_for(self, settings: Settings) -> ContainerHost:
        key = (settings.mode, settings.image_key())
        if key in self.failed_hosts:
            raise HostError(self.failed_hosts[key])
        host = self.hosts.get(key)
        if host is None:
            host = ContainerHost(self, settings.mode, settings.image_key(), self.sources)
            try:
                host.start()
            except HostError as exc:
                self.failed_hosts[key] = str(exc)
                raise
            self.hosts[key] = host
        return host

    def run(self, item: pytest.Item, nextitem: pytest.Item | None, settings: Settings,
            services: list[dict] = (), log=None) -> None:
        """Run ``item`` in a container; its reports go to pytest (or to ``log``)."""
        caps = settings_caps(settings)
        replay = Replay(item, settings, *caps, log=log)
        try:
            host = self.host_for(settings)
            replay.check_coverage = self.coverage.checker()
            plan = self.limiter.plan(settings, host)
            try:
                programs = seccomp_programs(settings.seccomp, settings.cap_add)
            except Exception as exc:  # e.g. no libseccomp: this test errors, the run goes on
                replay.cannot_start(str(exc), "seccomp profile")
                programs = None
            if plan.error:
                replay.host_failed(plan.error)
            elif programs is not None:
                try:
                    for name, data in host.run(item.nodeid, settings, self._fresh_arg(item), plan, caps, programs,
                                                 list(services)):
                        getattr(replay, "host_" + name)(data)
                except boundary.Tampering as exc:  # the host itself broke the protocol
                    raise HostError(f"the container host sent a broken message ({exc}); it was killed") from None
                replay.usage = self.limiter.usage(plan, replay.done)
                replay.oom = self.limiter.killed_by_oom(plan, replay.usage, replay.done)
                usage = replay.usage
                self.usages.append((item.nodeid, usage.peak_memory, usage.cpu_seconds, usage.source,
                                    bool(usage.oom_kills or usage.pids_refused or usage.throttled_periods)))
        except HostError as exc:
            # A lost, hung or broken host is killed, with its containers, before the
            # next test runs; the next isolated test starts a new one.
            lost = self.hosts.pop((settings.mode, settings.image_key()), None)
            if lost is not None:
                lost.kill()
            replay.host_failed(str(exc))
        except OSError as exc:  # a cgroup that could not be set up
            replay.host_failed(f"the limits of this test could not be set: {exc}")
        try:
            replay.finish(nextitem)
        finally:
            if not replay.tampered:
                self.coverage.add(replay.coverage)
        self.tests_run += 1

    def _fresh_arg(self, item: pytest.Item) -> str:
        path, _, rest = item.nodeid.partition("::")
        return str(self.config.rootpath / path) + ("::" + rest if rest else "")

    def summary_lines(self) -> list[str]:
        lines = [
            f"container host ({mode} mode, image {image}): started in {host.start_seconds:.2f}s, "
            f"{host.collected} test{'' if host.collected == 1 else 's'} collected"
            + (f", RSS {human(host.rss)}" if host.rss else "")
            for (mode, image), host in self.hosts.items()
        ]
        lines += [line for host in self.hosts.values() if host.shared for line in host.shared.summary()]
        lines += [f"  note: {note}" for host in self.hosts.values() for note in host.notes]
        lines += [f"container host ({m}, {i}) failed: {why}" for (m, i), why in self.failed_hosts.items()]
        lines += self.limiter.summary()
        return lines

    def shutdown(self) -> None:
        for (mode, image), host in self.hosts.items():
            error = host.close()
            if error:
                self.teardown_errors.append(f"container host ({mode} mode, image {image}):\n{error}")
        self.limiter.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.group.terminate(timeout=5)


def _slirp4netns(item: pytest.Item) -> str:
    found = shutil.which("slirp4netns")
    if found is None:
        raise pytest.UsageError(f"{item.nodeid}: outbound=True needs slirp4netns, which is not installed "
                                "(Debian/Ubuntu: apt install slirp4netns)")
    return os.path.realpath(found)
