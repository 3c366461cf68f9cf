"""Validators of the network options (options.py's table holds them)."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from typing import Any

from .options import OptionError, _show

NONE = "none"
MAX_ALLOW = 14  # the listening sockets of one container travel in one datagram (link.MAX_FDS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


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


def parse_allow(value: Any, base: str) -> tuple[tuple[str, int, str, str], ...]:
    """HOST:PORT[/tcp|udp] entries: the services of this machine a test may reach, as
    (address, port, protocol, name). HOST is an IP address ([...] for IPv6),
    localhost (127.0.0.1 and ::1), or a name this machine resolves, resolved once
    here: each of its addresses is allowed, and the container's /etc/hosts names them."""
    accepted = ("'HOST:PORT[/tcp|udp]' strings, HOST an IP address ('[::1]' for IPv6), 'localhost' or a host "
                "name this machine resolves, e.g. ['127.0.0.1:8080', 'localhost:5432/tcp', 'db.internal:5432']")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    found: set[tuple[str, int, str, str]] = set()
    for entry in value:
        if not isinstance(entry, str):
            raise OptionError(f"got {_show(entry)}; accepted: {accepted}")
        found.update(_allow_entry(entry.strip(), accepted))
    if len(found) > MAX_ALLOW:
        raise OptionError(f"got {len(found)} HOST:PORT entries ('localhost' counts twice, a name once per "
                          f"address); at most {MAX_ALLOW}")
    return tuple(sorted(found))


def _allow_entry(entry: str, accepted: str) -> list[tuple[str, int, str, str]]:
    address, slash, proto = entry.partition("/")
    proto = proto.lower() if slash else "tcp"
    host, colon, port_text = address.rpartition(":")
    if not colon or proto not in ("tcp", "udp") or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OptionError(f"got {_show(entry)}; accepted: {accepted}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise OptionError(f"got {_show(entry)}: write an IPv6 address in brackets, e.g. '[::1]:{port_text}'")
    port = int(port_text)
    if host.lower() == "localhost":
        return [("127.0.0.1", port, proto, ""), ("::1", port, proto, "")]
    try:
        ips, name = [ipaddress.ip_address(host)], ""
    except ValueError:
        if not _HOST_NAME.fullmatch(host) or host.replace(".", "").isdigit():
            raise OptionError(f"got {_show(entry)}: {_show(host)} is neither an IP address nor a host name; "
                              f"accepted: {accepted}") from None
        name = host.rstrip(".").lower()
        try:
            ips = [ipaddress.ip_address(a) for a in _resolve(name)]
        except OSError as exc:
            raise OptionError(f"got {_show(entry)}: {name} does not resolve on this machine "
                              f"({getattr(exc, 'strerror', None) or exc}); accepted: an IP address, or a host name "
                              "this machine resolves (/etc/hosts, DNS)") from None
    for ip in ips:
        if ip.is_unspecified or ip.is_multicast:
            raise OptionError(f"got {_show(entry)}: name the address the service listens on, not {ip}")
    return [(str(ip), port, proto, name) for ip in ips]


@functools.lru_cache(maxsize=256)
def _resolve(name: str) -> tuple[str, ...]:
    """The addresses of ``name``, as this machine resolves it, once per run."""
    found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return tuple(sorted({info[4][0].split("%", 1)[0] for info in found}))


_NETEM_KEYS = ("delay", "jitter", "loss", "rate")
_TIME = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}


def parse_netem(value: Any, base: str) -> tuple[tuple[str, float], ...]:
    """Network faults on the container's eth0, as tc-netem's: delay and jitter
    ("50ms"), loss ("2%"), rate ("1mbit"). Stored as (key, number): microseconds,
    percent, bits per second."""
    accepted = ("a dict of delay/jitter ('50ms', '200us', '1s'), loss ('2%') and rate ('1mbit', '500kbit'), "
                "e.g. {'delay': '50ms', 'loss': '2%'}; KEY=VALUE on the command line")
    if value is None:
        return ()
    if isinstance(value, (str, list, tuple)):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(i, str) and "=" in i for i in items):
            raise OptionError(f"got {_show(value)}; accepted: {accepted}")
        value = {k.strip(): v for k, _, v in (i.partition("=") for i in items)}
    if not isinstance(value, dict):
        raise OptionError(f"got {_show(value)}; accepted: {accepted}")
    result = {}
    for key, raw in value.items():
        if key not in _NETEM_KEYS:
            raise OptionError(f"unknown key {_show(key)}; accepted: {accepted}")
        text = raw if isinstance(raw, str) else ""
        pattern = {"delay": _TIME, "jitter": _TIME, "loss": _PERCENT, "rate": _RATE}[key]
        match = pattern.match(text)
        if not match:
            raise OptionError(f"bad {key}: {_show(raw)}; accepted: {accepted}")
        number = float(match.group(1))
        if key in ("delay", "jitter"):
            number *= {"us": 1, "ms": 1000, "s": 1_000_000}[match.group(2)]
            if number > 60_000_000:
                raise OptionError(f"bad {key}: {_show(raw)}; at most 60s")
        elif key == "loss" and number > 100:
            raise OptionError(f"bad loss: {_show(raw)}; accepted: 0% to 100%")
        elif key == "rate":
            number *= _RATE_UNITS[match.group(2).lower()]
            if not 8000 <= number <= 100 * 1000**3:
                raise OptionError(f"bad rate: {_show(raw)}; accepted: 8kbit to 100gbit")
        result[key] = number
    if "jitter" in result and "delay" not in result:
        raise OptionError("jitter needs a delay (the delay varies by up to the jitter)")
    return tuple(sorted(result.items()))


def parse_outbound(value: Any, base: str) -> bool:
    """Whether the containers reach the outside (through slirp4netns)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise OptionError(f"got {_show(value)}; accepted: True or False (on the command line and in the ini file: "
                      "true/false, yes/no, on/off, 1/0)")
