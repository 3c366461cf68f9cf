"""Local image transports into the store: OCI layouts (``oci:``) and ``docker save``
archives (``docker-archive:``), written here in Python and, where installed, by umoci
and skopeo; ``python -m pytest_isolate pull | images | prune``."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from pytest_isolate.oci import local, reference
from pytest_isolate.oci.store import Store, for_this_user

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout written by hand: blobs, manifests, an index."""

    def __init__(self, path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict] = []

    def blob(self, data: bytes) -> dict:
        (self.path / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    def image(self, layers: list[dict[str, bytes]], env=("PATH=/bin",), diff_ids=None) -> dict:
        tars = [tar_of(files) for files in layers]
        config = json.dumps({"architecture": ARCH, "os": "linux", "config": {"Env": list(env)},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in tars]}}).encode()
        manifest = {"schemaVersion": 2, "config": dict(self.blob(config), mediaType="application/vnd.oci.image.config.v1+json"),
                    "layers": [dict(self.blob(gzip.compress(t)), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
                               for t in tars]}
        return dict(self.blob(json.dumps(manifest).encode()), mediaType="application/vnd.oci.image.manifest.v1+json")

    def tag(self, descriptor: dict, tag: str) -> None:
        self.entries.append(dict(descriptor, annotations={"org.opencontainers.image.ref.name": tag}))
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.entries}))


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "layout")


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


def pull(text: str, store: Store) -> dict:
    return local.import_image(reference.parse(text), store)


def test_an_oci_layout_by_tag(layout, store) -> None:
    layout.tag(layout.image([{"etc/os-release": b"base\n"}, {"app/main": b"v1"}]), "v1")
    layout.tag(layout.image([{"etc/os-release": b"base\n"}, {"app/main": b"v2"}]), "v2")
    record = pull(f"oci:{layout.path}:v2", store)
    assert record["env"] == ["PATH=/bin"] and len(record["layers"]) == 2
    top = store.layer_path(record["layers"][1])
    assert open(f"{top}/app/main").read() == "v2"
    assert store.image(f"oci:{layout.path}:v2") == record
    first = pull(f"oci:{layout.path}:v1", store)
    assert first["layers"][0] == record["layers"][0]  # the shared base layer is unpacked once
    assert len(os.listdir(store.layers)) == 3
    with pytest.raises(local.ImageError, match=r"has no image tagged 'v3'; tags: v1, v2"):
        pull(f"oci:{layout.path}:v3", store)
    with pytest.raises(local.ImageError, match=r"holds 2 images: name one with oci:PATH:TAG; tags: v1, v2"):
        pull(f"oci:{layout.path}", store)


def test_a_multi_platform_index_picks_this_machine(layout, store) -> None:
    ours = layout.image([{"which": ARCH.encode()}])
    other = layout.image([{"which": b"other"}])
    attestation = layout.image([{"which": b"attestation"}])
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        dict(attestation, platform={"os": "unknown", "architecture": "unknown"}),
        dict(other, platform={"os": "linux", "architecture": "s390x"}),
        dict(ours, platform={"os": "linux", "architecture": ARCH}),
    ]}
    layout.tag(dict(layout.blob(json.dumps(index).encode()), mediaType="application/vnd.oci.image.index.v1+json"),
               "multi")
    record = pull(f"oci:{layout.path}:multi", store)
    assert open(store.layer_path(record["layers"][0]) + "/which").read() == ARCH
    index["manifests"] = index["manifests"][:2]
    layout.tag(dict(layout.blob(json.dumps(index).encode()), mediaType="application/vnd.oci.image.index.v1+json"),
               "foreign")
    with pytest.raises(local.ImageError, match=rf"has no image for this machine \(linux/{ARCH}\); on offer: linux/s390x"):
        pull(f"oci:{layout.path}:foreign", store)


def test_a_corrupt_layer_blob_or_a_wrong_diff_id_stores_nothing(layout, store) -> None:
    descriptor = layout.image([{"file": b"good"}])
    layout.tag(descriptor, "corrupt")
    manifest = json.loads((layout.path / "blobs" / "sha256" / descriptor["digest"][7:]).read_bytes())
    blob = layout.path / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    data = bytearray(gzip.decompress(blob.read_bytes()))
    data[600] ^= 1  # a byte of the file's content: still a tar, another digest
    blob.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(local.ImageError, match="unpacks to .*, not to its diff_id|does not match its digest|larger than its descriptor"):
        pull(f"oci:{layout.path}:corrupt", store)
    layout.tag(layout.image([{"file": b"x"}], diff_ids=["sha256:" + "1" * 64]), "lying")
    with pytest.raises(local.ImageError, match="not to its diff_id sha256:1111"):
        pull(f"oci:{layout.path}:lying", store)
    assert os.listdir(store.layers) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == [] and store.images() == []


def test_a_docker_archive_by_name(tmp_path, store) -> None:
    base, app = tar_of({"etc/os-release": b"base\n"}), tar_of({"app": b"1"})
    config = json.dumps({"architecture": ARCH, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(base), sha(app)]}}).encode()
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in {"abc/layer.tar": base, "def/layer.tar": app, "cfg.json": config,
                           "manifest.json": json.dumps([{"Config": "cfg.json", "RepoTags": ["team/app:1"],
                                                         "Layers": ["abc/layer.tar", "def/layer.tar"]}]).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    record = pull(f"docker-archive:{archive}:team/app:1", store)
    assert record["layers"] == [sha(base), sha(app)]
    assert pull(f"docker-archive:{archive}", store)["layers"] == record["layers"]
    with pytest.raises(local.ImageError, match="has no image team/app:2; tags: team/app:1"):
        pull(f"docker-archive:{archive}:team/app:2", store)


def cli(*args: str, cache) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_isolate", *args, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=300)


def test_pull_images_and_prune_from_the_shell(layout, tmp_path) -> None:
    cache = tmp_path / "cache"
    layout.tag(layout.image([{"a": b"1"}, {"b": b"2"}]), "latest")
    pulled = cli("pull", f"oci:{layout.path}:latest", cache=cache)
    assert pulled.returncode == 0 and f"oci:{layout.path}:latest: 2 layers" in pulled.stdout, pulled.stderr
    listed = cli("images", cache=cache)
    assert f"oci:{layout.path}:latest" in listed.stdout and "2 layers" in listed.stdout
    missing = cli("pull", f"oci:{layout.path}:nope", cache=cache)
    assert missing.returncode == 1 and "has no image tagged 'nope'; tags: latest" in missing.stderr
    bad = cli("pull", "debian:12", cache=cache)
    assert bad.returncode == 2 and "did you mean 'docker://debian:12'?" in bad.stderr
    assert "removed 0 unused entries" in cli("prune", cache=cache).stdout
    Store(str(cache)).forget(f"oci:{layout.path}:latest")
    assert "removed 4 unused entries" in cli("prune", cache=cache).stdout  # 2 layers, manifest, config
    assert os.listdir(for_this_user(str(cache)).layers) == []


def test_concurrent_pulls_share_one_store(layout, tmp_path) -> None:
    cache = tmp_path / "cache"
    layout.tag(layout.image([{f"f{i}": os.urandom(1 << 16) for i in range(50)}, {"top": b"t"}]), "big")
    pulls = [subprocess.Popen([sys.executable, "-m", "pytest_isolate", "pull", "-q", f"oci:{layout.path}:big",
                               "--cache", str(cache)], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    assert [p.wait(300) for p in pulls] == [0] * 4, [p.stderr.read() for p in pulls]
    assert len(os.listdir(for_this_user(str(cache)).layers)) == 2 and os.listdir(cache / "tmp") == []


@pytest.mark.needs_root
@pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo") and os.path.exists("/usr/bin/busybox")),
                    reason="needs umoci, skopeo and busybox (.ci/run installs them)")
def test_images_made_by_umoci_and_skopeo(tmp_path, store) -> None:
    """A busybox image with a whiteout in its second layer, as umoci writes it (layers
    without end-of-archive blocks), and the same image as skopeo's docker-archive."""
    def run(*command: str) -> None:
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, timeout=300)

    run("umoci", "init", "--layout", "lay")
    run("umoci", "new", "--image", "lay:bb")
    run("umoci", "unpack", "--image", "lay:bb", "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy("/usr/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "motd").write_text("gone in layer 2\n")
    run("umoci", "repack", "--image", "lay:bb", "bundle")
    shutil.rmtree(tmp_path / "bundle")
    run("umoci", "unpack", "--image", "lay:bb", "bundle")
    (tmp_path / "bundle" / "rootfs" / "etc" / "motd").unlink()
    run("umoci", "repack", "--image", "lay:bb", "bundle")
    run("skopeo", "copy", "-q", "oci:lay:bb", "docker-archive:bb.tar:team/bb:1")
    from_oci = pull(f"oci:{tmp_path}/lay:bb", store)
    from_archive = pull(f"docker-archive:{tmp_path}/bb.tar:team/bb:1", store)
    assert from_oci["layers"] == from_archive["layers"] and len(from_oci["layers"]) == 2
    bottom, top = (store.layer_path(d) for d in from_oci["layers"])
    assert os.access(f"{bottom}/bin/busybox", os.X_OK) and os.readlink(f"{bottom}/bin/sh") == "busybox"
    assert os.stat(f"{top}/etc/motd", follow_symlinks=False).st_rdev == 0  # the whiteout


@pytest.mark.parametrize("text, normalised", [
    ("host", "host"),
    ("docker://python", "docker://docker.io/library/python:latest"),
    ("docker://python:3.12-slim", "docker://docker.io/library/python:3.12-slim"),
    ("docker://team/base", "docker://docker.io/team/base:latest"),
    ("docker://localhost:5000/team/base:1.4@sha256:" + "a" * 64,
     "docker://localhost:5000/team/base:1.4@sha256:" + "a" * 64),
    ("docker://ghcr.io/a/b@sha256:" + "b" * 64, "docker://ghcr.io/a/b@sha256:" + "b" * 64),  # no tag: the digest
    ("oci:images/debian:bookworm", "oci:/base/images/debian:bookworm"),
    ("oci:/srv/layout", "oci:/srv/layout"),
    ("docker-archive:saved.tar", "docker-archive:/base/saved.tar"),
    ("docker-archive:saved.tar:team/app:1", "docker-archive:/base/saved.tar:team/app:1"),
    ("dir:../rootfs", "dir:/rootfs"),
])
def test_references_in_skopeos_syntax(text, normalised) -> None:
    assert str(reference.parse(text, "/base")) == normalised
    assert str(reference.parse(normalised, "/elsewhere")) == normalised  # normalised parses to itself


@pytest.mark.parametrize("text, message", [
    ("debian:12", "unknown transport in 'debian:12' (did you mean 'docker://debian:12'?)"),
    ("docker:python", "a registry image is written docker://NAME (two slashes)"),
    ("docker://Python", "is not a repository name"),
    ("docker://a@sha256:zz", "'sha256:zz' is not a digest"),
    ("docker://a:b c", "is not a tag"),
    ("oci:", "'oci:' names no path"),
    ("dir:/x:y", "dir: takes a path only"),
    ("", "not an image reference"),
    (" host", "not an image reference"),
])
def test_bad_references_say_what_is_accepted(text, message) -> None:
    with pytest.raises(reference.ReferenceError, match=re.escape(message)):
        reference.parse(text, "/base")
