"""Containers made ahead: the host's side of the factory and the zygotes.

A test's container takes two steps to make: the small factory builds the
namespaces and root filesystem and spawns init (factory.py); the test process,
forked from a zygote, joins them and drops its privileges (test_process.py).
Both are done ahead: while test N runs, the test process of test N+1 already waits
for its job in a container of its own, and the factory builds the container of
test N+2. The zygote's fork is not waited for: ``Prepared.started`` collects the
new process when its test is due. A test then
only costs its own run, as long as the next test asks for the same settings (the
usual case); a test that asks for others gets new ones, and the ones made ahead
are thrown away.

Nothing is shared between tests made this way: each test process is forked from
the zygote (which never runs a test) into namespaces and a copy-on-write layer of
its own, and learns which test it runs only when it is its turn (``Prepared.go``).
"""

from __future__ import annotations

import os

from . import link, namespaces, zygote as zygote_module

# What the factory needs to build a container (the rest is for the test process).
BUILD_KEYS = ("mounts", "hostname", "network", "hosts", "allow", "netem", "outbound")


class InitError(Exception):
    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


class InitFactory:
    """The host's end of the factory's channel (the factory: factory.py)."""

    def __init__(self, channel: link.Channel) -> None:
        self.channel = channel
        self._next_id = 0
        self._arrived: dict[int, tuple[str, dict, list[int]]] = {}

    def request(self, build: dict, host_number: int | None = None, watch_ports: bool = False,
                snapshot: dict | None = None) -> int:
        """Ask for a container built after ``build`` (BUILD_KEYS; a service's also has a
        fixed host number, its listening sockets watched and maybe a snapshot:
        snapshots.py); returns the request's id."""
        self._next_id += 1
        self.channel.send("build", id=self._next_id, host_number=host_number, watch_ports=watch_ports,
                          snapshot=snapshot, **build)
        return self._next_id

    def wait(self, request_id: int) -> namespaces.Container:
        """The container asked for, once it is ready (InitError if not)."""
        while request_id not in self._arrived:
            try:
                received = self.channel.receive("built", "build_failed")
            except link.Unexpected as exc:
                raise InitError(f"the container factory broke its protocol: {exc}", "factory") from None
            if received is None:
                raise InitError("the container factory is gone", "factory")
            self._arrived[received[1]["id"]] = received
        name, fields, fds = self._arrived.pop(request_id)
        if name == "built":
            size = len(namespaces.FILES) + 1
            container = namespaces.Container(fds[:size])
            container.addresses, container.watched = fields["addresses"], fds[size:]
            return container
        for fd in fds:
            os.close(fd)
        raise InitError(fields["message"], fields["step"])

    def discard(self, request_id: int) -> None:
        """A container no test will use: end it when it arrives (or now)."""
        try:
            self.wait(request_id).end()
        except InitError:
            pass


class Prepared:
    """A test process waiting for its job in a built container, and the host's ends
    of its files: events, captured stdout and stderr, crash log (memfds of this test
    alone: processes an ended test left behind can write nowhere the next test's
    output is read from) and the job pipe."""

    def __init__(self, config: dict, container: namespaces.Container, zygote) -> None:
        self.config = config
        self.namespaces = container
        self.zygote = zygote
        self.files = [link.new_stream(f"pytest-isolate-{name}") for name in zygote_module.FILES]
        go_r, self._go_w = os.pipe2(os.O_CLOEXEC)
        try:
            # The zygote forks while we go on; ``started`` collects the test's pid.
            self._ticket = zygote.start(config, self.files + [go_r] + list(container.fds.values()))
        except BaseException:
            self.close_files()
            os.close(self._go_w)
            container.end()
            raise
        finally:
            os.close(go_r)
            container.close()  # the pidfd of its init stays, to end it
        self.test = 0
        self.test_pidfd = -1

    @property
    def events_fd(self) -> int:
        return self.files[0]

    def file(self, name: str) -> int:
        """One of the test's files (zygote.FILES)."""
        return self.files[zygote_module.FILES.index(name)]

    def started(self) -> None:
        """Wait until the test process exists (OSError if it could not start)."""
        if self.test:
            return
        ticket, self._ticket = self._ticket, None
        try:
            self.test = self.zygote.started(ticket)
        except BaseException:
            self.cancel()
            raise
        try:
            # The zygote reaps the test only when told: until then its pid is ours.
            self.test_pidfd = os.pidfd_open(self.test)
        except OSError:  # pragma: no cover - Linux < 5.3
            self.test_pidfd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # always "ended"

    def go(self, **job) -> None:
        """Start the test (``job``: a "job" message's fields)."""
        try:
            link.send(self._go_w, *link.message("job", **job))
        except BrokenPipeError:
            pass  # it died while it waited: its events and exit say why
        finally:
            os.close(self._go_w)
            self._go_w = -1

    def go_service(self, argv: list[str]) -> None:
        """Start a service's command (services_container.exec_service)."""
        try:
            link.send(self._go_w, *link.message("service_job", argv=argv))
        except BrokenPipeError:
            pass
        finally:
            os.close(self._go_w)
            self._go_w = -1

    def cancel(self) -> None:
        """Never run it: the test process reads end-of-file and exits, init is killed."""
        if self._go_w >= 0:
            os.close(self._go_w)
            self._go_w = -1
        self.namespaces.end()
        self.close_files()
        if self.test_pidfd >= 0:
            os.close(self.test_pidfd)
            self.test_pidfd = -1
        if not self.test and self._ticket is not None:
            try:
                self.test = self.zygote.started(self._ticket)
            except OSError:
                pass
            self._ticket = None
        if self.test:
            self.zygote.finished.append(self.test)

    def close_files(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []


class Pipeline:
    def __init__(self, init_factory: InitFactory) -> None:
        self.factory = init_factory
        self._warm: tuple[dict, int] | None = None  # (build settings, factory request)
        self._prepared: Prepared | None = None

    def take(self, config: dict, zygote) -> Prepared:
        """A waiting test process for ``config``: the one prepared ahead if it was
        prepared for the same, else a new one (errors: OSError, InitError)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.config == config and prepared.zygote is zygote:
            try:
                prepared.started()
                return prepared
            except OSError:
                prepared = None  # a new one says why it cannot start
        if prepared is not None:
            prepared.cancel()
        prepared = Prepared(config, self._container(config), zygote)
        prepared.started()
        return prepared

    def prepare_next(self, config: dict, zygote) -> None:
        """Make the next test's process now, betting on the same settings."""
        try:
            self._prepared = Prepared(config, self._container(config), zygote)
        except (OSError, InitError):
            self._prepared = None  # the next test makes its own and reports why it cannot

    def _container(self, config: dict) -> namespaces.Container:
        """The container asked for ahead (if built for the same settings) or a new
        one; asks for the next one either way."""
        build = {key: config[key] for key in BUILD_KEYS}
        warm, self._warm = self._warm, None
        if warm is not None and warm[0] != build:
            self.factory.discard(warm[1])
            warm = None
        request_id = warm[1] if warm else self.factory.request(build)
        self._warm = (build, self.factory.request(build))
        return self.factory.wait(request_id)

    def shutdown(self) -> None:
        if self._prepared is not None:
            self._prepared.cancel()
            self._prepared = None
        if self._warm is not None:
            self.factory.discard(self._warm[1])
            self._warm = None
