"""Local transports: an OCI image layout directory (``oci:``) and ``docker save``
output (``docker-archive:``), read into the store.

Both end the same way (``_finish``): a manifest chosen for this machine's platform,
its config, and each layer unpacked by its diff_id, every blob checked against its
digest and size while it streams.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import tarfile
import time
from typing import Callable

from .reference import Reference
from .store import MAX_MANIFEST, Store, StoreError, Verified, hex_of

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386",
           "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
# progress(what, done, total): layer ``done`` of ``total`` starts. A callback with a
# ``bytes_done`` keyword (images_cli's) is also told, a few times a second, how much of
# the layer streamed (bytes_done=, bytes_total=: None when unknown), and once at the end
# (done == total); one with three parameters only hears of layers, as it always did.
Progress = Callable[..., None]


class ImageError(Exception):
    """An image that cannot be used; the message names it and what to check."""


def machine_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _ARCHES.get(machine, machine)


def _json(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _descriptor(value, what: str) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str):
        raise ImageError(f"{what} is not a descriptor")
    hex_of(value["digest"], what)
    size = value.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ImageError(f"{what} has a bad size")
    return value


def choose_platform(index: dict, what: str) -> dict:
    """The manifest of ``index`` for this machine (attestations, unknown/unknown, skipped)."""
    wanted = machine_platform()
    offered = []
    for entry in index.get("manifests") or []:
        entry = _descriptor(entry, f"an entry of {what}")
        plat = entry.get("platform") or {}
        pair = (plat.get("os"), plat.get("architecture"))
        if pair == ("unknown", "unknown"):
            continue
        if pair == wanted:
            return entry
        offered.append("/".join(str(p) for p in pair if p) + (f"/{plat['variant']}" if plat.get("variant") else ""))
    raise ImageError(f"{what} has no image for this machine ({'/'.join(wanted)}); on offer: "
                     f"{', '.join(offered) or 'none'}")


def _finish(reference: Reference, store: Store, manifest_bytes: bytes | None, manifest_digest: str | None,
            config_bytes: bytes, config_digest: str, layers: list, open_layer: Callable[[int], object],
            progress: Progress | None) -> dict:
    """Unpack the layers (``open_layer(i)``: a stream of layer i) and record the image."""
    config = _json(config_bytes, f"the config of {reference}")
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise ImageError(f"the config of {reference} lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} "
                         f"layers (rootfs.diff_ids), its manifest {len(layers)}")
    for diff_id in diff_ids:
        hex_of(diff_id, f"a diff_id in the config of {reference}")
    detailed = progress is not None and _takes_bytes(progress)
    for i, diff_id in enumerate(diff_ids):
        what = f"layer {i + 1}/{len(diff_ids)} of {reference} ({layers[i].get('digest') or diff_id})"
        if progress:
            progress(what, i, len(diff_ids))
        if store.has_layer(diff_id):
            continue
        with open_layer(i) as stream:
            size = layers[i].get("size")
            counted = _Counted(stream, lambda n: progress(what, i, len(diff_ids), bytes_done=n, bytes_total=size))
            try:
                store.add_layer(counted if detailed else stream, diff_id, what)
            except StoreError:
                # A blob that is not what its digest says breaks gzip or tar first; the
                # digest (or truncation) is the cause worth naming.
                if isinstance(stream, Verified):
                    stream.check()
                raise
            if isinstance(stream, Verified):
                stream.check()
            if detailed:  # the whole blob, its trailer too
                progress(what, i, len(diff_ids), bytes_done=getattr(stream, "read_bytes", counted.done),
                         bytes_total=size)
    if detailed:
        progress(f"{len(diff_ids)} layers of {reference}", len(diff_ids), len(diff_ids))
    image_config = config.get("config") or {}
    record = {
        "reference": str(reference),
        "manifest": manifest_digest,
        "config": config_digest,
        "layers": diff_ids,
        "os": config.get("os"), "architecture": config.get("architecture"),
        "env": [e for e in image_config.get("Env") or [] if isinstance(e, str)],
        "cmd": [c for c in image_config.get("Cmd") or [] if isinstance(c, str)],
        "workdir": image_config.get("WorkingDir") if isinstance(image_config.get("WorkingDir"), str) else "",
        "user": image_config.get("User") if isinstance(image_config.get("User"), str) else "",
    }
    if manifest_bytes is not None and manifest_digest is not None:
        store.put_blob(_Bytes(manifest_bytes), manifest_digest, len(manifest_bytes), f"the manifest of {reference}")
    store.put_blob(_Bytes(config_bytes), config_digest, len(config_bytes), f"the config of {reference}")
    store.save_image(record)
    return record


def _takes_bytes(progress: Progress) -> bool:
    try:
        parameters = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "bytes_done" or p.kind is p.VAR_KEYWORD for p in parameters)


class _Counted:
    """A stream that reports how much of it was read, at most ten times a second."""

    def __init__(self, stream, report: Callable[[int], None]) -> None:
        self.stream, self.report, self.done, self.last = stream, report, 0, 0.0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.done += len(data)
        now = time.monotonic()
        if now - self.last >= 0.1 or not data:
            self.last = now
            self.report(self.done)
        return data


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.offset + n
        chunk, self.offset = self.data[self.offset:end], min(end, len(self.data))
        return chunk


# -- oci: ---------------------------------------------------------------------------------------

def _layout_blob(layout: str, descriptor: dict, what: str, cap: int = MAX_MANIFEST) -> bytes:
    path = os.path.join(layout, "blobs", "sha256", hex_of(descriptor["digest"], what))
    try:
        with open(path, "rb") as f:
            verified = Verified(f, descriptor["digest"], descriptor.get("size"), what)
            data = verified.read(cap + 1)
            if len(data) > cap:
                raise ImageError(f"{what} is larger than {cap} bytes")
            verified.check()
    except FileNotFoundError:
        raise ImageError(f"{what} is missing from the layout ({path})") from None
    except StoreError as exc:
        raise ImageError(str(exc)) from None
    return data


def _matches(entry: dict, tag: str) -> bool:
    annotations = entry.get("annotations") or {}
    names = [annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME)]
    return any(isinstance(n, str) and (n == tag or n.endswith(":" + tag)) for n in names)


def import_oci(reference: Reference, store: Store, progress: Progress | None = None) -> dict:
    layout = reference.path
    if not os.path.isfile(os.path.join(layout, "oci-layout")):
        raise ImageError(f"{reference}: {layout} is not an OCI image layout (no oci-layout file)")
    try:
        with open(os.path.join(layout, "index.json"), "rb") as f:
            index = _json(f.read(MAX_MANIFEST + 1)[:MAX_MANIFEST], f"{layout}/index.json")
    except OSError as exc:
        raise ImageError(f"{reference}: cannot read {layout}/index.json ({exc.strerror})") from None
    entries = [_descriptor(e, f"an entry of {layout}/index.json") for e in index.get("manifests") or []]
    tags = sorted({str((e.get("annotations") or {}).get(REF_NAME)) for e in entries
                   if (e.get("annotations") or {}).get(REF_NAME)})
    chosen = [e for e in entries if _matches(e, reference.tag)] if reference.tag else entries
    if len(chosen) != 1:
        why = f"has no image tagged {reference.tag!r}" if reference.tag and not chosen else \
            f"holds {len(chosen)} images: name one with oci:PATH:TAG"
        raise ImageError(f"{reference}: {layout} {why}; tags: {', '.join(tags) or 'none'}")
    descriptor = chosen[0]
    data = _layout_blob(layout, descriptor, f"the manifest of {reference}")
    manifest = _json(data, f"the manifest of {reference}")
    for _ in range(4):  # nested indexes (multi-platform)
        if descriptor.get("mediaType") not in INDEX_TYPES and "manifests" not in manifest:
            break
        descriptor = choose_platform(manifest, f"the index of {reference}")
        data = _layout_blob(layout, descriptor, f"the manifest of {reference}")
        manifest = _json(data, f"the manifest of {reference}")
    config_descriptor = _descriptor(manifest.get("config"), f"the config descriptor of {reference}")
    config = _layout_blob(layout, config_descriptor, f"the config of {reference}")
    layers = [_descriptor(layer, f"a layer of {reference}") for layer in manifest.get("layers") or []]

    def open_layer(i: int):
        path = os.path.join(layout, "blobs", "sha256", hex_of(layers[i]["digest"]))
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ImageError(f"layer {i + 1} of {reference} is missing from the layout ({path})") from None
        return _Closing(Verified(f, layers[i]["digest"], layers[i].get("size"), f"layer {i + 1} of {reference}"), f)

    try:
        return _finish(reference, store, data, descriptor["digest"], config, config_descriptor["digest"], layers,
                       open_layer, progress)
    except StoreError as exc:
        raise ImageError(str(exc)) from None


class _Closing:
    """A stream used as a context manager that closes the file under it."""

    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc) -> None:
        self.file.close()


# -- docker-archive: ------------------------------------------------------------------------------

def import_docker_archive(reference: Reference, store: Store, progress: Progress | None = None) -> dict:
    try:
        archive = tarfile.open(reference.path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{reference}: cannot read {reference.path} as a tar archive ({exc})") from None
    with archive:
        try:
            manifest_list = json.loads(_member(archive, "manifest.json", reference))
        except ValueError as exc:
            raise ImageError(f"{reference}: manifest.json is not JSON ({exc})") from None
        if not isinstance(manifest_list, list) or not manifest_list:
            raise ImageError(f"{reference}: manifest.json lists no image")
        wanted = f"{reference.name}:{reference.tag}" if reference.name else None

        def tags(entry) -> list[str]:
            return [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]

        if wanted:
            short = wanted.split("/", 1)[1] if wanted.startswith("docker.io/") else wanted
            chosen = [e for e in manifest_list if isinstance(e, dict) and
                      any(t in (wanted, short, "docker.io/" + short, "docker.io/library/" + short) for t in tags(e))]
        else:
            chosen = [e for e in manifest_list if isinstance(e, dict)]
        if len(chosen) != 1:
            offered = sorted(t for e in manifest_list if isinstance(e, dict) for t in tags(e))
            why = (f"has no image {wanted}" if wanted and not chosen
                   else "holds several images: name one with docker-archive:PATH:NAME:TAG")
            raise ImageError(f"{reference}: the archive {why}; tags: {', '.join(offered) or 'none'}")
        entry = chosen[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
                not all(isinstance(n, str) for n in layer_names):
            raise ImageError(f"{reference}: manifest.json has no Config and Layers")
        config = _member(archive, config_name, reference)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        layers = [{"digest": None, "name": name} for name in layer_names]

        def open_layer(i: int):
            return _Closing(_member_stream(archive, layer_names[i], reference), _Nothing())

        try:
            return _finish(reference, store, None, None, config, config_digest, layers, open_layer, progress)
        except StoreError as exc:
            raise ImageError(str(exc)) from None


class _Nothing:
    def close(self) -> None:
        pass


def _member_stream(archive: tarfile.TarFile, name: str, reference: Reference):
    try:
        stream = archive.extractfile(name)
    except KeyError:
        stream = None
    if stream is None:
        raise ImageError(f"{reference}: the archive has no file {name!r}")
    return stream


def _member(archive: tarfile.TarFile, name: str, reference: Reference, cap: int = MAX_MANIFEST) -> bytes:
    data = _member_stream(archive, name, reference).read(cap + 1)
    if len(data) > cap:
        raise ImageError(f"{reference}: {name} is larger than {cap} bytes")
    return data


def import_image(reference: Reference, store: Store, progress: Progress | None = None, insecure=()) -> dict:
    """``reference`` into ``store``; ``insecure``: registries (host[:port]) that may use plain http."""
    if reference.transport == "docker":
        from . import registry
        return registry.import_registry(reference, store, progress, insecure)
    if reference.transport == "oci":
        return import_oci(reference, store, progress)
    if reference.transport == "docker-archive":
        return import_docker_archive(reference, store, progress)
    raise ImageError(f"{reference}: the {reference.transport} transport is not supported yet")

