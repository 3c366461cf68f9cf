"""Test images, built here without a network: a minimal root filesystem holding this
machine's system Python of the controller's major.minor (its stdlib, the libraries
ldd names, busybox), and OCI layouts and docker archives of it written in Python."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import tarfile

VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
SYSTEM_PYTHON = f"/usr/bin/python{VERSION}"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def can_build() -> str | None:
    """Why no Python image can be built here, or None."""
    if not os.path.exists(SYSTEM_PYTHON) or not os.path.isdir(f"/usr/lib/python{VERSION}"):
        return f"needs the system's Python {VERSION} ({SYSTEM_PYTHON}) to build an image with"
    if not shutil.which("ldd"):
        return "needs ldd"
    return None


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60).stdout
    return re.findall(r"(/\S+) \(0x", out)


def _copy(path: str, root: str) -> None:
    target = root + path
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.realpath(path), target)


def python_rootfs(root: str) -> str:
    """A root filesystem at ``root`` whose /usr/bin/python3 is the system's Python."""
    os.makedirs(root + "/usr/bin")
    _copy(SYSTEM_PYTHON, root)
    os.symlink(f"python{VERSION}", root + "/usr/bin/python3")
    shutil.copytree(f"/usr/lib/python{VERSION}", f"{root}/usr/lib/python{VERSION}", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo"))
    binaries = [SYSTEM_PYTHON] + [os.path.join(folder, name)
                                  for folder, _, names in os.walk(f"{root}/usr/lib/python{VERSION}/lib-dynload")
                                  for name in names if name.endswith(".so")]
    # What the controller's packages load (their C extensions) must be there too.
    for folder in site.getsitepackages():
        for parent, _, names in os.walk(folder):
            binaries += [os.path.join(parent, name) for name in names if ".so" in name]
    for binary in binaries:
        for library in _libraries(binary):
            _copy(library, root)
    for extra in ("/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"):
        if os.path.exists(extra):
            _copy(extra, root)
    if os.path.exists("/usr/bin/busybox"):
        os.makedirs(root + "/bin", exist_ok=True)
        _copy("/usr/bin/busybox", root)
        os.symlink("/usr/bin/busybox", root + "/bin/sh")
    os.makedirs(root + "/etc", exist_ok=True)
    for name, text in {"passwd": "root:x:0:0:root:/root:/bin/sh\n", "group": "root:x:0:\n",
                       "os-release": 'PRETTY_NAME="pytest-isolate test image"\nID=isolate-test\n'}.items():
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)
    for folder in ("tmp", "root", "proc", "sys", "dev", "srv"):
        os.makedirs(f"{root}/{folder}", exist_ok=True)
    os.chmod(f"{root}/srv", 0o1777)  # writable whoever owns the image's files
    return root


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_of_directory(root: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name, filter=_as_root)
    return buffer.getvalue()


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer_of_files(files: dict[str, bytes | None]) -> bytes:
    """A layer of files; None is a whiteout of that path."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            if data is None:
                folder, base = os.path.split(name)
                name, data = os.path.join(folder, ".wh." + base), b""
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def oci_layout(path: str, tag: str, layers: list[bytes], env=("PATH=/usr/bin:/bin",)) -> str:
    """An OCI image layout at ``path`` (created or added to) with one image ``tag``."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def blob(data: bytes, media_type: str) -> dict:
        with open(os.path.join(blobs, _sha(data)[7:]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": _sha(data), "size": len(data)}

    config = json.dumps({"architecture": ARCH, "os": "linux", "config": {"Env": list(env)},
                         "rootfs": {"type": "layers", "diff_ids": [_sha(layer) for layer in layers]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(gzip.compress(layer, 1), "application/vnd.oci.image.layer.v1.tar+gzip") for layer in layers],
    }).encode()
    descriptor = dict(blob(manifest, "application/vnd.oci.image.manifest.v1+json"),
                      annotations={"org.opencontainers.image.ref.name": tag})
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    index_path = os.path.join(path, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append(descriptor)
    with open(index_path, "w") as f:
        json.dump(index, f)
    return path
