"""Validators of the network options (options.py's table holds them)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .options import OptionError, _show

NONE = "none"
MAX_ALLOW = 14  # the listening sockets of one container travel in one datagram (link.MAX_FDS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_network(value: Any, base: str) -> str:
    """none (only lo), or the name of a private network the run makes."""
    if value is None:
        return NONE
    if value == "host":
        raise OptionError("got 'host'; a container on the host's network would not be isolated: name a private "
                          "network (e.g. 'backend'), or keep 'none' and let the test reach host services "
                          "through allow=[...]")
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise OptionError(f"got {_show(value)}; accepted: 'none' (only lo, the default) or the name of a private "
                          "network: letters, digits, '_', '.', '-', at most 63 characters, e.g. 'backend'")
    return value


def parse_allow(value: Any, base: str) -> tuple[tuple[str, int, str], ...]:
    """HOST:PORT[/tcp|udp] entries: the services of this machine a test may reach.
    HOST is an IP address ([...] for IPv6) or localhost (127.0.0.1 and ::1)."""
    accepted = ("'HOST:PORT[/tcp|udp]' strings, HOST an IP address of this machine ('[::1]' for IPv6) or "
                "'localhost', e.g. ['127.0.0.1:8080', 'localhost:5432/tcp']")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    found: set[tuple[str, int, str]] = set()
    for entry in value:
        if not isinstance(entry, str):
            raise OptionError(f"got {_show(entry)}; accepted: {accepted}")
        found.update(_allow_entry(entry.strip(), accepted))
    if len(found) > MAX_ALLOW:
        raise OptionError(f"got {len(found)} HOST:PORT entries ('localhost' counts twice); at most {MAX_ALLOW}")
    return tuple(sorted(found))


def _allow_entry(entry: str, accepted: str) -> list[tuple[str, int, str]]:
    address, slash, proto = entry.partition("/")
    proto = proto.lower() if slash else "tcp"
    host, colon, port_text = address.rpartition(":")
    if not colon or proto not in ("tcp", "udp") or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OptionError(f"got {_show(entry)}; accepted: {accepted}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise OptionError(f"got {_show(entry)}: write an IPv6 address in brackets, e.g. '[::1]:{port_text}'")
    if host.lower() == "localhost":
        return [("127.0.0.1", int(port_text), proto), ("::1", int(port_text), proto)]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise OptionError(f"got {_show(entry)}: {_show(host)} is not an IP address; accepted: {accepted}") from None
    if ip.is_unspecified or ip.is_multicast:
        raise OptionError(f"got {_show(entry)}: name the address the service listens on, not {ip}")
    return [(str(ip), int(port_text), proto)]
