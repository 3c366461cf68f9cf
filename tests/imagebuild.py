"""Test images, built here without a network: a minimal root filesystem holding this
machine's system Python of the controller's major.minor (its stdlib, the libraries
ldd names, busybox), and OCI layouts and docker archives of it written in Python."""

from __future__ import annotations

import glob
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
    binaries = [SYSTEM_PYTHON]
    # What the controller's packages load (their C extensions) must be there too.
    for folder in site.getsitepackages():
        for parent, _, names in os.walk(folder):
            binaries += [os.path.join(parent, name) for name in names if ".so" in name]
    return _system(root, binaries, f"{root}/usr/lib/python{VERSION}/lib-dynload")


def _system(root: str, binaries: list[str], dynload: str) -> str:
    """The libraries ``binaries`` and the interpreter's C modules load, busybox, /etc."""
    binaries = binaries + [os.path.join(folder, name) for folder, _, names in os.walk(dynload)
                           for name in names if name.endswith(".so")]
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


# Another major.minor than the controller's, with a pytest of its own to put in the
# image: pyenv's Python 3.9 (root's home, unreadable rootless) and a venv of it.
OTHER_VERSION = "3.9"
OTHER_PYTEST_SITE = f"/work/venv39/lib/python{OTHER_VERSION}/site-packages"
PYTEST_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "exceptiongroup", "tomli", "py.py",
                   "typing_extensions.py", "typing_extensions")


def other_python() -> str | None:
    """The other-version interpreter an image can be built from, if this user can read one."""
    if VERSION == OTHER_VERSION or not shutil.which("ldd"):
        return None
    for path in sorted(glob.glob(f"/root/.pyenv/versions/{OTHER_VERSION}.*/bin/python{OTHER_VERSION}")):
        stdlib = os.path.join(os.path.dirname(os.path.dirname(path)), "lib", f"python{OTHER_VERSION}")
        if os.access(path, os.X_OK) and os.access(f"{stdlib}/os.py", os.R_OK):
            return path
    return None


def other_python_rootfs(root: str, python: str, with_pytest: bool = True) -> str:
    """A root filesystem laid out as Docker's python images are (/usr/local/bin/python3),
    of the interpreter ``python``; with pytest installed in its site-packages."""
    version = OTHER_VERSION
    stdlib = os.path.join(os.path.dirname(os.path.dirname(python)), "lib", f"python{version}")
    os.makedirs(root + "/usr/local/bin")
    shutil.copy2(python, f"{root}/usr/local/bin/python{version}")
    os.symlink(f"python{version}", root + "/usr/local/bin/python3")
    shutil.copytree(stdlib, f"{root}/usr/local/lib/python{version}", symlinks=True, ignore=shutil.ignore_patterns(
        "__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "ensurepip"))
    packages = f"{root}/usr/local/lib/python{version}/site-packages"
    os.makedirs(packages)
    if with_pytest:
        for name in os.listdir(OTHER_PYTEST_SITE):
            if name in PYTEST_PACKAGES or any(name.startswith(p + "-") and name.endswith(".dist-info")
                                              for p in PYTEST_PACKAGES):
                source = os.path.join(OTHER_PYTEST_SITE, name)
                if os.path.isdir(source):
                    shutil.copytree(source, f"{packages}/{name}", ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(source, packages)
    return _system(root, [python], f"{root}/usr/local/lib/python{version}/lib-dynload")


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
