"""Network namespace setup, in the factory: ``none`` (only ``lo``) and private networks.

``lo`` is raised with two ioctls on a throwaway socket (tens of µs) rather than
through netlink libraries (pyroute2 costs ~150 ms to import and ~0.7 ms per call).

A private network (``network="NAME"``) is a bridge in the factory's home network
namespace, which is the container host's own: nothing of the machine's. Each
container gets a veth pair made inside its namespace, ``eth0`` there and the other
end moved home and enslaved to the bridge. The bridges have no address and the home
namespace forwards nothing, so two networks cannot reach each other, and with no
default route in a container a connect anywhere else fails at once (ENETUNREACH).
The veth pair dies with the container's network namespace: nothing to clean up.
pyroute2 is imported on the first container with a network, in the factory, off the
test's critical path (the factory builds the next container while a test runs).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFA_F_NODAD = 0x02  # no duplicate address detection: the address works at once

NONE = "none"
# Network number k (1, 2, ... in the order of first use) has 10.(100+k).0.0/16 and
# fd69:736f:6c61:k::/64. Services (later) take .0.x; containers .1.1 upwards, wrapping
# after 64,000 (only a few containers live at a time: the running test, the next).
MAX_NETWORKS = 150
_FIRST_CONTAINER, _LAST_CONTAINER = 257, 65534
INTERFACE = "eth0"


def bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP | IFF_RUNNING))


def subnets(number: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    return (ipaddress.IPv4Network(f"10.{100 + number}.0.0/16"),
            ipaddress.IPv6Network(f"fd69:736f:6c61:{number:x}::/64"))


def hosts_file(hostname: str, addresses: list[str], others: list[tuple[str, str]] = ()) -> str:
    """/etc/hosts of a container on a private network: itself by its hostname."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{hostname}" for address in addresses]
    lines += [f"{address}\t{name}" for address, name in others]
    return "\n".join(lines) + "\n"


def _iproute(library_path: str | None):
    """pyroute2's IPRoute: ~150 ms to import, once, and only where a network is used."""
    import sys

    if library_path and library_path not in sys.path:
        sys.path.append(library_path)
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:
        raise OSError(f"private networks need pyroute2, which the container host cannot import ({exc}): "
                      "install it where pytest runs (pip install pyroute2)") from None
    return IPRoute


def preload(library_path: str | None) -> None:
    """Import pyroute2 now, while the controller's interpreter still sees its own
    standard library: the factory is that interpreter inside the stage, and in an
    image's root that library is not there (pyroute2 imports multiprocessing)."""
    _iproute(library_path)


def _next_host(host: int) -> int:
    """The next container's host number: no .0 or .255 (they look like network and
    broadcast addresses to people and to some programs)."""
    host = host + 1 if host < _LAST_CONTAINER else _FIRST_CONTAINER
    return host + 1 if host % 256 in (0, 255) else host


def _shape(ip, index: int, netem: dict) -> None:
    """netem= on eth0: tc-netem for delay, jitter and loss, a token bucket for rate
    (below netem when both are asked for)."""
    parent = None
    faults = {key: netem[key] for key in ("delay", "jitter", "loss") if key in netem}
    if faults:
        try:
            ip.tc("add", "netem", index=index, handle="1:", delay=int(faults.get("delay", 0)),
                  jitter=int(faults.get("jitter", 0)), loss=faults.get("loss", 0))
        except Exception as exc:
            if getattr(exc, "code", None) == 2:  # ENOENT: no such qdisc kind
                raise OSError("netem= needs the kernel's netem queueing discipline (sch_netem, "
                              "CONFIG_NET_SCH_NETEM), which this kernel lacks; only rate= works here "
                              "(python -m pytest_isolate doctor lists what the machine offers)") from None
            raise
        parent = "1:"
    if "rate" in netem:
        bits = int(netem["rate"])
        extra = {"parent": parent} if parent else {}
        ip.tc("add", "tbf", index=index, handle="2:", rate=f"{bits}bit", burst=max(bits // 8 // 100, 16384),
              latency="100ms", **extra)


class Networks:
    """The factory's private networks: bridges at home, a veth per container."""

    def __init__(self, home_net_fd: int, library_path: str | None = None) -> None:
        self.home_net_fd = home_net_fd
        self.library_path = library_path  # where pyroute2 lies (the factory runs with -S)
        self.numbers: dict[str, int] = {}  # name -> k
        self.bridges: dict[str, int] = {}  # name -> ifindex at home
        self.next_host: dict[str, int] = {}
        self._home = None  # an IPRoute socket bound to the home namespace

    def prepare(self, name: str) -> None:
        """At home, before the container's namespaces exist: the network's bridge
        (a netlink socket serves the namespace it was opened in, so the home one is
        opened here, once)."""
        if name in self.bridges:
            return
        if len(self.numbers) >= MAX_NETWORKS:
            raise OSError(f"more than {MAX_NETWORKS} private networks in one container host")
        if self._home is None:
            self._home = _iproute(self.library_path)()
        number = self.numbers.setdefault(name, len(self.numbers) + 1)
        bridge = f"isolate-br{number}"
        self._home.link("add", ifname=bridge, kind="bridge")
        index = self._home.link_lookup(ifname=bridge)[0]
        self._home.link("set", index=index, state="up")
        self.bridges[name] = index
        self.next_host[name] = _FIRST_CONTAINER

    def attach(self, name: str, request_id: int, host: int | None = None, netem: list | None = None) -> list[str]:
        """In the container's fresh network namespace: ``eth0`` on the network;
        its addresses (IPv4, IPv6). ``host``: a service's fixed host number (2-254)."""
        IPRoute = _iproute(self.library_path)
        v4, v6 = subnets(self.numbers[name])
        if host is None:
            host = self.next_host[name]
            self.next_host[name] = _next_host(host)
        elif not 2 <= host < 255:
            raise ValueError(f"a service's host number is 2 to 254, not {host}")
        address4, address6 = v4.network_address + host, v6.network_address + host
        outside = f"isolate-v{request_id}"
        with IPRoute() as inside:
            # One request makes both ends: the outside one straight into the home
            # namespace, on the bridge and up; eth0 here.
            inside.link("add", ifname=outside, kind="veth", net_ns_fd=self.home_net_fd, master=self.bridges[name],
                        state="up", peer={"ifname": INTERFACE})
            eth0 = socket.if_nametoindex(INTERFACE)
            inside.addr("add", index=eth0, address=str(address4), prefixlen=v4.prefixlen)
            inside.addr("add", index=eth0, address=str(address6), prefixlen=v6.prefixlen, flags=IFA_F_NODAD)
            inside.link("set", index=eth0, state="up")
            if netem:
                _shape(inside, eth0, dict(netem))
        return [str(address4), str(address6)]
