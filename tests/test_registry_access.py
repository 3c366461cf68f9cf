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

from pytest_isolate.oci import credentials, local, store
import test_oci_registry
from test_oci_registry import DOCKER_REGISTRY, Image, content, pull, push

# Its registries and the autouse fixture that keeps the user's own credentials out.
storage, open_registry, token_registry = \
    test_oci_registry.storage, test_oci_registry.open_registry, test_oci_registry.token_registry
no_user_credentials = test_oci_registry.no_user_credentials

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


# -- credential helpers --------------------------------------------------------------------------

@pytest.fixture
def helpers(tmp_path, monkeypatch):
    """helpers(name, answer): a docker-credential-NAME on PATH that logs what it was
    asked and runs the shell ``answer``; the log's path is helpers.log."""
    folder = tmp_path / "helper-bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    log = tmp_path / "helpers.log"

    def write(name: str, answer: str) -> None:
        path = folder / f"docker-credential-{name}"
        path.write_text(f'#!/bin/sh\nread -r server\necho "{name} $1 $server" >> {log}\n{answer}\n')
        path.chmod(0o755)

    write.log = log
    return write


def docker_config(tmp_path, config: dict) -> None:
    folder = tmp_path / "home" / ".docker"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def answer(user: str, secret: str) -> str:
    return f"echo '{json.dumps({'ServerURL': 'x', 'Username': user, 'Secret': secret})}'"


NOT_FOUND = "echo 'credentials not found in native keychain'; exit 1"


def basic(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_from_a_helper_in_dockers_order(token_registry, open_registry, tmp_path, helpers) -> None:
    address, tokens = token_registry
    push(f"http://{open_registry}", "team/private", Image([{"f": b"private"}]), "1")
    private = f"docker://{address}/team/private:1"
    helpers("test", answer("alice", "s3cret"))
    docker_config(tmp_path, {"credsStore": "test", "auths": {address: {}}})
    assert content(store_of(tmp_path, 1), pull(private, store_of(tmp_path, 1)), 0, "f") == b"private"
    assert tokens.requests[-1][1] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert helpers.log.read_text() == f"test get {address}\n"
    # credHelpers for the registry come first; a helper without credentials lets the
    # lookup go on (credsStore, then auths).
    helpers("wrong", answer("alice", "wrong"))
    helpers("none", NOT_FOUND)
    docker_config(tmp_path, {"credHelpers": {address: "wrong", "elsewhere.example": "test"}, "credsStore": "test"})
    with pytest.raises(local.ImageError, match=rf"access denied to {private}: check your credentials in "
                                               rf"docker-credential-wrong \(credHelpers in .*config.json\)"):
        pull(private, store_of(tmp_path, 2))
    helpers.log.write_text("")
    docker_config(tmp_path, {"credHelpers": {address: "none"}, "credsStore": "test"})
    assert pull(private, store_of(tmp_path, 3))["layers"]
    docker_config(tmp_path, {"credHelpers": {address: "none"}, "credsStore": "none",
                             "auths": {address: basic("alice", "s3cret")}})
    assert pull(private, store_of(tmp_path, 4))["layers"]
    assert helpers.log.read_text() == f"none get {address}\ntest get {address}\n" + f"none get {address}\n" * 2


def store_of(tmp_path, n: int) -> store.Store:
    return store.Store(str(tmp_path / f"store-{n}"))


def test_docker_hub_is_asked_for_by_its_v1_address(tmp_path, helpers) -> None:
    helpers("hub", answer("hubuser", "pw"))
    docker_config(tmp_path, {"credHelpers": {"docker.io": "hub"}})
    assert credentials.credentials("docker.io", "library/python")[0] == ("hubuser", "pw")
    assert credentials.credentials("registry.example", "team/app") == (None, None)
    assert helpers.log.read_text() == "hub get https://index.docker.io/v1/\n"


@pytest.mark.parametrize("script, error", [
    (None, r"credsStore in .*config.json names the credential helper docker-credential-gone, which is not on PATH: "
           r"install it, or remove it from that file to use its auths"),
    ("echo 'the keyring is locked' >&2; exit 3", r"docker-credential-gone \(credsStore in .*\) failed for "
                                                 r"reg.example:5000: the keyring is locked"),
    ("echo '{\"Username\": 1}'", r"answered for reg.example:5000 with no \{\"Username\": ..., \"Secret\": ...\}"),
    ("echo '{\"Username\": \"<token>\", \"Secret\": \"t\"}'", r"holds an identity token for reg.example:5000"),
    ("head -c 200000 /dev/zero | tr '\\0' x", r"docker-credential-gone \(credsStore in .*\) printed more than "
                                               r"65536 bytes"),
    ("exec sleep 1000", r"docker-credential-gone \(credsStore in .*\) did not answer within 1 s"),
], ids=["not-on-path", "fails", "no-object", "identity-token", "too-much", "hangs"])
def test_a_helper_that_cannot_answer_is_named(tmp_path, helpers, monkeypatch, script, error) -> None:
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 1.0)
    if script is not None:
        helpers("gone", script)
    docker_config(tmp_path, {"credsStore": "gone", "auths": {"reg.example:5000": basic("a", "b")}})
    with pytest.raises(local.ImageError, match=error):
        credentials.credentials("reg.example:5000", "team/app")


def test_a_helper_name_is_not_a_path(tmp_path) -> None:
    docker_config(tmp_path, {"credsStore": "../../bin/sh"})
    with pytest.raises(local.ImageError, match=r"'../../bin/sh' is not a credential helper name"):
        credentials.credentials("reg.example", "team/app")
