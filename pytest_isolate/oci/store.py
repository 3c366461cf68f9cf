"""The content-addressed image store.

    $PYTEST_ISOLATE_CACHE, else $XDG_CACHE_HOME/pytest-isolate, else ~/.cache/pytest-isolate
      blobs/sha256/<hex>        manifests and configs, verified, read-only
      layers/<owner>/sha256/<hex>/  each layer unpacked (by diff_id), shared by every image with it;
                                <owner>: root-<uid> (as root), sub-<start>-<count> (rootless with a
                                subordinate range), user (rootless, every file the user's)
      images/<key>.json         what a reference resolved to: its manifest, config, layers
      tmp/                      what is being written; renamed into place once verified
      locks/                    flock()s: xdist workers and concurrent runs share the store

Nothing becomes visible under its final name before it is complete and verified, so an
interrupted pull leaves only ``tmp/`` entries, which a later run removes (``prune`` and
every pull) once no live process holds their lock. A digest is validated before it
becomes a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import BinaryIO, Iterator

from . import in_namespace, unpack
from .compression import decompressed

DIGEST = re.compile(r"^(sha256):([0-9a-f]{64})$")
MAX_MANIFEST = 4 << 20  # as containers/image: manifests and configs are small


class StoreError(Exception):
    """A blob or layer that cannot be stored; the message says which and why."""


def default_root() -> str:
    explicit = os.environ.get("PYTEST_ISOLATE_CACHE")
    if explicit:
        return os.path.abspath(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pytest-isolate")


def hex_of(digest: str, what: str = "a digest") -> str:
    """The hex part of a sha256 digest, validated (it becomes a path)."""
    match = DIGEST.match(digest) if isinstance(digest, str) else None
    if not match:
        raise StoreError(f"{what} is not a sha256 digest: {str(digest)[:100]!r}")
    return match.group(2)


class Verified:
    """A stream read through its digest and size: ``check()`` after the last byte."""

    def __init__(self, stream: BinaryIO, digest: str, size: int | None, what: str) -> None:
        self.stream, self.digest, self.size, self.what = stream, digest, size, what
        hex_of(digest, what)
        self.hash = hashlib.sha256()
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n is not None and n >= 0 else 1 << 20)
        self.read_bytes += len(data)
        if self.size is not None and self.read_bytes > self.size:
            raise StoreError(f"{self.what} is larger than its descriptor's {self.size} bytes")
        self.hash.update(data)
        return data

    def check(self) -> None:
        while self.read(1 << 20):
            pass
        if self.size is not None and self.read_bytes != self.size:
            raise StoreError(f"{self.what} is truncated: {self.read_bytes} of {self.size} bytes")
        if "sha256:" + self.hash.hexdigest() != self.digest:
            raise StoreError(f"{self.what} does not match its digest {self.digest} "
                             f"(got sha256:{self.hash.hexdigest()})")


class Store:
    """``owner`` maps an image's (uid, gid) to the owner a layer's files get (None:
    the unpacker's own); layers unpacked for different owners live apart
    (``layers/<owner_key>/``), so root's and a user's runs may share a store. With
    ``namespace`` (rootless, a subordinate range) layers are unpacked and removed in
    a child inside it: their files belong to ids the user itself cannot manage."""

    def __init__(self, root: str | None = None, owner: unpack.Owner | None = None, owner_key: str = "user",
                 namespace: in_namespace.Namespace | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.owner = owner
        self.namespace = namespace
        self.layers = os.path.join(self.root, "layers", owner_key, "sha256")
        for sub in ("blobs/sha256", "images", "tmp", "locks"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.makedirs(self.layers, exist_ok=True)
        self.owner_key = owner_key

    # -- locks and atomic writes ----------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "locks", name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def temporary(self, kind: str) -> Iterator[str]:
        """A fresh tmp/ directory, held (locked) while in use, removed afterwards."""
        path = tempfile.mkdtemp(prefix=f"{kind}-", dir=os.path.join(self.root, "tmp"))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer's: prune leaves it alone
        try:
            yield path
        finally:
            self._remove(path)
            os.close(fd)

    def _remove(self, path: str, image_owned: bool = False) -> int:
        """remove_tree, inside the namespace for what may hold the range's files (a
        layer, or what a failed unpack left); the bytes freed."""
        if self.namespace is not None and image_owned:
            return self.namespace.call(measure_and_remove, path)
        try:
            return measure_and_remove(path)
        except PermissionError:
            if self.namespace is None:
                raise
            return self.namespace.call(measure_and_remove, path)

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", hex_of(digest))

    def read_blob(self, digest: str, cap: int = MAX_MANIFEST) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            return f.read(cap + 1)[:cap]

    def put_blob(self, stream: BinaryIO, digest: str, size: int | None, what: str, cap: int = MAX_MANIFEST) -> bytes:
        """A small blob (manifest, config), verified, stored read-only; its bytes."""
        if size is not None and size > cap:
            raise StoreError(f"{what} is {size} bytes; the most accepted is {cap}")
        verified = Verified(stream, digest, size, what)
        data = verified.read(cap + 1)
        if len(data) > cap:
            raise StoreError(f"{what} is larger than {cap} bytes")
        verified.check()
        path = self.blob_path(digest)
        if not os.path.exists(path):
            with self.temporary("blob") as tmp:
                part = os.path.join(tmp, "blob")
                with open(part, "wb") as f:
                    f.write(data)
                os.chmod(part, 0o444)
                os.replace(part, path)
        return data

    # -- layers -----------------------------------------------------------------------------

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers, hex_of(diff_id, "a layer's diff_id"))

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isdir(self.layer_path(diff_id))

    def add_layer(self, stream: BinaryIO, diff_id: str, what: str,
                  max_bytes: int = unpack.DEFAULT_MAX_BYTES) -> str:
        """Unpack a (compressed) layer stream unless its diff_id is stored; its path.
        The caller checks the blob's own digest after this returned (Verified.check)."""
        target = self.layer_path(diff_id)
        with self.lock(f"layer-{self.owner_key}-{hex_of(diff_id)}"):
            if os.path.isdir(target):
                return target
            with self.temporary("layer") as tmp:
                args = (os.path.join(tmp, "root"), target, diff_id, what, self.owner, max_bytes)
                if self.namespace is None:
                    _unpack_into(stream, *args)
                else:
                    self.namespace.call_fed(stream, _unpack_into, *args)
        return target

    # -- images -----------------------------------------------------------------------------

    def image_path(self, reference: str) -> str:
        return os.path.join(self.root, "images", hashlib.sha256(reference.encode()).hexdigest()[:32] + ".json")

    def save_image(self, record: dict) -> None:
        path = self.image_path(record["reference"])
        with self.temporary("image") as tmp:
            part = os.path.join(tmp, "image.json")
            with open(part, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(part, path)

    def image(self, reference: str) -> dict | None:
        try:
            with open(self.image_path(reference)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("reference") != reference:
            return None
        if not all(self.has_layer(d) for d in record.get("layers", [])):
            return None  # a layer was pruned or lost: pull again
        return record

    def images(self) -> list[dict]:
        records = []
        for name in sorted(os.listdir(os.path.join(self.root, "images"))):
            try:
                with open(os.path.join(self.root, "images", name)) as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue
        return [r for r in records if isinstance(r, dict) and "reference" in r]

    def forget(self, reference: str) -> bool:
        try:
            os.unlink(self.image_path(reference))
            return True
        except FileNotFoundError:
            return False

    def prune(self) -> tuple[int, int]:
        """Remove layers and blobs no image uses, and abandoned tmp/ entries: (count, bytes)."""
        used_layers, used_blobs = set(), set()
        for record in self.images():
            used_layers.update(hex_of(d) for d in record.get("layers", []) if DIGEST.match(str(d)))
            used_blobs.update(hex_of(d) for d in (record.get("manifest"), record.get("config")) if DIGEST.match(str(d)))
        removed = freed = 0
        folders = [(os.path.join(self.root, "blobs", "sha256"), used_blobs, "blob-")]
        layers = os.path.join(self.root, "layers")
        folders += [(os.path.join(layers, key, "sha256"), used_layers, f"layer-{key}-") for key in os.listdir(layers)]
        for folder, used, lock in folders:
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if name in used:
                    continue
                path = os.path.join(folder, name)
                with self.lock(lock + name):
                    try:
                        freed += self._remove(path, image_owned=lock.startswith("layer-"))
                    except PermissionError:  # another owner's layers (root's, or another range's)
                        continue
                    removed += 1
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live pull's
                os.close(fd)
                continue
            try:
                freed += self._remove(path)
                removed += 1
            finally:
                os.close(fd)
        return removed, freed

    def layer_sizes(self) -> dict[str, int]:
        return {"sha256:" + name: tree_size(os.path.join(self.layers, name)) for name in os.listdir(self.layers)}


def tree_size(path: str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size if os.path.lexists(path) else 0
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _unpack_into(stream: BinaryIO, root: str, target: str, diff_id: str, what: str,
                 owner: unpack.Owner | None, max_bytes: int) -> None:
    """Unpack a layer stream into ``root``, check its diff_id, rename it to ``target``."""
    os.mkdir(root, 0o755)
    try:
        with decompressed(stream) as tar:
            got, _ = unpack.unpack_layer(tar, root, owner, max_bytes)
    except unpack.LayerError as exc:
        raise StoreError(f"{what}: refused: {exc}") from None
    except (OSError, EOFError, ValueError) as exc:  # gzip/zstd: corrupt data
        raise StoreError(f"{what}: cannot be read: {exc}") from None
    if got != diff_id:
        raise StoreError(f"{what} unpacks to {got}, not to its diff_id {diff_id}")
    os.rename(root, target)


def measure_and_remove(path: str) -> int:
    size = tree_size(path)
    remove_tree(path)
    return size


def remove_tree(path: str) -> None:
    """rm -rf, also through directories an image made read-only."""
    def make_writable(function, failed, _):
        parent = os.path.dirname(failed)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
        except OSError:
            pass
        function(failed)

    if os.path.isdir(path) and not os.path.islink(path):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for folder, dirs, _ in os.walk(path):
            for name in dirs:
                full = os.path.join(folder, name)
                if not os.path.islink(full):
                    with contextlib.suppress(OSError):
                        os.chmod(full, 0o700)
        shutil.rmtree(path, onerror=make_writable)
    elif os.path.lexists(path):
        os.unlink(path)


def for_this_user(root: str | None = None) -> Store:
    """The store as this user's runs use it. As root, an image's uids and gids land in
    the containers' unprivileged range (user_ns.root_mapping). Rootless with a
    subordinate range (subids.rootless_mapping) they are kept as the containers see
    them; without one every file is the user's, which is container root's."""
    from ..runtime import subids, user_ns

    if os.geteuid() != 0:
        mapping = subids.rootless_mapping()
        if not mapping.ranged:
            return Store(root)
        return Store(root, mapping.image_owner(), mapping.owner_key, in_namespace.Namespace(mapping))

    (uid_base, uid_count), (gid_base, gid_count) = user_ns.root_mapping()

    def owner(uid: int, gid: int) -> tuple[int, int]:
        return (uid_base + (uid if 0 <= uid < uid_count else 0), gid_base + (gid if 0 <= gid < gid_count else 0))

    return Store(root, owner, f"root-{uid_base}")
