"""Tests that FAIL on purpose: how failures look when tests run in containers.

Not part of the default demo run (the file name does not match ``test_*.py``).
Run it explicitly:

    pytest --isolate demo/showcase_failures.py

Expected: 3 failed, 1 passed. The hung test is killed by its timeout, the
crashing test is reported with its signal, and the run goes on after both.
"""

import os
import time

import pytest


def test_ordinary_assertion_failure():
    # Reported exactly as without containers: assertion rewriting, the diff,
    # the traceback, captured output.
    print("captured stdout from inside the container")
    expected = {"hostname": "box", "interfaces": ["lo"]}
    actual = {"hostname": "box", "interfaces": ["lo", "eth0"]}
    assert actual == expected


@pytest.mark.isolated(timeout=2)
def test_hung_test_is_killed_by_its_timeout():
    time.sleep(60)


def test_crash_is_reported_and_the_run_goes_on():
    print("output printed before the crash is kept")
    os.abort()  # SIGABRT: would kill a non-isolated pytest outright


def test_runs_after_the_failures():
    assert True
