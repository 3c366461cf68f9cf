"""Tests inside a real distribution image: Debian bookworm with python3, built by
ci/images/debian.sh (debootstrap, umoci, skopeo; cached in /var/cache by its inputs),
read as an OCI layout (``oci:``), a ``docker-archive:`` and, pushed with skopeo to
Debian's docker-registry on 127.0.0.1, by ``docker://``. In both modes, with two
xdist workers pulling into one store, as root and (in the rootless lane) as a user.

The image is named by PYTEST_ISOLATE_DEBIAN_IMAGE (.ci/run and scripts/test.sh set it),
else found at the script's fixed name /var/cache/pytest-isolate-images/debian-bookworm
(the rootless lane runs with an emptied environment). Without either, these tests skip
and say which script builds it; a variable naming no complete image is a failure.

This machine is Debian bookworm too: the image holds /etc/pytest-isolate-image (the
build's key) and not the host's tools, so a test can tell which root it runs in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

VARIABLE = "PYTEST_ISOLATE_DEBIAN_IMAGE"
PUBLISHED = "/var/cache/pytest-isolate-images/debian-bookworm"
BUILD = "`bash ci/images/debian.sh` (as root; .ci/run does)"
DOCKER_REGISTRY = "/usr/bin/docker-registry"
HOST_ONLY = [p for p in ("/usr/bin/skopeo", "/usr/bin/umoci", "/usr/sbin/debootstrap") if os.path.exists(p)]


def image_dir() -> str | None:
    """The image's directory, or None when there is none to use."""
    named = os.environ.get(VARIABLE)
    if named:
        return os.path.realpath(named)  # checked by the fixture below: a wrong name fails
    if os.path.isfile(os.path.join(PUBLISHED, "complete")):
        return os.path.realpath(PUBLISHED)
    return None


IMAGE_DIR = image_dir()
pytestmark = [
    pytest.mark.skipif(IMAGE_DIR is None, reason=f"no Debian image: build it with {BUILD}"),
    pytest.mark.skipif(sys.version_info[:2] != (3, 11),
                       reason="bookworm's python3 is 3.11: the controller's pytest is bound in only then"),
]


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    """The image's references by transport, and the key its /etc/pytest-isolate-image holds."""
    assert IMAGE_DIR is not None
    if not os.path.isfile(os.path.join(IMAGE_DIR, "complete")):
        pytest.fail(f"{VARIABLE}={os.environ.get(VARIABLE)} names no complete Debian image: build it with {BUILD}")
    return {"oci": f"oci:{IMAGE_DIR}/oci:bookworm", "archive": f"docker-archive:{IMAGE_DIR}/debian.tar",
            "key": os.path.basename(IMAGE_DIR).rsplit("-", 1)[-1]}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One store for the module: the image is unpacked once, not per test."""
    return str(tmp_path_factory.mktemp("debian-store") / "cache")


# Each inner test writes where the next one looks: a test's writes go to its own
# copy-on-write layer. dpkg-query is the image's own binary reading apt's database.
INSIDE = """
import os, subprocess, sys, pytest

@pytest.mark.isolated(image={image!r})
@pytest.mark.parametrize("n", range(2))
def test_debian_{name}(n):
    assert "VERSION_CODENAME=bookworm" in open("/etc/os-release").read()
    assert open("/etc/pytest-isolate-image").read() == {key!r} + "\\n"   # this image, not the Debian host
    assert sys.executable == "/usr/bin/python3.11" == os.path.realpath("/usr/bin/python3")
    version = subprocess.run(["dpkg-query", "-W", "-f=${{Version}}", "python3"], capture_output=True, text=True,
                             check=True).stdout
    assert version.startswith("3.11.")
    assert os.path.exists("/usr/bin/apt-get") and os.path.isdir("/var/lib/dpkg/info")
    for path in {host_only!r}:  # the host's files are not there
        assert not os.path.exists(path), path
    for path in ("/etc/written-by-a-test", "/var/lib/dpkg/written-by-a-test"):
        assert not os.path.exists(path), "a file another test wrote"
        open(path, "w").write(str(n))
"""


def inner_tests(image: dict[str, str], *names: str) -> str:
    return "\n".join(INSIDE.format(image=image[name], name=name, key=image["key"], host_only=HOST_ONLY)
                     for name in names)


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_oci_and_docker_archive(pytester, run, image, shared_store, monkeypatch, mode) -> None:
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", shared_store)
    pytester.makepyfile(test_inside=inner_tests(image, "oci", "archive"))
    result = run(f"--isolate-mode={mode}", timeout=600)
    result.assert_outcomes(passed=4)
    for name in ("oci", "archive"):
        assert f"container host ({mode} mode, image {image[name]})" in result.stdout.str()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """host:port of Debian's docker-registry, on loopback only."""
    if not os.path.exists(DOCKER_REGISTRY):
        pytest.skip("needs Debian's docker-registry (apt install docker-registry; .ci/run does)")
    folder = tmp_path_factory.mktemp("debian-registry")
    port = free_port()
    (folder / "config.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                                       f"    rootdirectory: {folder / 'storage'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = open(folder / "registry.log", "wb")  # not a pipe: it logs every HEAD of a blob not pushed yet
    process = subprocess.Popen([DOCKER_REGISTRY, "serve", str(folder / "config.yml")], stdout=subprocess.DEVNULL,
                               stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:  # polling until it answers, not waiting for a guessed duration
            assert process.poll() is None, \
                f"docker-registry exited {process.returncode}: {(folder / 'registry.log').read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "docker-registry did not answer within 60 s"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_docker_registry_two_workers_one_store(pytester, run, image, registry, tmp_path, monkeypatch) -> None:
    pytest.importorskip("xdist")
    if not shutil.which("skopeo"):
        pytest.skip("needs skopeo to push (apt install skopeo; .ci/run does)")
    pushed = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", image["oci"],
                             f"docker://{registry}/debian:bookworm"], capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    cache = str(tmp_path / "cache")  # empty: both workers pull into it at once
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", cache)
    reference = f"docker://{registry}/debian:bookworm"
    pytester.makepyfile(test_inside=inner_tests({**image, "registry": reference}, "registry"),
                        test_more=inner_tests({**image, "registry": reference}, "registry"))
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    run("-n", "2", timeout=600).assert_outcomes(passed=4)
    from pytest_isolate.oci.store import for_this_user

    store = for_this_user(cache)
    assert len(os.listdir(store.layers)) == 1 and os.listdir(os.path.join(cache, "tmp")) == []
    assert [r["reference"] for r in store.images()] == [reference]
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before
