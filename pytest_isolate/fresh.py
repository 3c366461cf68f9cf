"""Mode "fresh": the interpreter a test's container execs to collect and run one node id.

Started by the container host's payload (remote.Host._fresh_payload) with its job in
PYTEST_ISOLATE_JOB; like remote.py it imports nothing of the plugin, and reports
through the same events (remote.ContainerReporter), into the same files of its own.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from pytest_isolate import remote
from pytest_isolate.runtime import events


class FreshRunner(remote.ContainerReporter):
    """Mode "fresh": a new interpreter that collects and runs a single node id."""

    def __init__(self, config: pytest.Config, job: dict) -> None:
        super().__init__(config)
        self.job = job

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        job = self.job
        items = [i for i in session.items if i.nodeid == job["nodeid"]]
        if not items:
            events.send(job["files"]["events"], "not_collected", {"message": "not collected by a fresh pytest"})
            return True
        self.run_item(items[0], job["files"], job["deadline"], job["capture_cap"])
        return True


def main() -> None:
    job = json.loads(os.environ.pop(remote.JOB_ENV))
    sys.path[:] = job["sys_path"]
    sys.argv[:] = job["argv"]
    remote.quiet_session_output()
    config = remote.make_config(job["option_dict"], job["args"], job["workerinput"])
    config.pluginmanager.register(FreshRunner(config, job), "isolate-fresh")
    config.hook.pytest_cmdline_main(config=config)
    os._exit(0)
