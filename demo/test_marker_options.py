"""Options of the ``isolated`` marker. These tests carry the marker, so they
run isolated even without ``--isolate``."""

import os
import pathlib
import socket

import pytest


@pytest.mark.isolated(hostname="box", timeout=30)
def test_hostname_from_marker():
    # Own UTS namespace: the hostname is the marker's, not the host's.
    assert socket.gethostname() == "box"


@pytest.mark.isolated(
    env={"DEMO_GREETING": "hello"},
    mounts=["./data:/data:ro"],  # relative to this file's directory
)
def test_env_and_read_only_mount():
    # Extra environment variables, and demo/data mounted read-only at /data.
    assert os.environ["DEMO_GREETING"] == "hello"
    assert pathlib.Path("/data/hello.txt").read_text().startswith("Hello from the host")
    with pytest.raises(OSError):
        pathlib.Path("/data/new.txt").write_text("nope")
