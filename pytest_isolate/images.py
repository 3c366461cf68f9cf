"""Images: what a container's root filesystem is made of.

Only the ``host`` image exists so far: a read-only view of the host made of binds
(``runtime/rootfs.py`` explains the entry format and how entries are applied).
"""

from __future__ import annotations

import os
import site
import sys
from typing import Iterable

from .runtime import paths

HOST_TOP_LEVEL = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Never bound from the host, whatever sys.path says: the container has its own.
NOT_BINDABLE = ("/", "/proc", "/sys", "/dev", "/tmp", "/run")


def python_paths() -> list[str]:
    """Everything the interpreter needs to import what the controller imported."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    paths += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    user_site = getattr(site, "USER_SITE", None)
    if site.ENABLE_USER_SITE and user_site:
        paths.append(user_site)
    paths += [p for p in sys.path if p]
    # Packages imported through import hooks (editable installs) live outside sys.path.
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and "." not in getattr(module, "__name__", "."):
            is_package = os.path.basename(file).startswith("__init__.")
            paths.append(os.path.dirname(file) if is_package else file)
    return paths


def _covering(paths: Iterable[str]) -> list[str]:
    """Existing real paths, minus those already inside another one, sorted."""
    real = set()
    for path in paths:
        if not path or not os.path.isabs(path):
            continue
        resolved = os.path.realpath(path)
        if os.path.exists(resolved):
            real.add(resolved)
    kept: list[str] = []
    for path in sorted(real):
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            continue
        kept.append(path)
    return kept


def host_image(project_paths: Iterable[str]) -> list[dict]:
    """Entries of the ``host`` image: the system, the interpreter, the project, read-only."""
    entries: list[dict] = []
    for top in HOST_TOP_LEVEL:
        if os.path.islink(top):
            entries.append({"type": "symlink", "dst": top, "target": os.readlink(top)})
        elif os.path.isdir(top):
            entries.append({"type": "bind", "dst": top, "src": top, "ro": True})
    covered = [e["dst"] for e in entries if e["type"] == "bind"]
    project = _covering(project_paths)
    for path in _covering(list(covered) + python_paths() + project):
        if path in covered or path in NOT_BINDABLE:
            continue
        if any(path == p or path.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
            continue
        # The project's files belong to whoever runs pytest: idmapped, they belong
        # to container root too when that is root (see rootfs.build_stage).
        entries.append({"type": "bind", "dst": path, "src": path, "ro": True, "idmap": path in project})
    entries += [
        {"type": "proc", "dst": "/proc"},
        {"type": "sysfs", "dst": "/sys"},
        {"type": "tmpfs", "dst": "/tmp", "mode": "1777"},
        {"type": "tmpfs", "dst": "/dev", "mode": "755"},
        {"type": "devpts", "dst": "/dev/pts"},
        {"type": "tmpfs", "dst": "/dev/shm", "mode": "1777"},
    ]
    entries += [{"type": "dev", "dst": f"/dev/{d}", "src": f"/dev/{d}"} for d in DEVICES
                if os.path.exists(f"/dev/{d}")]
    for entry in entries:  # what each host must find at these paths (runtime/paths.py)
        if entry["type"] in ("bind", "dev"):
            try:
                entry["pin"] = list(paths.pin(entry["src"]))
            except OSError:
                pass  # the host's own open (without symlinks) decides
    entries += [
        {"type": "symlink", "dst": "/dev/fd", "target": "/proc/self/fd"},
        {"type": "symlink", "dst": "/dev/stdin", "target": "/proc/self/fd/0"},
        {"type": "symlink", "dst": "/dev/stdout", "target": "/proc/self/fd/1"},
        {"type": "symlink", "dst": "/dev/stderr", "target": "/proc/self/fd/2"},
    ]
    return entries


def unmountable(entries: list[dict], destination: str) -> str | None:
    """Why a mount on ``destination`` cannot be made in this image, if it cannot.

    Inside a read-only bind only an existing path can be a mount point."""
    binds = [e for e in entries if e["type"] == "bind" and e.get("ro")]
    for bind in sorted(binds, key=lambda e: -len(e["dst"])):
        if destination == bind["dst"] or destination.startswith(bind["dst"].rstrip("/") + "/"):
            host_path = bind["src"] + destination[len(bind["dst"]):]
            if os.path.lexists(host_path):
                return None
            return (f"{destination} does not exist inside {bind['dst']}, a read-only part of the "
                    "image, so it cannot be a mount point; accepted: a destination that exists "
                    "there, or one outside it (e.g. under /mnt or /srv)")
    return None
