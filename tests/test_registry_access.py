"""Who may be reached, and with what: registries named insecure (plain http or an
unverified certificate off loopback), and credentials from Docker's credential
helpers. The registries are Debian's docker-registry, as in test_oci_registry.py;
an off-loopback one listens on 10.254.0.1 in a private network namespace of this
test's own (nothing leaves the machine), where the pulls run too."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pytest_isolate.oci import store
from test_oci_registry import (  # noqa: F401 - fixtures
    DOCKER_REGISTRY, Image, content, no_user_credentials, open_registry, pull, push, storage, token_registry,
)

pytestmark = pytest.mark.skipif(not os.path.exists(DOCKER_REGISTRY),
                                reason="needs Debian's docker-registry (apt install docker-registry; .ci/run does)")

ADDRESS = "10.254.0.1"  # on the namespace's own loopback device, but not a loopback address

# Runs inside the private network namespace: the address, a plain-http and a TLS
# registry on it (the storage test_oci_registry's registries push to), then each
# command; prints their results as JSON.
DRIVER = textwrap.dedent('''
    import json, ssl, subprocess, sys, time, urllib.request
    config = json.loads(sys.argv[1])
    for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", config["address"] + "/32", "dev", "lo"]):
        subprocess.run(command, check=True)
    registries = [subprocess.Popen([config["registry"], "serve", path], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for path in config["configs"]]
    try:
        unverified = ssl._create_unverified_context()
        for url in config["wait"]:
            for _ in range(1200):  # until it answers: polling, not a guessed duration
                try:
                    urllib.request.urlopen(url, timeout=2, context=unverified).close()
                    break
                except OSError:
                    time.sleep(0.05)
        results = [subprocess.run(config["as_user"] + command, capture_output=True, text=True, timeout=300,
                                  cwd=config["cwd"]) for command in config["commands"]]
        print(json.dumps([[r.returncode, r.stdout, r.stderr] for r in results]))
    finally:
        for process in registries:
            process.kill()
            process.wait()
''')


def in_private_network(tmp_path, storage, commands: list[list[str]], cwd) -> list[tuple[int, str, str]]:
    """Run ``commands`` in a new network namespace that has the registries
    http://ADDRESS:5000 and https://ADDRESS:5443 (a self-signed certificate)."""
    if not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("openssl"):
        pytest.skip("needs ip, unshare and openssl")
    folder = tmp_path / "private-registries"
    folder.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "key.pem",
                    "-out", folder / "cert.pem", "-days", "2", "-subj", f"/CN={ADDRESS}",
                    "-addext", f"subjectAltName=IP:{ADDRESS}"], check=True, capture_output=True)
    configs = []
    for port, tls in ((5000, ""), (5443, f"  tls:\n    certificate: {folder}/cert.pem\n    key: {folder}/key.pem\n")):
        path = folder / f"config-{port}.yml"
        path.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
                        f"http:\n  addr: {ADDRESS}:{port}\n{tls}")
        configs.append(str(path))
    config = {"address": ADDRESS, "registry": DOCKER_REGISTRY, "configs": configs, "commands": commands,
              "wait": [f"http://{ADDRESS}:5000/v2/", f"https://{ADDRESS}:5443/v2/"], "cwd": str(cwd)}
    # As an unprivileged user, the namespace comes with a user namespace of its own, in
    # which the commands run as that user again (a nested one mapping the user back).
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    config["as_user"] = [] if os.geteuid() == 0 else \
        ["unshare", f"--map-user={os.geteuid()}", f"--map-group={os.getegid()}"]
    done = subprocess.run([*unshare, sys.executable, "-c", DRIVER, json.dumps(config)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return [tuple(r) for r in json.loads(done.stdout)]


def cli_pull(image: str, cache, *insecure: str) -> list[str]:
    return [sys.executable, "-m", "pytest_isolate", "pull", image, "--cache", str(cache),
            *(f"--insecure-registry={name}" for name in insecure)]


HINT = "name it an insecure registry: --isolate-insecure-registry={0} (ini isolate_insecure_registries; " \
       "`python -m pytest_isolate pull --insecure-registry={0}`)"


def test_an_off_loopback_registry_needs_to_be_named_insecure(open_registry, storage, tmp_path) -> None:
    push(f"http://{open_registry}", "team/far", Image([{"f": b"far away"}]), "1")
    plain, tls = f"{ADDRESS}:5000", f"{ADDRESS}:5443"
    cache = tmp_path / "cache"
    results = in_private_network(tmp_path, storage, [
        cli_pull(f"docker://{plain}/team/far:1", cache),
        cli_pull(f"docker://{tls}/team/far:1", cache),
        cli_pull(f"docker://{plain}/team/far:1", cache, plain),
        cli_pull(f"docker://{tls}/team/far:1", cache / "tls", ADDRESS),  # the host alone: every port
        cli_pull(f"docker://{plain}/team/far:1", cache / "other", f"{ADDRESS}:5001"),
    ], tmp_path)
    (status, _, plain_refused), (tls_status, _, tls_refused) = results[:2]
    assert status == 1 and HINT.format(plain) in plain_refused and "WRONG_VERSION_NUMBER" in plain_refused
    assert tls_status == 1 and HINT.format(tls) in tls_refused and "CERTIFICATE_VERIFY_FAILED" in tls_refused
    assert "Traceback" not in plain_refused + tls_refused
    for status, out, err in results[2:4]:
        assert status == 0 and ": 1 layers" in out and err == "", (out, err)
    assert results[4][0] == 1 and HINT.format(plain) in results[4][2]  # another port is not named
    stored = store.for_this_user(str(cache))
    assert content(stored, stored.image(f"docker://{plain}/team/far:1"), 0, "f") == b"far away"
    stored = store.for_this_user(str(cache / "tls"))
    assert content(stored, stored.image(f"docker://{tls}/team/far:1"), 0, "f") == b"far away"


def test_the_plugin_takes_insecure_registries_from_the_ini_and_the_command_line(open_registry, storage, pytester,
                                                                              tmp_path, monkeypatch) -> None:
    # An image without Python: once pulled, the run stops at "has no Python", which
    # shows the pull got through, without starting a container in the namespace.
    push(f"http://{open_registry}", "team/nopython", Image([{"etc/os-release": b"x"}]), "1")
    image = f"docker://{ADDRESS}:5000/team/nopython:1"
    pytester.makepyfile(test_far=f"""
        import pytest

        @pytest.mark.isolated(image={image!r})
        def test_far():
            pass
    """)
    pytester.makeini(f"[pytest]\nisolate_insecure_registries =\n    other.example\n    {ADDRESS}:5443\n")
    run = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", str(tmp_path / "store"))
    results = in_private_network(tmp_path, storage, [
        run, run + ["-o", f"isolate_insecure_registries={ADDRESS}:5000"],
        run + [f"--isolate-insecure-registry={ADDRESS}", "--isolate-pull=always"],
    ], pytester.path)
    refused, from_ini, from_command_line = ("\n".join(r[1:]) for r in results)
    assert HINT.format(f"{ADDRESS}:5000") in refused and "has no Python" not in refused
    for output in (from_ini, from_command_line):
        assert f"{image} has no Python" in output and "insecure registry" not in output, output


@pytest.mark.parametrize("value", ["http://reg.example:5000", "reg.example/v2", "reg.example:99999", ""])
def test_a_bad_insecure_registry_is_a_usage_error(pytester, run, value: str) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    result = run(f"--isolate-insecure-registry={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (f"ERROR: command line --isolate-insecure-registry: got {value!r}; accepted: a registry as host[:port], "
            "e.g. registry.lan:5000 or 10.0.0.5:5000 (no scheme, no path)") in result.stderr.lines
    pytester.makeini(f"[pytest]\nisolate_insecure_registries = {value or '[x]'}\n")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: ini key isolate_insecure_registries in {pytester.path}/tox.ini: got " in result.stderr.str()
    assert "; accepted: a registry as host[:port]" in result.stderr.str() and "Traceback" not in result.stderr.str()
    cli = subprocess.run([sys.executable, "-m", "pytest_isolate", "pull", "docker://reg.example/x",
                          f"--insecure-registry={value}"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.startswith("pytest-isolate pull: --insecure-registry: got ")
