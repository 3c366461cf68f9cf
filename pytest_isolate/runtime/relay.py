"""The allow-list relay: how ``allow=["127.0.0.1:8080"]`` reaches this machine's port.

The relay is the launcher's child, forked before the launcher leaves the machine's
network namespace (launch.py), so the connections it makes are the machine's. The
factory, building a container that may reach HOST:PORT, listens there *inside* the
container's network namespace (HOST on its ``lo``) and hands the listening socket
and a pidfd of the container's init to the relay (SCM_RIGHTS). A connection the test
makes is accepted by the relay, which connects to HOST:PORT from outside and copies
bytes both ways; a UDP datagram is sent on from a socket per sender. Every other
address stays unreachable: there is no route out of the container.

The relay connects only to what the launcher's spec allows (the controller's allow
lists): a container host that code at collection subverted cannot make it reach
anything else. When the container's init ends, its sockets are closed.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading

from . import link, process

BUFFER = 1 << 16
MAX_UDP = 65535


def preload() -> None:
    """What the relay imports lazily, imported while it still can: as root it then
    joins the containers' user namespace, as whom the interpreter's own files (e.g.
    under /root) may be out of reach. socket.getaddrinfo() imports the idna codec."""
    import encodings.idna  # noqa: F401

    socket.getaddrinfo("127.0.0.1", 1, type=socket.SOCK_STREAM)


def serve(channel: link.Channel, allowed: set[tuple[str, int, str]], slirp4netns: str | None = None) -> None:
    """The relay's loop, until the launcher is gone: containers arrive ("relay",
    "outbound"), their sockets are served by threads and closed (their slirp4netns
    killed) when their init ends."""
    process.set_name("isolate-relay")
    containers: dict[int, list] = {}  # init pidfd -> its sockets and processes
    lock = threading.Lock()
    while True:
        watched = [channel.fileno(), *containers]
        ready, _, _ = select.select(watched, [], [])
        for fd in ready:
            if fd == channel.fileno():
                received = channel.receive("relay", "outbound")
                if received is None:
                    return  # the factory (the container host) is gone
                name, fields, fds = received
                if name == "relay":
                    _add(fields["targets"], fds, allowed, containers, lock)
                else:
                    channel.send("outbound_ready", error=_outbound(fds, slirp4netns, containers, lock))
            else:  # a container ended
                with lock:
                    for thing in containers.pop(fd):
                        _close(thing) if isinstance(thing, socket.socket) else _end(thing)
                os.close(fd)


def _outbound(fds: list[int], slirp4netns: str | None, containers, lock) -> str | None:
    """Connect a container's network namespace to the outside through slirp4netns
    (its own tap0, 10.0.2.100/24, a default route; this machine's loopback stays
    out of reach); the error, if it could not."""
    netns, init_pidfd = fds
    try:
        if slirp4netns is None:
            return "outbound=True needs slirp4netns (Debian: apt install slirp4netns)"
        ready_r, ready_w = os.pipe()
        # Its exit fd: the read end of a pipe whose only write end this relay holds,
        # so that slirp4netns ends with the relay however the relay ends (a SIGKILLed
        # pytest takes the launcher and the relay along by parent-death signals).
        exit_r, exit_w = os.pipe()
        try:
            command = [slirp4netns, "--configure", "--mtu=65520", "--disable-host-loopback", f"--ready-fd={ready_w}",
                       f"--exit-fd={exit_r}", "--netns-type=path", f"/proc/self/fd/{netns}", "tap0"]
            child = subprocess.Popen(command, pass_fds=(netns, ready_w, exit_r), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except BaseException:
            os.close(exit_w)
            raise
        finally:
            os.close(ready_w)
            os.close(exit_r)
        child.exit_w = exit_w  # closed by _end
        try:
            if not select.select([ready_r], [], [], 30)[0] or os.read(ready_r, 1) != b"1":
                _end(child)
                return f"slirp4netns did not start: {child.stderr.read(4096).decode(errors='replace').strip()}"
        finally:
            os.close(ready_r)
        with lock:
            containers.setdefault(init_pidfd, []).append(child)
        init_pidfd = -1
        return None
    finally:
        os.close(netns)
        if init_pidfd >= 0:
            os.close(init_pidfd)


def _end(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()
    os.close(child.exit_w)


def _add(targets: list, fds: list[int], allowed, containers, lock) -> None:
    listeners, init_pidfd = fds[:-1], fds[-1]
    if len(listeners) != len(targets) or not all(tuple(t) in allowed for t in targets):
        for fd in fds:
            os.close(fd)  # not what the run allows: nothing is served
        return
    sockets = [socket.socket(fileno=fd) for fd in listeners]
    with lock:
        owned = containers.setdefault(init_pidfd, [])  # what is closed when the container ends
        owned.extend(sockets)
    for sock, (host, port, proto) in zip(sockets, targets):
        serve_one = _serve_tcp if proto == "tcp" else _serve_udp
        threading.Thread(target=serve_one, args=(sock, (host, port), owned, lock), daemon=True).start()


def _serve_tcp(listener: socket.socket, target: tuple[str, int], sockets: list, lock) -> None:
    while True:
        try:
            inside, _ = listener.accept()
        except OSError:
            return  # closed: the container ended
        with lock:
            sockets.append(inside)
        threading.Thread(target=_connect, args=(inside, target, sockets, lock), daemon=True).start()


def _connect(inside: socket.socket, target: tuple[str, int], sockets: list, lock) -> None:
    try:
        outside = socket.create_connection(target, timeout=30)
    except Exception:  # noqa: BLE001 - whatever it is, the test must not wait for it
        # Refused or unreachable outside: the test's connection is reset at once.
        inside.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        _close(inside)
        return
    outside.settimeout(None)
    with lock:
        sockets.append(outside)
    threading.Thread(target=_copy, args=(outside, inside), daemon=True).start()
    _copy(inside, outside)


def _copy(source: socket.socket, destination: socket.socket) -> None:
    try:
        while data := source.recv(BUFFER):
            destination.sendall(data)
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        _close(destination)
        _close(source)


def _serve_udp(inside: socket.socket, target: tuple[str, int], sockets: list, lock) -> None:
    """Datagrams from each sender go out through a socket of their own, so that the
    answers find their way back to it."""
    senders: dict = {}
    while True:
        try:
            data, sender = inside.recvfrom(MAX_UDP)
        except OSError:
            return
        outside = senders.get(sender)
        if outside is None:
            try:
                outside = socket.socket(inside.family, socket.SOCK_DGRAM)
                outside.connect(target)
            except OSError:
                continue
            senders[sender] = outside
            with lock:
                sockets.append(outside)
            threading.Thread(target=_answers, args=(outside, inside, sender), daemon=True).start()
        try:
            outside.send(data)
        except OSError:
            pass


def _answers(outside: socket.socket, inside: socket.socket, sender) -> None:
    while True:
        try:
            data = outside.recv(MAX_UDP)
            inside.sendto(data, sender)
        except ConnectionRefusedError:
            continue  # nothing listened for the last datagram: UDP says so and goes on
        except OSError:
            return


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- the factory's side ----------------------------------------------------------------------

def listen_inside(targets: list, library_path: str | None) -> list[int]:
    """In a container's fresh network namespace: a socket listening on each target
    (its address added to ``lo`` unless it is loopback's own)."""
    fds = []
    try:
        for host, port, proto in targets:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            if host not in ("127.0.0.1", "::1"):
                _add_to_loopback(host, family, library_path)
            sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            fds.append(sock.detach())
            sock = socket.socket(fileno=fds[-1])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            if proto == "tcp":
                sock.listen(128)
            sock.detach()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _add_to_loopback(host: str, family: int, library_path: str | None) -> None:
    from .network import _iproute

    with _iproute(library_path)() as ip:
        ip.addr("add", index=ip.link_lookup(ifname="lo")[0], address=host,
                prefixlen=128 if family == socket.AF_INET6 else 32)
