"""The init factory: a small process that builds each test's container ahead of time.

Forking is what a container costs most: the kernel copies the forking process's page
tables, and every page the child writes to is copied again. The container host holds
pytest and the collected tests (tens to hundreds of MB), so the parts of a container
that need none of that (namespaces, the root filesystem, init) are made by this
factory instead: the host's child, forked before the host exec'd its interpreter
(launch.py), so its one fork per container (init) is cheap, and what it builds it
builds in itself, never in a fresh copy of its memory. It gets the image's entries
once, at its start; a request ("build") names only what differs per test.

Per container, in this order: fresh mount, network, UTS and IPC namespaces
(namespaces.JOINED) around the factory itself; the test's root filesystem, ``lo``
and the hostname inside them; a pid namespace whose first child, init, is pid 1;
the namespaces' fds and init's pidfd back to the host ("built"); and home to the
factory's own namespaces, so the next container does not nest in this one. The
test process joins them later (test_process.py); the host kills init when the test
is over, which ends the pid namespace and every process the test left.
"""

from __future__ import annotations

import os
import signal
import socket

from . import link, namespaces, network, process, relay, rootfs, snapshots, syscalls, tiny_init


def serve(channel: link.Channel, entries: list[dict], library_path: str | None = None,
          relay_channel: link.Channel | None = None, networks_ahead: list[str] = ()) -> None:
    """The factory's loop, until the host is gone."""
    process.set_name("isolate-factory")
    # Inits are reaped by the kernel, and so are the orphans they inherit (they
    # inherit this). ^C is the host's business (as for the launcher).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A home to return to after each container. It must be a mount namespace of our
    # user namespace: as root, the stage's belongs to the initial one, and setns()
    # back into it would need real root.
    syscalls.unshare(syscalls.CLONE_NEWNS)
    home = namespaces.open_own(ns.name for ns in namespaces.JOINED)
    networks = network.Networks(home["net"], library_path)
    # The networks the run's tests name: their bridges (and pyroute2's import, ~150 ms)
    # now, while the host still collects, not on the first such test's way.
    for name in networks_ahead:
        try:
            networks.prepare(name)
        except Exception:  # noqa: BLE001 - the first container that needs it says why
            break
    while True:
        received = channel.receive("build")
        if received is None:
            return  # the host is gone
        _, request, _ = received
        try:
            fds, addresses = _container(entries, request, networks, relay_channel)
        except Exception as exc:
            channel.send("build_failed", id=request["id"], message=process.describe_error(exc),
                         step=getattr(exc, "step", "init"))
            continue
        finally:
            _go_home(home)
        try:
            channel.send("built", fds, id=request["id"], addresses=addresses)
        finally:
            for fd in fds:
                os.close(fd)


def _container(entries: list[dict], request: dict, networks: network.Networks,
               relay_channel: link.Channel | None) -> tuple[list[int], list[str]]:
    """Build one container around the factory; its namespace fds (namespaces.FILES),
    init's pidfd and, for a service, its /proc/net/tcp and tcp6; its addresses."""
    if request["network"] != network.NONE:
        networks.prepare(request["network"])  # at home: before the unshare below
    snapshot = request.get("snapshot")
    if snapshot is not None:
        snapshots.prepare(snapshot)  # at home too: the snapshot outlives this container
    syscalls.unshare(namespaces.JOINED_FLAGS)
    fds = namespaces.open_own(ns.name for ns in namespaces.JOINED)
    try:
        root = rootfs.build_test_root(entries, request["mounts"], snapshot)
        network.bring_up_loopback()
        addresses = []
        if request["network"] != network.NONE:
            addresses = networks.attach(request["network"], request["id"], request["host_number"],
                                        request["netem"])
        if request["network"] != network.NONE or request["hosts"]:  # hosts: also allow='NAME:PORT's
            rootfs.place_file(root, "/etc/hosts", network.hosts_file(request["hostname"], addresses,
                                                                      request["hosts"]))
        if request["outbound"]:  # slirp4netns's DNS forwarder (the machine's may be a loopback address)
            rootfs.place_file(root, "/etc/resolv.conf", "nameserver 10.0.2.3\n")
        if request["watch_ports"]:  # a service: the host sees its listening sockets
            fds["tcp"] = os.open("/proc/self/net/tcp", os.O_RDONLY | os.O_CLOEXEC)
            fds["tcp6"] = os.open("/proc/self/net/tcp6", os.O_RDONLY | os.O_CLOEXEC)
        socket.sethostname(request["hostname"])
        # unshare(CLONE_NEWPID) applies to the caller's next children only: init is
        # the first, pid 1 of the namespace, born in the namespaces built above.
        syscalls.unshare(syscalls.CLONE_NEWPID)
        init = _spawn_init()
        fds["pid"] = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
        fds["init"] = os.pidfd_open(init)
        if request["allow"]:
            _hand_to_relay(request["allow"], fds["init"], relay_channel, networks.library_path)
        if request["outbound"]:
            _connect_outside(fds["net"], fds["init"], relay_channel)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    watched = [fds[name] for name in ("tcp", "tcp6") if name in fds]
    return [fds[name] for name in namespaces.FILES] + [fds["init"]] + watched, addresses


def _hand_to_relay(targets: list, init_pidfd: int, relay_channel: link.Channel | None,
                   library_path: str | None) -> None:
    """Listen on each allowed HOST:PORT inside the container (we still sit in its
    network namespace); the relay serves them until init ends (relay.py)."""
    if relay_channel is None:
        raise OSError("allow= needs the relay, which this container host was started without")
    listeners = relay.listen_inside(targets, library_path)
    try:
        relay_channel.send("relay", listeners + [init_pidfd], targets=targets)
    finally:
        for fd in listeners:
            os.close(fd)


def _connect_outside(net_fd: int, init_pidfd: int, relay_channel: link.Channel | None) -> None:
    """outbound=True: the relay runs slirp4netns on the container's network
    namespace; the container is ready once slirp4netns has configured tap0."""
    if relay_channel is None:
        raise OSError("outbound=True needs the relay, which this container host was started without")
    relay_channel.send("outbound", [net_fd, init_pidfd])
    received = relay_channel.receive("outbound_ready")
    if received is None:
        raise OSError("the relay is gone")
    if received[1]["error"]:
        raise OSError(received[1]["error"])


def _go_home(home: dict[str, int]) -> None:
    """Back to the factory's own namespaces (and root): a failure here would build
    the next container inside this one, so it ends the factory."""
    try:
        namespaces.join(home)
        syscalls.setns(namespaces.own_pid(), syscalls.CLONE_NEWPID)
    except OSError:
        os._exit(125)


_tiny_init_works = [True]


def _spawn_init() -> int:
    """pid 1 of the container: it only exists (killing it ends the container) and
    sleeps. It ignores SIGCHLD (as we do), so the kernel reaps the orphans it
    inherits; pid 1 of a pid namespace gets no signal it does not handle, so only
    the host (SIGKILL, from outside) ends it. The test's own process is forked by a
    zygote later. See tiny_init.py; without it, a forked Python sleeper."""
    if _tiny_init_works and os.path.exists(tiny_init.PATH):
        try:
            # posix_spawn() shares our memory until the exec: no page tables are copied.
            return os.posix_spawn(tiny_init.PATH, [tiny_init.PATH], os.environ,
                                  file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2)])
        except OSError:  # e.g. a security module forbids the exec: fork from now on
            _tiny_init_works.clear()
    init = os.fork()
    if init == 0:
        try:
            process.die_with_parent(0)  # the factory is outside this pid namespace
            process.set_name("isolate-init")
            process.close_fds_except(set())  # no link, no namespace of the host's
            while True:
                signal.pause()
        finally:
            os._exit(0)
    return init
