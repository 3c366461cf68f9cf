"""A zygote: a fork of the container host that waits in a cgroup and forks the
containers of limited tests there.

A process forked by a member of a cgroup is born in it, so the containers of
limited tests never migrate into their cgroup; only the zygote did, once (on
cgroup v1 the first migration after a quiet spell waits ≈ 10 ms for an RCU grace
period). The zygote is forked after collection, so it holds the same collected
items as the host; requests name the test and bring the fds the container needs.
"""

from __future__ import annotations

import marshal
import os
import socket
from typing import Callable

from . import container, process

MAX_REQUEST = 1 << 22


class Zygote:
    def __init__(self, prepare: Callable[[dict, list[int]], tuple]) -> None:
        """``prepare(request, fds)`` returns ``(config, payload, event_fd, keep_fds)``
        for runtime.container.start."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            host_end.close()
            try:
                process.die_with_parent(host)
                _serve(zygote_end, prepare)
            finally:
                os._exit(0)
        zygote_end.close()
        self.link = host_end

    def start(self, request: dict, fds: list[int]) -> int:
        """Fork a container from the zygote; returns the keeper's pid."""
        socket.send_fds(self.link, [marshal.dumps(request)], fds)
        kind, value = marshal.loads(self.link.recv(MAX_REQUEST))
        if kind != "started":
            raise OSError(1, f"the limits zygote could not start the container: {value}")
        return value

    def reap(self) -> tuple[int, dict]:
        """The keeper's wait status and resource usage, once it has ended."""
        _, status, usage = marshal.loads(self.link.recv(MAX_REQUEST))
        return status, usage


def _serve(link: socket.socket, prepare) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(link, MAX_REQUEST, 8)
        if not message:
            return  # the host is gone
        try:
            config, payload, event_fd, keep = prepare(marshal.loads(message), fds)
            keeper = container.start(config, payload, event_fd, keep)
        except Exception as exc:
            link.send(marshal.dumps(("error", f"{type(exc).__name__}: {exc}")))
            continue
        finally:
            for fd in fds:
                os.close(fd)
        link.send(marshal.dumps(("started", keeper)))
        status, usage = container.reap_with_usage(keeper)
        link.send(marshal.dumps(("exited", status, usage)))
