"""Mode "fresh": the interpreter a test's container execs to collect and run one node id.

``payload`` is what the container host gives its zygote in this mode: the test
process execs a new interpreter with its job in PYTEST_ISOLATE_JOB (a "fresh_job"
message). Like remote.py this imports nothing of the plugin; the new session
reports through the same reporter (reporter.py), into the test's own files.
"""

from __future__ import annotations

import os
import sys

import pytest

from pytest_isolate import container_info, reporter, services_container
from pytest_isolate.runtime import link

JOB_ENV = "PYTEST_ISOLATE_JOB"


def payload(start: dict):
    """The test process's payload in mode "fresh" (``start``: the host's "start")."""
    session = {key: start[key] for key in ("option_dict", "workerinput", "sys_path", "argv")}

    def exec_fresh_interpreter(job: dict, files: dict) -> None:
        for fd in files.values():
            os.set_inheritable(fd, True)
        os.environ[JOB_ENV] = link.to_text("fresh_job", job=job, files=files, start=session)
        os.execv(sys.executable, [sys.executable, "-c", "from pytest_isolate.fresh import main; main()"])

    return exec_fresh_interpreter


class FreshRunner:
    """Collects the session (its node id alone) and runs the one item."""

    def __init__(self, config: pytest.Config, job: dict, files: dict) -> None:
        self.reporter = reporter.TestReporter(config, files, job["capture_cap"])
        self.job = job

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        items = [i for i in session.items if i.nodeid == self.job["nodeid"]]
        if not items:
            self.reporter.send("not_collected", message="not collected by a fresh pytest")
            return True
        self.reporter.run_item(items[0], self.job["deadline"])
        return True


def main() -> None:
    message = link.from_text(os.environ.pop(JOB_ENV), "fresh_job")
    start, job = message["start"], message["job"]
    files = {name: int(fd) for name, fd in message["files"].items()}
    sys.path[:] = start["sys_path"]
    sys.argv[:] = start["argv"]
    reporter.quiet_session_output()
    config = reporter.make_config(start["option_dict"], [job["fresh_arg"]], start["workerinput"])
    fixtures = reporter.ContainerFixtures()
    config.pluginmanager.register(fixtures, "isolate-fixtures")
    runner = FreshRunner(config, job, files)
    fixtures.reporter = runner.reporter
    config.pluginmanager.register(runner, "isolate-fresh")
    services_container.set_current(job["services"])
    container_info.set_current(job["container"])
    config.pluginmanager.register(services_container.LogSections(), "isolate-service-logs")
    config.hook.pytest_cmdline_main(config=config)
    os._exit(0)
