"""A minimal fork-per-test pytest plugin: the benchmark's "isolation by fork only" baseline.

Load it with ``PYTHONPATH=benchmarks python -m pytest -p forkonly``. Each test runs in a
forked child (what pytest-forked does, minus its extras): no namespaces, no container.
"""

from __future__ import annotations

import os
import pickle

import pytest
from _pytest.runner import runtestprotocol


def _run_child(item: pytest.Item, write_fd: int) -> None:
    try:
        reports = runtestprotocol(item, log=False, nextitem=None)
        data = [item.config.hook.pytest_report_to_serializable(config=item.config, report=r)
                for r in reports]
        payload = pickle.dumps(data)
        while payload:
            payload = payload[os.write(write_fd, payload):]
    finally:
        os._exit(0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_child(item, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    config = item.config
    if payload:
        reports = [config.hook.pytest_report_from_serializable(config=config, data=d)
                   for d in pickle.loads(payload)]
    else:  # the child died before reporting
        call = pytest.CallInfo.from_call(lambda: pytest.fail(f"child died: wait status {status}"), "call")
        reports = [pytest.TestReport.from_item_and_call(item, call)]
    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
