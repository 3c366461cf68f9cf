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

A zygote gets its payload once, at construction: what every test process it forks
runs with its job (the host's collected items are in its memory too). A "fork"
brings the test's settings and fds: its own files (FILES), its job pipe, the
container's namespaces; which test it runs, the test learns from its job pipe when
it is its turn. Test processes are its children: it reaps each when the host asks
("reap"), and tells the host its exit status and the resources it used; those that
never ran are reaped in passing.
"""

from __future__ import annotations

import collections
import os
from typing import Callable

from . import link, namespaces, process, test_process

# A test's own files, in the order a "fork" passes them: its events, then what the
# host reads after it ended (memfds of this test alone; see pipeline.py).
FILES = ("events", "stdout", "stderr", "crashlog")


class Zygote:
    def __init__(self, payload: Callable[[dict, dict], None], keep_fds: set[int]) -> None:
        """``payload(job, files)`` runs in each test process (``files``: FILES -> fd);
        ``keep_fds`` are the host's fds it needs besides (pytest's own files)."""
        host_end, zygote_end = link.Channel.pair()
        host = os.getpid()
        name = process.name()  # the tests are called as the host is, not as the zygote
        pid = os.fork()
        if pid == 0:
            host_end.close()
            try:
                process.die_with_parent(host)
                process.set_name("isolate-zygote")
                zygote_end.send("zygote_ready", pid=process.outer_pid())
                _serve(zygote_end, payload, keep_fds, name)
            finally:
                os._exit(0)
        zygote_end.close()
        self.channel = host_end
        # What the controller writes to cgroup.procs: the pid in its own namespace.
        self.pid = self._receive("zygote_ready")["pid"] or pid
        self.finished: list[int] = []  # tests that are over; the zygote reaps them
        self._tickets = 0
        self._pending: collections.deque[int] = collections.deque()  # forks not answered yet
        self._replies: dict[int, tuple[str, dict]] = {}

    def start(self, config: dict, fds: list[int]) -> int:
        """Ask for a test process that waits for its job; ``fds``: FILES, the job
        pipe's read end, the container's namespaces.FILES. Returns a ticket for
        ``started``: the zygote forks while the caller goes on."""
        self.channel.send("fork", fds, config=config, finished=self.finished)
        self.finished = []
        self._tickets += 1
        self._pending.append(self._tickets)
        return self._tickets

    def started(self, ticket: int) -> int:
        """The pid of the test asked for with ``ticket`` (OSError if it could not start)."""
        while ticket not in self._replies:
            self._receive_fork_reply()
        name, fields = self._replies.pop(ticket)
        if name != "forked":
            raise OSError(1, f"the zygote could not start the test: {fields['message']}")
        return fields["pid"]

    def reap(self, pid: int) -> tuple[int, dict]:
        """The test's wait status and resource usage, once it has ended."""
        self.channel.send("reap", pid=pid)
        while True:
            name, fields = self._receive_fork_reply(also="reaped")
            if name == "reaped":
                return fields["status"], fields["usage"]

    def _receive(self, expected: str) -> dict:
        received = self.channel.receive(expected)
        if received is None:
            raise OSError(1, "the zygote is gone")
        return received[1]

    def _receive_fork_reply(self, also: str | None = None) -> tuple[str, dict]:
        """Read one reply: a fork's is filed under its ticket (replies come in the
        order of the requests)."""
        received = self.channel.receive("forked", "fork_failed", *((also,) if also else ()))
        if received is None:
            raise OSError(1, "the zygote is gone")
        name, fields, _ = received
        if name in ("forked", "fork_failed"):
            self._replies[self._pending.popleft()] = (name, fields)
        return name, fields


def _serve(channel: link.Channel, payload, keep_fds: set[int], name: str) -> None:
    finished: set[int] = set()
    while True:
        received = channel.receive("fork", "reap")
        if received is None:
            return  # the host is gone
        kind, request, fds = received
        if kind == "reap":
            status, usage = reap_with_usage(request["pid"])
            channel.send("reaped", pid=request["pid"], status=status, usage=usage)
            continue
        finished.update(request["finished"])
        _reap_finished(finished)
        try:
            files = dict(zip(FILES, fds))
            go_fd = fds[len(FILES)]
            container = namespaces.Container(fds[len(FILES) + 1:])
            test = test_process.fork(container, request["config"], lambda job: payload(job, files), go_fd,
                                     files["events"], keep_fds | set(files.values()), name)
        except Exception as exc:
            channel.send("fork_failed", message=f"{type(exc).__name__}: {exc}")
            continue
        finally:
            for fd in fds:
                os.close(fd)
        channel.send("forked", pid=test)


def reap_with_usage(pid: int) -> tuple[int, dict]:
    """Wait for ``pid``; its status and the resources it and its reaped children used."""
    _, status, usage = os.wait4(pid, 0)
    return status, {"cpu_seconds": usage.ru_utime + usage.ru_stime, "max_rss": usage.ru_maxrss * 1024}


def _reap_finished(finished: set[int]) -> None:
    for pid in list(finished):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            finished.discard(pid)
