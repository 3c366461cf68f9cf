"""Unpacking layers (pytest_isolate/oci/unpack.py, store.add_layer): a corpus of
malicious layers, each refused with its reason and nothing written outside the layer;
and what real layers need (whiteouts, opaque directories, hardlinks, setuid, modes).

Layers are written here with tarfile (headers only: any name, type and link we want),
so these run the same as root and as an unprivileged user.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest

from pytest_isolate.oci import store as store_module, unpack
from pytest_isolate.oci.store import Store, StoreError, Verified


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0o644,
           pax: dict | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_600_000_000
    if pax:
        info.pax_headers = pax
    return info, data


def layer(*members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def sandbox(tmp_path):
    """(a store, a sentinel directory beside it that no layer may touch)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    return Store(str(tmp_path / "store")), outside


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): (p.lstat().st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(path.rglob("*"))}


def add(store: Store, data: bytes, compress: bool = False, **kwargs) -> str:
    blob = gzip.compress(data) if compress else data
    return store.add_layer(io.BytesIO(blob), diff_id(data), "layer 1/1 of oci:test", **kwargs)


MALICIOUS = {
    "traversal": ([member("../outside/victim", data=b"pwned")], "'../outside/victim' has a '..' component"),
    "deep traversal": ([member("a/../../outside/victim", data=b"pwned")], "has a '..' component"),
    "absolute name": ([member("/outside/victim", data=b"pwned")], "'/outside/victim' has an absolute name"),
    "write through a planted symlink": (
        [member("escape", tarfile.SYMTYPE, link="../../outside"), member("escape/victim", data=b"pwned")],
        "'escape/victim' goes through escape, which is not a directory in this layer"),
    "write through an absolute symlink": (
        [member("etc", tarfile.SYMTYPE, link="/"), member("etc/victim", data=b"pwned")],
        "goes through etc, which is not a directory"),
    "hardlink to a host file": ([member("passwd", tarfile.LNKTYPE, link="/etc/passwd")],
                                "'passwd' has an absolute name"),
    "hardlink out of the layer": ([member("victim", tarfile.LNKTYPE, link="../outside/victim")],
                                  "has a '..' component"),
    "hardlink through a symlink": (
        [member("out", tarfile.SYMTYPE, link="../outside"), member("victim", tarfile.LNKTYPE, link="out/victim")],
        "'victim' is a hardlink to 'out/victim', which is not a file of this layer"),
    "root becomes a symlink": ([member(".", tarfile.SYMTYPE, link="/outside")],
                               "'.' would change the root's type to symlink"),
    "root becomes a file": ([member("./", data=b"x")], "would change the root's type to file"),
    "whiteout of the parent": ([member("a/.wh..", data=b"")], "'a/.wh..' is not a valid whiteout"),
    "empty whiteout": ([member("a/.wh.", data=b"")], "'a/.wh.' is not a valid whiteout"),
    "file replaces a directory": ([member("d", tarfile.DIRTYPE, mode=0o755), member("d", data=b"x")],
                                  "'d' would replace a directory of this layer"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_a_malicious_layer_is_refused_with_its_reason_and_nothing_escapes(sandbox, case) -> None:
    store, outside = sandbox
    members, reason = MALICIOUS[case]
    before = snapshot(outside.parent)
    data = layer(*members)
    with pytest.raises(StoreError) as refused:
        add(store, data)
    assert "layer 1/1 of oci:test: refused: " in str(refused.value) and reason in str(refused.value)
    assert (outside / "victim").read_text() == "untouched"
    assert not store.has_layer(diff_id(data))
    # Nothing left anywhere: not in the store's tmp/, not beside it.
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    assert os.listdir(store.layers) == []
    after = {k: v for k, v in snapshot(outside.parent).items() if not k.startswith("store")}
    assert after == {k: v for k, v in before.items() if not k.startswith("store")}


def test_a_decompression_bomb_stops_at_the_cap(sandbox) -> None:
    store, _ = sandbox
    data = layer(member("zeros", data=bytes(8 << 20)))
    with pytest.raises(StoreError, match="unpacks to more than 1048576 bytes"):
        add(store, data, compress=True, max_bytes=1 << 20)
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_a_layer_that_is_not_its_diff_id_is_refused(sandbox) -> None:
    store, _ = sandbox
    data = layer(member("file", data=b"data"))
    with pytest.raises(StoreError, match=r"unpacks to sha256:[0-9a-f]{64}, not to its diff_id sha256:0{64}"):
        store.add_layer(io.BytesIO(data), "sha256:" + "0" * 64, "layer 1/1 of oci:test")
    assert os.listdir(store.layers) == []


@pytest.mark.parametrize("blob, size, message", [
    (b"x" * 10, 9, "is larger than its descriptor's 9 bytes"),
    (b"x" * 10, 11, "is truncated: 10 of 11 bytes"),
    (b"y" * 10, 10, "does not match its digest"),
])
def test_a_blob_that_is_not_its_digest_or_size_is_refused(blob, size, message) -> None:
    verified = Verified(io.BytesIO(blob), "sha256:" + hashlib.sha256(b"x" * 10).hexdigest(), size, "the blob")
    with pytest.raises(StoreError, match=message):
        verified.check()


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32, "", None])
def test_a_digest_is_validated_before_it_becomes_a_path(sandbox, digest) -> None:
    store, _ = sandbox
    with pytest.raises(StoreError, match="is not a sha256 digest"):
        store.blob_path(digest)
    with pytest.raises(StoreError, match="is not a sha256 digest"):
        store.layer_path(digest)


def test_an_oversized_manifest_is_refused(sandbox) -> None:
    store, _ = sandbox
    data = b"{" + b" " * (store_module.MAX_MANIFEST + 10) + b"}"
    with pytest.raises(StoreError, match=f"is {len(data)} bytes; the most accepted is {store_module.MAX_MANIFEST}"):
        store.put_blob(io.BytesIO(data), diff_id(data), len(data), "the manifest of oci:test")
    with pytest.raises(StoreError, match="is larger than"):
        store.put_blob(io.BytesIO(data), diff_id(data), None, "the manifest of oci:test")


def test_what_real_layers_need(sandbox) -> None:
    store, _ = sandbox
    data = layer(
        member("./", tarfile.DIRTYPE, mode=0o755),
        member("./usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755),  # setuid kept (inert in containers)
        member("./usr/bin/same", tarfile.LNKTYPE, link="./usr/bin/tool"),
        member("./bin", tarfile.SYMTYPE, link="usr/bin"),
        member("./lib", tarfile.SYMTYPE, link="/usr/lib"),  # absolute symlinks are fine: never followed here
        member("./etc/.wh.removed", data=b""),
        member("./var/cache/.wh.before", data=b""),  # redundant in an opaque directory: dropped
        member("./var/cache/.wh..wh..opq", data=b""),
        member("./var/cache/.wh.after", data=b""),
        member("./var/cache/kept", data=b"new"),
        member("./ro", tarfile.DIRTYPE, mode=0o555),  # read-only, and yet its child is written
        member("./ro/child", data=b"c"),
        member("./cap", data=b"x", pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}),
        member("./replaced", data=b"first"),
        member("./replaced", data=b"second"),
    )
    root = add(store, data, compress=True)
    tool = os.lstat(f"{root}/usr/bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert os.lstat(f"{root}/usr/bin/same").st_ino == tool.st_ino
    assert os.readlink(f"{root}/bin") == "usr/bin" and os.readlink(f"{root}/lib") == "/usr/lib"
    whiteout = os.lstat(f"{root}/etc/removed")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(f"{root}/var/cache", "user.overlay.opaque") == b"y"
    assert os.listdir(f"{root}/var/cache") == ["kept"]
    assert stat.S_IMODE(os.lstat(f"{root}/ro").st_mode) == 0o555 and open(f"{root}/ro/child").read() == "c"
    assert "security.capability" not in os.listxattr(f"{root}/cap")
    assert open(f"{root}/replaced").read() == "second"
    assert os.lstat(f"{root}/usr/bin/tool").st_mtime == 1_600_000_000
    # The same layer again is not unpacked again; prune removes it once no image uses it.
    assert add(store, data) == root
    assert store.prune()[0] == 1 and not os.path.exists(root)


def test_a_layer_without_end_blocks_is_read_as_umoci_writes_it(sandbox) -> None:
    store, _ = sandbox
    data = layer(member("file", data=b"data"))[:-1024]  # no end-of-archive blocks
    root = add(store, data)
    assert open(f"{root}/file").read() == "data"


def test_a_device_node_is_made_or_refused_naming_it(sandbox) -> None:
    store, _ = sandbox
    info, _ = member("dev/sda", tarfile.BLKTYPE)
    info.devmajor, info.devminor = 8, 0
    data = layer((info, b""))
    try:
        root = add(store, data)
    except StoreError as exc:
        assert os.geteuid() != 0
        assert "'dev/sda' is a block device, which cannot be made here (device nodes need root)" in str(exc)
    else:
        assert os.geteuid() == 0 and stat.S_ISBLK(os.lstat(f"{root}/dev/sda").st_mode)


def test_an_abandoned_pull_is_pruned_but_not_a_live_one(sandbox) -> None:
    store, _ = sandbox
    abandoned = os.path.join(store.root, "tmp", "layer-abandoned")
    os.makedirs(abandoned + "/root/ro")
    os.chmod(abandoned + "/root/ro", 0o500)
    with store.temporary("layer") as live:
        removed, _ = store.prune()
        assert removed == 1 and not os.path.exists(abandoned) and os.path.isdir(live)
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_unpack_refuses_what_is_no_tar(tmp_path) -> None:
    with pytest.raises(unpack.LayerError, match="not a tar archive"):
        unpack.unpack_layer(io.BytesIO(b"not a tar at all" * 100), str(tmp_path))


def test_a_parent_no_member_names_belongs_to_the_image_root(tmp_path) -> None:
    """Layers often hold ``srv/file`` without a ``srv/`` entry: the directory made for
    it is the image root's (mapped like any uid 0), 0755, and a later entry for it wins."""
    members = [member("srv/file", data=b"x"), member("opt/deep/file", data=b"y"),
               member("opt", tarfile.DIRTYPE, mode=0o700)]
    for info, _ in members:  # every named member belongs to someone else than root
        info.uid = info.gid = 1000
    data = layer(*members)
    mapped = []

    def owner(uid: int, gid: int) -> tuple[int, int] | None:
        mapped.append((uid, gid))
        return (os.getuid(), os.getgid()) if (uid, gid) == (0, 0) else None

    root = tmp_path / "root"
    root.mkdir()
    unpack.unpack_layer(io.BytesIO(data), str(root), owner)
    assert stat.S_IMODE((root / "srv").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "opt" / "deep").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "opt").stat().st_mode) == 0o700  # named by a later member
    # The two implicit directories, and only they, went through the mapping as root.
    assert sorted(mapped) == [(0, 0), (0, 0), (1000, 1000), (1000, 1000), (1000, 1000)]


def test_the_subordinate_range_helpers_answer_is_checked_never_unpickled(tmp_path) -> None:
    """The helper child unpacks untrusted layers: what it sends back is small JSON of
    a fixed shape (a result, or an exception by its class's name and words); anything
    else, a pickle above all, is refused without being run."""
    from pytest_isolate.oci import in_namespace, store as store_module

    function = store_module.measure_and_remove
    assert in_namespace.answer(b'{"result": 4096}', function) == 4096
    assert in_namespace.answer(b'{"result": null}', function) is None
    with pytest.raises(StoreError, match="^a layer: refused: bad$"):
        in_namespace.answer(b'{"error": "StoreError", "words": "a layer: refused: bad", "errno": null, '
                            b'"filename": null}', function)
    with pytest.raises(PermissionError) as raised:
        in_namespace.answer(b'{"error": "PermissionError", "words": "Permission denied", "errno": 13, '
                            b'"filename": "/x"}', function)
    assert (raised.value.errno, raised.value.filename) == (13, "/x")
    with pytest.raises(OSError, match="KeyboardInterrupt: stop"):
        in_namespace.answer(b'{"error": "KeyboardInterrupt", "words": "stop", "errno": null, "filename": null}',
                            function)
    witness = tmp_path / "ran"
    hostile = b"cos\nsystem\n(S'touch " + str(witness).encode() + b"'\ntR."
    for data in (hostile, b'{"result": true}', b'{"result": "x"}', b'{"result": 1, "more": 2}',
                 b'{"error": "StoreError", "words": 5, "errno": null, "filename": null}', b"[1]"):
        with pytest.raises(OSError, match="sent a broken answer"):
            in_namespace.answer(data, function)
    assert not witness.exists()
