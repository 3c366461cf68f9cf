"""``docker://`` pulls from a registry: Debian's docker-registry bound to 127.0.0.1 (open,
and with token auth from a token server here that signs JWTs with the openssl CLI), and
a small registry written here for what a well-behaved one never does (corrupt and
truncated blobs, 503s, redirects to a blob host, oversized manifests)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import pty
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from pytest_isolate.oci import local, reference, registry
from pytest_isolate.oci.store import MAX_MANIFEST, Store
from test_oci_local import ARCH, sha, tar_of

DOCKER_REGISTRY = "/usr/bin/docker-registry"
pytestmark = pytest.mark.skipif(not os.path.exists(DOCKER_REGISTRY),
                                reason="needs Debian's docker-registry (apt install docker-registry; .ci/run does)")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


# -- images written here ---------------------------------------------------------------------------

class Image:
    """An image in memory: its blobs, its manifest and that manifest's media type."""

    def __init__(self, layers: list[dict[str, bytes]], docker: bool = False, arch: str = ARCH,
                 media_type_field: bool = True) -> None:
        tars = [tar_of(files) for files in layers]
        self.layers = [gzip.compress(t, mtime=0) for t in tars]
        self.config = json.dumps({"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"]},
                                  "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
        self.media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        config_type = "application/vnd.docker.container.image.v1+json" if docker else \
            "application/vnd.oci.image.config.v1+json"
        layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else \
            "application/vnd.oci.image.layer.v1.tar+gzip"
        manifest = {"schemaVersion": 2,
                    "config": {"mediaType": config_type, "digest": sha(self.config), "size": len(self.config)},
                    "layers": [{"mediaType": layer_type, "digest": sha(b), "size": len(b)} for b in self.layers]}
        if media_type_field:
            manifest["mediaType"] = self.media_type
        self.manifest = json.dumps(manifest).encode()
        self.digest = sha(self.manifest)
        self.blobs = [self.config, *self.layers]

    def descriptor(self, os_: str = "linux", arch: str = ARCH) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest),
                "platform": {"os": os_, "architecture": arch}}


def index_of(entries: list[dict], docker: bool = False) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX,
                       "manifests": entries}).encode()


def push(base: str, name: str, image: Image | None, tag: str, manifest: bytes | None = None,
         media_type: str | None = None) -> None:
    """The distribution spec's monolithic upload: POST, then PUT ?digest=; PUT the manifest."""
    for blob in image.blobs if image else []:
        started = urllib.request.urlopen(urllib.request.Request(f"{base}/v2/{name}/blobs/uploads/", method="POST"))
        location = urllib.parse.urljoin(base, started.headers["Location"])
        separator = "&" if "?" in location else "?"
        urllib.request.urlopen(urllib.request.Request(
            f"{location}{separator}digest={sha(blob)}", data=blob, method="PUT",
            headers={"Content-Type": "application/octet-stream"})).close()
    urllib.request.urlopen(urllib.request.Request(
        f"{base}/v2/{name}/manifests/{tag}", data=manifest or image.manifest, method="PUT",
        headers={"Content-Type": media_type or image.media_type})).close()


# -- Debian's docker-registry, open and with token auth ---------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, accept=(200, 401)) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited {process.returncode}: {process.stderr.read()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError as exc:
            if exc.code in accept:
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling, not waiting for a guessed duration
    raise RuntimeError(f"{url} did not answer within 60 s")


def start_registry(folder, storage, extra: str = ""):
    port = free_port()
    config = folder / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n{extra}")
    process = subprocess.Popen([DOCKER_REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/", process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("registry-storage")


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory, storage):
    """host:port of an open docker-registry on loopback."""
    process, address = start_registry(tmp_path_factory.mktemp("registry"), storage)
    yield address
    process.terminate()
    process.wait(30)


class TokenServer(http.server.ThreadingHTTPServer):
    """Docker's token service: anonymous pulls of team/*, team/private for alice only."""

    def __init__(self, key: str) -> None:
        super().__init__(("127.0.0.1", 0), TokenHandler)
        self.key, self.requests = key, []
        spki = subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-outform", "DER"], check=True,
                              capture_output=True).stdout
        # libtrust's key id, which the registry looks the signing key up by.
        encoded = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(encoded[i:i + 4] for i in range(0, 48, 4))

    def token(self, user: str, name: str, allowed: bool) -> str:
        def b64(data: bytes) -> bytes:
            return base64.urlsafe_b64encode(data).rstrip(b"=")
        now = int(time.time())
        claims = {"iss": "tests-issuer", "sub": user, "aud": "tests-service", "exp": now + 600, "nbf": now - 60,
                  "iat": now - 60, "jti": secrets.token_hex(8),
                  "access": [{"type": "repository", "name": name, "actions": ["pull"]}] if allowed else []}
        signing = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": self.kid}).encode()) + b"." + \
            b64(json.dumps(claims).encode())
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key], input=signing, check=True,
                                   capture_output=True).stdout
        return (signing + b"." + b64(signature)).decode()


class TokenHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: TokenServer = self.server
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        authorization = self.headers.get("Authorization")
        server.requests.append((query, authorization))
        user = ""
        if authorization:
            user, _, password = base64.b64decode(authorization.split()[1]).decode().partition(":")
            if (user, password) != ("alice", "s3cret"):
                self.send_response(401)
                self.end_headers()
                return
        name = query["scope"][0].split(":")[1]
        allowed = name != "team/private" or user == "alice"
        body = json.dumps({"token": server.token(user, name, allowed)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory, storage, open_registry):
    """(host:port, token server) of a docker-registry with token auth, on the same storage
    as ``open_registry`` (images are pushed there, without auth)."""
    if not shutil.which("openssl"):
        pytest.skip("token auth needs the openssl program to sign tokens")
    folder = tmp_path_factory.mktemp("token-registry")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "key.pem",
                    "-out", folder / "cert.pem", "-days", "2", "-subj", "/CN=tests-token"], check=True,
                   capture_output=True)
    tokens = TokenServer(str(folder / "key.pem"))
    thread = threading.Thread(target=tokens.serve_forever, daemon=True)
    thread.start()
    process, address = start_registry(
        folder, storage, f"auth:\n  token:\n    realm: http://127.0.0.1:{tokens.server_port}/token\n"
                         f"    service: tests-service\n    issuer: tests-issuer\n"
                         f"    rootcertbundle: {folder / 'cert.pem'}\n")
    yield address, tokens
    process.terminate()
    process.wait(30)
    tokens.shutdown()
    tokens.server_close()
    thread.join()


# -- a registry written here -----------------------------------------------------------------------

class Fake(http.server.ThreadingHTTPServer):
    """The distribution spec's pull side from memory, with bearer tokens (``/token``) and
    the faults a test asks for. ``/cdn/<digest>`` serves blobs as a blob host does."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), FakeHandler)
        self.url = f"http://{host}:{self.server_port}"
        self.netloc = f"{host}:{self.server_port}"
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.protected: dict[str, tuple[str, str] | None] = {}  # name: credentials (None: a token)
        self.tokens: dict[str, str] = {}
        self.basic: dict[str, tuple[str, str]] = {}  # name: credentials asked for by a Basic challenge
        self.failures = 0
        self.redirect: str | None = None  # blobs answered by a redirect to <redirect>/cdn/<digest>
        self.truncate: set[str] = set()
        self.no_length: set[str] = set()
        self.ranges_asked: list[str] = []
        self.ranges = False  # Range requests honoured (206); a truncated blob is cut once
        self.challenge_cdn = False  # /cdn/ answers 401 with a Bearer challenge naming its own realm
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name: str, image: Image, tag: str) -> None:
        for blob in image.blobs:
            self.blobs[sha(blob)] = blob
        self.manifests[(name, tag)] = self.manifests[(name, image.digest)] = (image.manifest, image.media_type)

    def handle_error(self, request, client_address) -> None:
        # A client that stops reading (an oversized manifest refused) breaks the pipe.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class FakeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, body: bytes = b"", headers=(), length: bool = True) -> None:
        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        fake: Fake = self.server
        fake.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Range"):
            fake.ranges_asked.append(self.headers["Range"])
        if fake.failures:
            fake.failures -= 1
            return self.reply(503, b"busy")
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/token":
            return self.token(fake, urllib.parse.parse_qs(url.query))
        if url.path.startswith("/cdn/") and fake.challenge_cdn:
            return self.reply(401, headers=[("WWW-Authenticate", f'Bearer realm="{fake.url}/token",service="cdn"')])
        if url.path.startswith("/cdn/"):
            return self.blob(fake, url.path[5:])
        match = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/]+)$", url.path)
        if not match:
            return self.reply(404)
        name, kind, ref = match.groups()
        if name in fake.protected and fake.tokens.get((self.headers.get("Authorization") or "")[7:]) != name:
            return self.reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', [(
                "WWW-Authenticate", f'Bearer realm="{fake.url}/token",service="fake",scope="repository:{name}:pull"')])
        if name in fake.basic and self.headers.get("Authorization") != \
                "Basic " + base64.b64encode(":".join(fake.basic[name]).encode()).decode():
            return self.reply(401, headers=[("WWW-Authenticate", 'Basic realm="fake"')])
        if kind == "blobs" and fake.redirect:
            return self.reply(307, headers=[("Location", f"{fake.redirect}/cdn/{ref}")])
        if kind == "blobs":
            return self.blob(fake, ref)
        if (name, ref) not in fake.manifests:
            return self.reply(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
        data, media_type = fake.manifests[(name, ref)]
        self.reply(200, data, [("Content-Type", media_type), ("Docker-Content-Digest", sha(data))],
                   length=ref not in fake.no_length)

    def blob(self, fake: Fake, digest: str) -> None:
        data = fake.blobs.get(digest)
        if data is None:
            return self.reply(404)
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged and fake.ranges:
            start = int(ranged.group(1))
            return self.reply(206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
        if digest in fake.truncate:  # announces every byte, sends half, hangs up
            if fake.ranges:
                fake.truncate.discard(digest)  # once
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            return
        self.reply(200, data, [("Content-Type", "application/octet-stream")])

    def token(self, fake: Fake, query: dict) -> None:
        name = query["scope"][0].split(":")[1]
        wanted = fake.protected.get(name)
        if wanted is not None:
            given = self.headers.get("Authorization") or ""
            if not given.startswith("Basic ") or \
                    tuple(base64.b64decode(given[6:]).decode().split(":", 1)) != wanted:
                return self.reply(401)
        token = secrets.token_hex(16)
        fake.tokens[token] = name
        self.reply(200, json.dumps({"access_token": token}).encode(), [("Content-Type", "application/json")])


@pytest.fixture
def fake():
    server = Fake()
    yield server
    server.stop()


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_user_credentials(tmp_path, monkeypatch) -> None:
    """Only the auth files a test writes."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


def pull(text: str, store: Store, **kwargs) -> dict:
    return local.import_image(reference.parse(text), store, **kwargs)


def content(store: Store, record: dict, layer: int, path: str) -> bytes:
    with open(os.path.join(store.layer_path(record["layers"][layer]), path), "rb") as f:
        return f.read()


def auth_file(tmp_path, host: str, user: str, password: str, key: str | None = None):
    path = tmp_path / "auth.json"
    entry = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {key or host: {"auth": entry}}}))
    return path


def layers_of(store: Store) -> list[str]:
    return os.listdir(os.path.dirname(store.layer_path("sha256:" + "0" * 64)))


def assert_nothing_stored(store: Store) -> None:
    assert layers_of(store) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == [] and store.images() == []


# -- the real registry -----------------------------------------------------------------------------

def test_pull_by_tag_oci_and_docker_manifests(open_registry, store) -> None:
    base = f"http://{open_registry}"
    v1 = Image([{"etc/os-release": b"base\n"}, {"app/main": b"v1"}])
    docker = Image([{"etc/os-release": b"base\n"}, {"app/main": b"docker"}], docker=True)
    bare = Image([{"app/main": b"bare"}], media_type_field=False)  # umoci leaves mediaType out
    push(base, "team/app", v1, "1")
    push(base, "team/app", docker, "docker")
    push(base, "team/app", bare, "bare")
    record = pull(f"docker://{open_registry}/team/app:1", store)
    assert record["reference"] == f"docker://{open_registry}/team/app:1"
    assert record["manifest"] == v1.digest and record["config"] == sha(v1.config) and record["env"] == ["PATH=/bin"]
    assert content(store, record, 0, "etc/os-release") == b"base\n" and content(store, record, 1, "app/main") == b"v1"
    assert store.image(f"docker://{open_registry}/team/app:1") == record
    other = pull(f"docker://{open_registry}/team/app:docker", store)
    assert content(store, other, 1, "app/main") == b"docker" and other["layers"][0] == record["layers"][0]
    assert len(layers_of(store)) == 3  # the base layer, once
    assert content(store, pull(f"docker://{open_registry}/team/app:bare", store), 0, "app/main") == b"bare"


def test_pull_by_digest_and_a_pinned_digest_wins_over_the_tag(open_registry, store) -> None:
    base = f"http://{open_registry}"
    first, second = Image([{"which": b"first"}]), Image([{"which": b"second"}])
    push(base, "team/pinned", first, "1")
    push(base, "team/pinned", second, "2")
    by_digest = pull(f"docker://{open_registry}/team/pinned@{first.digest}", store)
    assert content(store, by_digest, 0, "which") == b"first" and by_digest["manifest"] == first.digest
    both = pull(f"docker://{open_registry}/team/pinned:2@{first.digest}", store)
    assert content(store, both, 0, "which") == b"first"
    assert content(store, pull(f"docker://{open_registry}/team/pinned:2", store), 0, "which") == b"second"


def test_a_missing_tag_or_repository_is_named(open_registry, store) -> None:
    push(f"http://{open_registry}", "team/few", Image([{"a": b"1"}]), "1")
    for text in (f"docker://{open_registry}/team/few:2", f"docker://{open_registry}/team/none:1"):
        with pytest.raises(local.ImageError, match=re.escape(f"{text} not found: check the name and tag")):
            pull(text, store)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
def test_a_multi_platform_index_picks_this_machine(open_registry, store, docker: bool) -> None:
    base, name = f"http://{open_registry}", f"team/multi-{int(docker)}"
    ours = Image([{"which": ARCH.encode()}], docker=docker)
    foreign = Image([{"which": b"s390x"}], docker=docker, arch="s390x")
    attestation = Image([{"which": b"attestation"}], docker=docker, arch="unknown")
    for image, tag in ((ours, "ours"), (foreign, "foreign"), (attestation, "attestation")):
        push(base, name, image, tag)
    media_type = DOCKER_LIST if docker else OCI_INDEX
    push(base, name, None, "multi", index_of([attestation.descriptor("unknown", "unknown"),
                                              foreign.descriptor("linux", "s390x"), ours.descriptor()], docker),
         media_type)
    record = pull(f"docker://{open_registry}/{name}:multi", store)
    assert content(store, record, 0, "which") == ARCH.encode() and record["manifest"] == ours.digest
    push(base, name, None, "only-foreign", index_of([foreign.descriptor("linux", "s390x")], docker), media_type)
    with pytest.raises(local.ImageError, match=rf"the index of docker://{open_registry}/{name}:only-foreign has no "
                                               rf"image for this machine \(linux/{ARCH}\); on offer: linux/s390x"):
        pull(f"docker://{open_registry}/{name}:only-foreign", store)


def test_token_auth_anonymous_and_with_credentials_from_an_auth_file(token_registry, open_registry, store, tmp_path,
                                                                     monkeypatch) -> None:
    address, tokens = token_registry
    push(f"http://{open_registry}", "team/public", Image([{"f": b"public"}]), "1")
    push(f"http://{open_registry}", "team/private", Image([{"f": b"private"}]), "1")
    record = pull(f"docker://{address}/team/public:1", store)
    assert content(store, record, 0, "f") == b"public"
    query, authorization = tokens.requests[-1]
    assert query == {"service": ["tests-service"], "scope": ["repository:team/public:pull"]} and authorization is None
    with pytest.raises(local.ImageError, match=rf"access denied to docker://{address}/team/private:1: no credentials "
                                               rf"for {address} in .*; log in with `docker login {address}`"):
        pull(f"docker://{address}/team/private:1", store)
    good = auth_file(tmp_path, address, "alice", "s3cret", key=f"http://{address}/v2/")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(good))
    record = pull(f"docker://{address}/team/private:1", store)
    assert content(store, record, 0, "f") == b"private"
    assert tokens.requests[-1][1] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {address: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(bad))
    with pytest.raises(local.ImageError, match=rf"access denied to docker://{address}/team/private:1: check your "
                                               rf"credentials in {re.escape(str(bad))} or `docker login {address}`"):
        pull(f"docker://{address}/team/private:1", Store(str(tmp_path / "other")))


def cli(*args: str, cache, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_isolate", *args, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_pull_and_images_from_the_shell(open_registry, tmp_path) -> None:
    push(f"http://{open_registry}", "team/shell", Image([{"a": b"1"}, {"b": os.urandom(1 << 20)}]), "1")
    text = f"docker://{open_registry}/team/shell:1"
    pulled = cli("pull", text, cache=tmp_path / "cache")
    assert pulled.returncode == 0 and pulled.stdout.startswith(f"{text}: 2 layers") and pulled.stderr == "", pulled
    listed = cli("images", cache=tmp_path / "cache")
    assert re.search(rf"^{re.escape(text)}\s+2\s", listed.stdout, re.M), listed.stdout
    missing = cli("pull", f"docker://{open_registry}/team/shell:nope", cache=tmp_path / "cache")
    assert missing.returncode == 1 and "team/shell:nope not found: check the name and tag" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_pull_shows_progress_on_a_terminal_only(open_registry, tmp_path) -> None:
    push(f"http://{open_registry}", "team/tty", Image([{"a": b"1"}, {"b": os.urandom(1 << 20)}]), "1")
    text = f"docker://{open_registry}/team/tty:1"

    def on_a_tty(*args: str) -> str:
        leader, follower = pty.openpty()
        process = subprocess.Popen([sys.executable, "-m", "pytest_isolate", "pull", text, *args,
                                    "--cache", str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            output += chunk
        os.close(leader)
        assert process.wait(300) == 0
        process.stdout.close()
        return output.decode()

    shown = on_a_tty()
    # The terminal turns each \n into \r\n; a \r alone rewrites the line.
    lines = [line.split("\r")[-1].replace("\x1b[K", "") for line in shown.replace("\r\n", "\n").split("\n")]
    assert re.fullmatch(r"layer 1/2 \(sha256:[0-9a-f]{12}\)  done, \d+ B", lines[0]), lines
    assert re.fullmatch(r"layer 2/2 \(sha256:[0-9a-f]{12}\)  done, 1 MiB", lines[1]), lines
    assert re.search(r"MiB/s|KiB/s", shown)  # the rate, while it downloaded
    again = on_a_tty()
    assert "layer 2/2" in again and "already present" in again
    assert on_a_tty("-q") == ""


# -- the registry written here: faults, redirects, retries -----------------------------------------

def test_credentials_never_follow_a_redirect_to_another_host(fake, store, tmp_path, monkeypatch) -> None:
    cdn = Fake("127.0.0.2")
    try:
        image = Image([{"f": b"via the cdn"}, {"g": b"2"}])
        fake.add("team/secret", image, "1")
        cdn.blobs = dict(fake.blobs)
        fake.protected["team/secret"] = ("bob", "hunter2")
        fake.redirect = cdn.url
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(tmp_path, fake.netloc, "bob", "hunter2")))
        record = pull(f"docker://{fake.netloc}/team/secret:1", store)
        assert content(store, record, 0, "f") == b"via the cdn"
        assert sorted(path for path, _ in cdn.seen) == sorted(f"/cdn/{sha(b)}" for b in image.blobs)
        assert [auth for _, auth in cdn.seen] == [None] * 3
        assert any(auth and auth.startswith("Bearer ") for path, auth in fake.seen if "/blobs/" in path)
        # A blob host that serves other bytes: the digest is still checked.
        evil = bytearray(image.layers[1])
        evil[len(evil) // 2] ^= 0xff
        cdn.blobs[sha(image.layers[1])] = bytes(evil)
        other = Store(str(tmp_path / "other"))
        with pytest.raises(local.ImageError, match=rf"layer 2/2 of .* does not match its digest {sha(image.layers[1])}"):
            pull(f"docker://{fake.netloc}/team/secret:1", other)
        assert layers_of(other) == [record["layers"][0][7:]]  # layer 1 was good
        assert os.listdir(os.path.join(other.root, "tmp")) == [] and other.images() == []
        # A blob host that asks for a token does not get to name where credentials go.
        cdn.challenge_cdn, cdn.seen = True, []
        with pytest.raises(local.ImageError, match=rf"access denied to docker://{fake.netloc}/team/secret:1: check "
                                                   rf"your credentials in "):
            pull(f"docker://{fake.netloc}/team/secret:1", Store(str(tmp_path / "third")))
        assert [path for path, _ in cdn.seen if path.startswith("/token")] == [] and \
            [auth for _, auth in cdn.seen] == [None] * len(cdn.seen) and cdn.seen
    finally:
        cdn.stop()


def test_a_basic_challenge_gets_the_credentials(fake, store, tmp_path, monkeypatch) -> None:
    fake.add("team/basic", Image([{"f": b"basic"}]), "1")
    fake.basic["team/basic"] = ("carol", "pw")
    with pytest.raises(local.ImageError, match=rf"access denied to docker://{fake.netloc}/team/basic:1: no credentials"):
        pull(f"docker://{fake.netloc}/team/basic:1", store)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(tmp_path, fake.netloc, "carol", "pw")))
    assert content(store, pull(f"docker://{fake.netloc}/team/basic:1", store), 0, "f") == b"basic"


def test_foreign_urls_are_not_followed(fake, store) -> None:
    cdn = Fake("127.0.0.2")
    try:
        image = Image([{"f": b"from the registry"}])
        manifest = json.loads(image.manifest)
        manifest["layers"][0]["urls"] = [f"{cdn.url}/cdn/{sha(image.layers[0])}"]
        manifest["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        data = json.dumps(manifest).encode()
        fake.add("team/foreign", image, "ignored")
        fake.manifests[("team/foreign", "1")] = (data, OCI_MANIFEST)
        record = pull(f"docker://{fake.netloc}/team/foreign:1", store)
        assert content(store, record, 0, "f") == b"from the registry" and cdn.seen == []
    finally:
        cdn.stop()


def test_a_corrupt_or_truncated_blob_stores_nothing(fake, store) -> None:
    data = os.urandom(100_000)
    image = Image([{"f": data}])
    fake.add("team/bad", image, "1")
    layer = sha(image.layers[0])
    corrupt = bytearray(image.layers[0])
    corrupt[len(corrupt) // 2] ^= 1
    fake.blobs[layer] = bytes(corrupt)
    with pytest.raises(local.ImageError, match=rf"layer 1/1 of docker://{fake.netloc}/team/bad:1 \({layer}\) does not match its digest {layer}"):
        pull(f"docker://{fake.netloc}/team/bad:1", store)
    assert_nothing_stored(store)
    fake.blobs[layer] = image.layers[0]
    fake.truncate.add(layer)
    with pytest.raises(local.ImageError, match=rf"\({layer}\) is truncated: the connection ended after "
                                               rf"{len(image.layers[0]) // 2} of {len(image.layers[0])} bytes"):
        pull(f"docker://{fake.netloc}/team/bad:1", store)
    assert_nothing_stored(store)
    fake.truncate.clear()
    assert content(store, pull(f"docker://{fake.netloc}/team/bad:1", store), 0, "f") == data


def test_a_blob_cut_short_is_resumed_with_a_range_request(fake, store) -> None:
    data = os.urandom(300_000)
    image = Image([{"f": data}])
    fake.add("team/resume", image, "1")
    layer = sha(image.layers[0])
    fake.truncate.add(layer)
    fake.ranges = True
    record = pull(f"docker://{fake.netloc}/team/resume:1", store)
    assert content(store, record, 0, "f") == data and layer not in fake.truncate
    blob_requests = [path for path, _ in fake.seen if path == f"/v2/team/resume/blobs/{layer}"]
    assert len(blob_requests) == 2 and fake.ranges_asked == [f"bytes={len(image.layers[0]) // 2}-"]


def test_a_corrupt_config_or_manifest_is_refused(fake, store) -> None:
    image = Image([{"f": b"1"}])
    fake.add("team/lying", image, "1")
    fake.blobs[sha(image.config)] = image.config.replace(b"PATH=/bin", b"PATH=/xyz")
    with pytest.raises(local.ImageError, match=rf"the config of .* does not match its digest {sha(image.config)}"):
        pull(f"docker://{fake.netloc}/team/lying:1", store)
    other = Image([{"f": b"2"}])
    fake.manifests[("team/lying", image.digest)] = (other.manifest, OCI_MANIFEST)
    with pytest.raises(local.ImageError, match=rf"the manifest of .* does not match its digest {image.digest} "
                                               rf"\(got {other.digest}\)"):
        pull(f"docker://{fake.netloc}/team/lying@{image.digest}", store)
    assert_nothing_stored(store)


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "until-close"])
def test_an_oversized_manifest_is_refused(fake, store, with_length: bool) -> None:
    manifest = json.dumps({"schemaVersion": 2, "padding": "x" * MAX_MANIFEST}).encode()
    fake.manifests[("team/huge", "1")] = (manifest, OCI_MANIFEST)
    if not with_length:
        fake.no_length.add("1")
    with pytest.raises(local.ImageError, match=rf"the manifest of .* is (larger than {MAX_MANIFEST} bytes|"
                                               rf"{len(manifest)} bytes; the most accepted is {MAX_MANIFEST})"):
        pull(f"docker://{fake.netloc}/team/huge:1", store)


def test_transient_errors_are_retried(fake, store) -> None:
    fake.add("team/flaky", Image([{"f": b"eventually"}]), "1")
    fake.failures = 2
    record = pull(f"docker://{fake.netloc}/team/flaky:1", store)
    assert content(store, record, 0, "f") == b"eventually"
    assert [path for path, _ in fake.seen[:3]] == ["/v2/team/flaky/manifests/1"] * 3
    fake.failures = 3
    with pytest.raises(local.ImageError, match=r"the registry answered HTTP 503 \(Service Unavailable\)"):
        pull(f"docker://{fake.netloc}/team/flaky:1", Store(str(store.root) + "-2"))


def test_an_unreachable_registry_is_named(store) -> None:
    port = free_port()
    with pytest.raises(local.ImageError, match=rf"docker://127.0.0.1:{port}/team/app:1: cannot reach registry "
                                               rf"127.0.0.1:{port} \(.*Connection refused"):
        pull(f"docker://127.0.0.1:{port}/team/app:1", store)


def test_plain_http_only_on_loopback_or_when_named_insecure(fake, store) -> None:
    assert registry.scheme_for("127.0.0.1:5000") == registry.scheme_for("127.9.9.9") == "http"
    assert registry.scheme_for("localhost:5000") == registry.scheme_for("[::1]:5000") == "http"
    assert registry.scheme_for("registry.example:5000") == registry.scheme_for("10.0.0.1:5000") == "https"
    assert registry.scheme_for("[2001:db8::1]:5000") == registry.scheme_for("docker.io") == "https"
    # Named insecure: https (unverified) is tried first, plain http is then allowed.
    assert registry.scheme_for("registry.example:5000", ("registry.example:5000",)) == "https"
    assert registry.plain_http_allowed("registry.example:5000", ("registry.example:5000",))
    assert registry.plain_http_allowed("registry.example:5000", ("registry.example",))
    assert not registry.plain_http_allowed("registry.example:5000", ("registry.example:5001", "other.example"))
    assert registry.Client(reference.parse("docker://registry.example:5000/x"), ()).origin == \
        "https://registry.example:5000"
    assert registry.Client(reference.parse("docker://python"), ()).origin == "https://registry-1.docker.io"
    # Refused before any connection (the names do not resolve; nothing is looked up).
    image = Image([{"f": b"1"}])
    fake.add("team/downgrade", image, "1")
    fake.redirect = "http://registry.example"
    with pytest.raises(local.ImageError, match=r"redirected to http://registry.example: refused \(plain http is "
                                               r"used on loopback or for insecure registries only\)"):
        pull(f"docker://{fake.netloc}/team/downgrade:1", store)
    fake.redirect = None
    client = registry.Client(reference.parse(f"docker://{fake.netloc}/team/downgrade:1"))
    with pytest.raises(local.ImageError, match=r"refused the token service http://auth.example/token"):
        client.authenticate('Bearer realm="http://auth.example/token",service="x"')


def test_credentials_are_looked_up_in_order(tmp_path, monkeypatch) -> None:
    def write(path, auths) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"auths": auths}, f)
        return str(path)

    def basic(user, password) -> dict:
        return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}

    docker = write(tmp_path / "home" / ".docker" / "config.json",
                   {"https://index.docker.io/v1/": basic("hub", "1"), "reg.example:5000": basic("docker", "2")})
    assert registry.credentials("docker.io", "library/python") == (("hub", "1"), docker)
    assert registry.credentials("reg.example:5000", "team/app") == (("docker", "2"), docker)
    assert registry.credentials("reg.example", "team/app") == (None, None)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    podman = write(tmp_path / "run" / "containers" / "auth.json",
                   {"reg.example:5000": basic("podman", "3"), "reg.example:5000/team/app": basic("narrow", "4")})
    assert registry.credentials("reg.example:5000", "team/other") == (("podman", "3"), podman)
    assert registry.credentials("reg.example:5000", "team/app") == (("narrow", "4"), podman)
    explicit = write(tmp_path / "explicit.json", {"reg.example:5000": basic("explicit", "5")})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", explicit)
    assert registry.credentials("reg.example:5000", "team/app") == (("explicit", "5"), explicit)
    assert registry.credentials("docker.io", "library/python") == (("hub", "1"), docker)


def test_a_three_parameter_progress_callback_hears_of_layers_only(fake, store, tmp_path) -> None:
    image = Image([{"a": b"1"}, {"b": os.urandom(1 << 16)}])
    fake.add("team/progress", image, "1")
    layers_heard: list[tuple] = []
    pull(f"docker://{fake.netloc}/team/progress:1", store,
         progress=lambda what, done, total: layers_heard.append((what[:9], done, total)))
    assert layers_heard == [("layer 1/2", 0, 2), ("layer 2/2", 1, 2)]
    heard: list[tuple] = []

    def detailed(what, done, total, bytes_done=None, bytes_total=None) -> None:
        heard.append((what[:9], done, total, bytes_done, bytes_total))

    pull(f"docker://{fake.netloc}/team/progress:1", Store(str(tmp_path / "other")), progress=detailed)
    sizes = [len(b) for b in image.layers]
    assert heard[0] == ("layer 1/2", 0, 2, None, None) and heard[-1][1:] == (2, 2, None, None)
    assert ("layer 2/2", 1, 2, None, None) in heard
    assert heard[-2] == ("layer 2/2", 1, 2, sizes[1], sizes[1])
    assert ("layer 1/2", 0, 2, sizes[0], sizes[0]) in heard


def test_tests_run_inside_an_image_pulled_from_the_registry(pytester, run, open_registry, tmp_path, monkeypatch):
    """The whole path: a Python image pushed to the registry, pulled during the run by
    the marker's docker:// reference, and the test runs inside it."""
    import imagebuild

    if imagebuild.can_build():
        pytest.skip(imagebuild.can_build())
    layer = imagebuild.layer_of_directory(imagebuild.python_rootfs(str(tmp_path / "rootfs")))
    image = Image([{}])
    image.layers = [gzip.compress(layer, 1)]
    image.config = json.dumps({"architecture": ARCH, "os": "linux", "config": {"Env": ["PATH=/usr/bin:/bin"]},
                               "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    image.manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                 "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                            "digest": sha(image.config), "size": len(image.config)},
                                 "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                             "digest": sha(image.layers[0]), "size": len(image.layers[0])}]}).encode()
    image.blobs = [image.config, *image.layers]
    push(f"http://{open_registry}", "team/python", image, "run")
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", str(tmp_path / "cache"))
    pytester.makepyfile(test_inside=f"""
import os, sys, pytest

@pytest.mark.isolated(image="docker://{open_registry}/team/python:run")
def test_inside():
    assert "pytest-isolate test image" in open("/etc/os-release").read()
    assert os.path.realpath(sys.executable) == "/usr/bin/python{imagebuild.VERSION}"
    assert os.environ["PATH"] == "/usr/bin:/bin"
""")
    result = run("-v")
    result.assert_outcomes(passed=1)
    assert f"image docker://{open_registry}/team/python:run" in result.stdout.str()
