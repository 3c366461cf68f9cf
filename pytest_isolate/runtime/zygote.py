"""Zygotes: forks of the container host that fork the test processes.

The host forks a zygote once collection is over, and the zygote forks every test.
Two reasons not to fork tests from the host itself:

* after each fork every page the forking process writes is copied again (it is now
  shared with the child). The host runs execnet and pytest code between tests and
  would pay that on hundreds of pages per test; a zygote only runs this loop.
* a process forked by a member of a cgroup is born in it. The zygote of limited
  tests is moved into its cgroup once (by the controller), so those tests never
  migrate there (on cgroup v1 the first migration after a quiet spell waits ≈ 10 ms
  for an RCU grace period).

A zygote holds the same collected items as the host. A request brings the fds the
test needs (its own files, the job pipe, the container's namespaces last); which
test it runs, the test learns from its job pipe when it is its turn. Test processes
are its children: it reaps each when the host asks, and tells the host its exit
status and the resources it used; those that never ran are reaped in passing.
"""

from __future__ import annotations

import collections
import marshal
import os
import socket
from typing import Callable

from . import container, factory, process

MAX_REQUEST = 1 << 22


class Zygote:
    def __init__(self, prepare: Callable[[dict, list[int]], tuple]) -> None:
        """``prepare(request, fds)`` returns ``(config, payload, event_fd, keep_fds)``
        for container.fork_test."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host = os.getpid()
        pid = os.fork()
        if pid == 0:
            host_end.close()
            try:
                process.die_with_parent(host)
                container.test_process_name = process.name()  # the tests keep the host's
                process.set_name("isolate-zygote")
                zygote_end.send(marshal.dumps(process.outer_pid()))
                _serve(zygote_end, prepare)
            finally:
                os._exit(0)
        zygote_end.close()
        self.link = host_end
        # What the controller writes to cgroup.procs: the pid in its own namespace.
        self.pid = marshal.loads(self.link.recv(64)) or pid
        self.finished: list[int] = []  # tests that are over; the zygote reaps them
        self._tickets = 0
        self._pending: collections.deque[int] = collections.deque()  # starts not answered yet
        self._replies: dict[int, tuple] = {}

    def start(self, request: dict, fds: list[int]) -> int:
        """Ask for a test that waits for its job; ``fds`` end with the job pipe's read
        end and the container's namespaces (factory.NAMESPACE_FILES). Returns a
        ticket for ``started``: the zygote forks while the caller goes on."""
        request = dict(request, finished=self.finished)
        socket.send_fds(self.link, [marshal.dumps(("start", request))], fds)
        self.finished = []
        self._tickets += 1
        self._pending.append(self._tickets)
        return self._tickets

    def started(self, ticket: int) -> int:
        """The pid of the test asked for with ``ticket`` (OSError if it could not start)."""
        while ticket not in self._replies:
            self._receive()
        kind, value = self._replies.pop(ticket)
        if kind != "started":
            raise OSError(1, f"the zygote could not start the test: {value}")
        return value

    def reap(self, pid: int) -> tuple[int, dict]:
        """The test's wait status and resource usage, once it has ended."""
        self.link.send(marshal.dumps(("reap", pid)))
        while True:
            reply = self._receive()
            if reply is not None:
                _, status, usage = reply
                return status, usage

    def _receive(self):
        """Read one reply: a start's is filed under its ticket (replies come in the
        order of the requests); a reap's is returned."""
        message = self.link.recv(MAX_REQUEST)
        if not message:
            raise OSError(1, "the zygote is gone")
        reply = marshal.loads(message)
        if reply[0] == "exited":
            return reply
        self._replies[self._pending.popleft()] = reply
        return None


def _serve(link: socket.socket, prepare) -> None:
    finished: set[int] = set()
    while True:
        message, fds, _, _ = socket.recv_fds(link, MAX_REQUEST, 16)
        if not message:
            return  # the host is gone
        kind, request = marshal.loads(message)
        if kind == "reap":
            link.send(marshal.dumps(("exited", *container.reap_with_usage(request))))
            continue
        finished.update(request.get("finished", ()))
        _reap_finished(finished)
        try:
            config, payload, event_fd, keep = prepare(request, fds)
            namespaces = factory.Namespaces(fds[-len(factory.NAMESPACE_FILES):])
            go_fd = fds[-len(factory.NAMESPACE_FILES) - 1]
            test = container.fork_test(namespaces, config, payload, go_fd, event_fd, keep)
        except Exception as exc:
            link.send(marshal.dumps(("error", f"{type(exc).__name__}: {exc}")))
            continue
        finally:
            for fd in fds:
                os.close(fd)
        link.send(marshal.dumps(("started", test)))


def _reap_finished(finished: set[int]) -> None:
    for pid in list(finished):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            finished.discard(pid)
