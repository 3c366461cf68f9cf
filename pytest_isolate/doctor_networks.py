"""The doctor's network check: private networks, allow=, netem= on this machine.

In a throwaway child (a user and network namespace of its own): pyroute2 imports,
a bridge and a veth pair can be made (network="NAME"), an address can be added to
``lo`` (allow= with a non-loopback HOST), and which queueing disciplines netem=
finds: tc-netem (delay, jitter, loss) and the token bucket (rate).
"""

from __future__ import annotations

import os
import socket

from .runtime import network, syscalls, user_ns


def probe(report_fd: int) -> None:
    user_ns.enter_rootless()
    syscalls.unshare(syscalls.CLONE_NEWNET)
    network.bring_up_loopback()
    IPRoute = network._iproute(None)
    found = []
    with IPRoute() as ip:
        ip.link("add", ifname="probe-br", kind="bridge")
        ip.link("add", ifname="probe-v0", kind="veth", peer={"ifname": "probe-v1"})
        v0 = ip.link_lookup(ifname="probe-v0")[0]
        ip.link("set", index=v0, master=ip.link_lookup(ifname="probe-br")[0], state="up")
        ip.addr("add", index=ip.link_lookup(ifname="lo")[0], address="10.9.9.9", prefixlen=32)
        with socket.socket() as sock:
            sock.bind(("10.9.9.9", 0))
        v1 = ip.link_lookup(ifname="probe-v1")[0]
        for kind, index, extra in (("netem", v0, {"delay": 1000}),
                                   ("tbf", v1, {"rate": "1mbit", "burst": 16384, "latency": "100ms"})):
            try:
                ip.tc("add", kind, index=index, handle="1:", **extra)
                found.append(kind)
            except Exception:  # noqa: BLE001 - a qdisc the kernel lacks
                pass
    os.write(report_fd, ",".join(found).encode())


def check_networks(in_child, result, ok: str, warn: str, missing: str):
    r, w = os.pipe()
    try:
        failure = in_child(lambda: probe(w))
        os.close(w)
        w = -1
        found = os.read(r, 100).decode().split(",") if failure is None else []
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if failure is not None:
        return result("networks", warn, f"no private network can be made: {failure[1]}",
                      "network='NAME', services and allow= do not work here; network='none' (the default) does",
                      "install pyroute2 (a dependency of pytest-isolate) and allow veth and bridge devices "
                      "in user namespaces", {"error": failure[1]})
    details = {"netem": "netem" in found, "tbf": "tbf" in found}
    if "netem" not in found:
        rate = "rate= works (token bucket)" if "tbf" in found else "rate= does not work either (no tbf)"
        return result("networks", warn, f"private networks, services and allow= work; no tc-netem in this kernel, "
                      f"{rate}", "netem= with delay, jitter or loss fails the test",
                      "a kernel with CONFIG_NET_SCH_NETEM (modprobe sch_netem)", details)
    return result("networks", ok, "private networks, services and allow= work; netem= works (tc-netem, token bucket)",
                  details=details)
