"""Images: what a container's root filesystem is made of (``runtime/rootfs.py``
explains the entry format and how entries are applied).

- ``host``: a read-only view of the host, made of binds; the container host runs the
  controller's own interpreter.
- an OCI image (``oci:``, ``docker-archive:``; pulled into the store, oci/) or a plain
  root filesystem (``dir:``): its layers stacked as overlay lower layers, the
  project and the controller's Python packages (pytest, this plugin, the test's
  dependencies) bound read-only at their own paths, and the image's own interpreter
  of the controller's major.minor version (``image_python``); failing that, an image
  interpreter with its own pytest>=8.0, and only this plugin and the project bound.
"""

from __future__ import annotations

import dataclasses
import os
import re
import site
import stat
import sys
from typing import Iterable

from .runtime import paths
from .runtime.syscalls import OVERLAY_MAX_LOWERS

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


def _existing(paths: Iterable[str]) -> list[str]:
    """Existing real absolute paths, sorted, each once."""
    real = set()
    for path in paths:
        if not path or not os.path.isabs(path):
            continue
        resolved = os.path.realpath(path)
        if os.path.exists(resolved):
            real.add(resolved)
    return sorted(real)


def _covering(paths: Iterable[str]) -> list[str]:
    """Existing real paths, minus those already inside another one, sorted."""
    kept: list[str] = []
    for path in _existing(paths):
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
        # to container root too when that is root (see runtime/stage.py).
        entries.append({"type": "bind", "dst": path, "src": path, "ro": True, "idmap": path in project})
    return _pinned(entries + _system_entries()) + _dev_links()
    return entries


@dataclasses.dataclass
class Image:
    entries: list[dict]
    python: str  # the interpreter the container host runs, as the image has it
    env: dict[str, str] | None = None  # the image's environment (None: the controller's)
    sys_path: list[str] | None = None  # the controller's paths the host imports from (None: all)
    pytest: str | None = None  # the version of the image's own pytest, when tests run with it


class ImageProblem(Exception):
    """An image tests cannot run in; the message says what was found and what to do."""


# Where an image's interpreter is looked for, in this order (Docker's python images
# have /usr/local/bin/python3, distributions /usr/bin/python3).
PYTHON_CANDIDATES = ("/usr/local/bin/python3", "/usr/bin/python3", "/usr/local/bin/python", "/usr/bin/python")


def _in_layers(layers: list[str], path: str) -> str | None:
    """The host path of ``path`` in the merged view of ``layers`` (top first), without
    following a symlink at its end; None if absent or whited out."""
    for layer in layers:
        candidate = layer + path
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout
            return None
        return candidate
    return None


def _resolve(layers: list[str], path: str, hops: int = 40) -> str | None:
    """``path`` with its symlinks resolved inside the image (never on the host)."""
    parts = [p for p in path.split("/") if p]
    done = ""
    while parts and hops > 0:
        part = parts.pop(0)
        if part == "..":
            done = os.path.dirname(done)
            continue
        current = f"{done}/{part}"
        found = _in_layers(layers, current)
        if found is None:
            return None
        if os.path.islink(found):
            hops -= 1
            target = os.readlink(found)
            parts = [p for p in target.split("/") if p] + parts
            done = "" if target.startswith("/") else done
            continue
        done = current
    return done if not parts else None


MIN_PYTEST = (8, 0)  # pyproject.toml's pytest>=8.0


def _interpreters(layers: list[str]) -> list[tuple[str, str | None]]:
    """(path in the image, its major.minor or None) of each interpreter found there."""
    found: list[tuple[str, str | None]] = []
    for candidate in PYTHON_CANDIDATES:
        resolved = _resolve(layers, candidate)
        if resolved is None or any(resolved == path for path, _ in found):
            continue
        match = re.search(r"python(\d+\.\d+)$", resolved)
        version = match.group(1) if match else None
        if version is None:  # a bare python3 binary: its stdlib names its version
            for prefix in ("/usr/local", "/usr"):
                if resolved.startswith(prefix + "/bin/"):
                    for v in range(20, 5, -1):
                        if _in_layers(layers, f"{prefix}/lib/python3.{v}/os.py"):
                            version = f"3.{v}"
                            break
        found.append((resolved, version))
    return found


def _site_directories(python: str, version: str) -> list[str]:
    """Where an interpreter at ``python`` finds installed packages, as distributions lay them out."""
    prefixes = dict.fromkeys([os.path.dirname(os.path.dirname(python)), "/usr/local", "/usr"])
    return [f"{prefix}/{lib}/python{version}/{kind}" for prefix in prefixes for lib in ("lib", "lib64")
            for kind in ("site-packages", "dist-packages")] + ["/usr/lib/python3/dist-packages"]


def _read_small(layers: list[str], path: str, cap: int = 1 << 16) -> str:
    """The start of a regular file in the image; never follows a symlink onto the host."""
    found = _in_layers(layers, path)
    if found is None:
        return ""
    try:
        fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        return os.read(fd, cap).decode(errors="replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)


def image_pytest(layers: list[str], python: str, version: str) -> tuple[str, str] | None:
    """(pytest's version, its site directory) installed for the image's ``python`` of
    ``version``, found by reading the layers (nothing of the image runs here)."""
    for site_dir in _site_directories(python, version):
        resolved = _resolve(layers, site_dir)
        if resolved is None or _in_layers(layers, f"{resolved}/pytest/__init__.py") is None:
            continue
        names = set()
        for layer in layers:
            try:
                names.update(n for n in os.listdir(layer + resolved) if n.startswith("pytest-"))
            except OSError:
                pass
        texts = [_read_small(layers, f"{resolved}/{name}/{meta}") for name in sorted(names)
                 for meta in ("METADATA", "PKG-INFO") if re.fullmatch(r"pytest-[^-]+\.(dist|egg)-info", name)]
        texts.append(_read_small(layers, f"{resolved}/_pytest/_version.py"))
        for text in texts:
            match = re.search(r"^Version: *([0-9][0-9A-Za-z.+-]{0,40})\s*$", text, re.M) or \
                re.search(r"""^(?:__version__|version) *= *(?:\w+ *= *)?['"]([0-9][0-9A-Za-z.+-]{0,40})['"]""",
                          text, re.M)
            if match:
                return match.group(1), resolved
        return "?", resolved
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def image_python(layers: list[str], what: str) -> tuple[str, str | None]:
    """The interpreter the container host runs, and the version of the image's pytest
    it runs with (None: the controller's pytest, bound in). The image's Python of the
    controller's major.minor comes first; otherwise one that has pytest>=8.0."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    interpreters = _interpreters(layers)
    for path, version in interpreters:
        if version == want:
            return path, None
    if not interpreters:
        raise ImageProblem(f"{what} has no Python (looked for {', '.join(PYTHON_CANDIDATES)}): the container "
                           f"host runs pytest with the image's interpreter; use an image with Python {want}")
    too_old = []
    for path, version in interpreters:
        found = image_pytest(layers, path, version) if version else None
        if found and _version_tuple(found[0]) >= MIN_PYTEST:
            return path, found[0]
        if found:
            shown = "of an unknown version" if found[0] == "?" else found[0]
            too_old.append(f"pytest {shown} for Python {version} ({found[1]})")
    needed = ".".join(map(str, MIN_PYTEST))
    if too_old:
        raise ImageProblem(f"{what} has {', '.join(too_old)}; pytest-isolate needs pytest>={needed} there, as pytest "
                           f"here runs on Python {want}: upgrade pytest in the image (pip install "
                           f"'pytest>={needed}'), or use an image with Python {want}")
    shown = ", ".join(f"Python {version or '?'} ({path})" for path, version in interpreters)
    raise ImageProblem(f"{what} has {shown} without pytest, and pytest here runs on Python {want}: install "
                       f"'pytest>={needed}' in the image (its pytest then runs the tests), use an image with Python "
                       f"{want}, or run pytest with the image's Python version")


def _plugin_only() -> str:
    """This plugin's package directory: all an image's own pytest needs from here."""
    return os.path.dirname(os.path.abspath(__file__))


def _controller_packages() -> list[str]:
    """The controller's import paths but its standard library and interpreter: its
    packages (site-packages, editable sources) and the project."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    kept = []
    for path in python_paths():
        real = os.path.realpath(path) if path else path
        if not real or not os.path.isabs(real):
            continue
        if "site-packages" in real.split("/") or "dist-packages" in real.split("/"):
            kept.append(real)
        elif not any(real == p or real.startswith(p.rstrip("/") + "/") for p in prefixes):
            kept.append(real)
    return kept


def _system_entries() -> list[dict]:
    """/proc, /sys, /tmp, /dev and its devices: the same in every image."""
    entries = [
        {"type": "proc", "dst": "/proc"},
        {"type": "sysfs", "dst": "/sys"},
        {"type": "tmpfs", "dst": "/tmp", "mode": "1777"},
        {"type": "tmpfs", "dst": "/dev", "mode": "755"},
        {"type": "devpts", "dst": "/dev/pts"},
        {"type": "tmpfs", "dst": "/dev/shm", "mode": "1777"},
    ]
    return entries + [{"type": "dev", "dst": f"/dev/{d}", "src": f"/dev/{d}"} for d in DEVICES
                      if os.path.exists(f"/dev/{d}")]


def _dev_links() -> list[dict]:
    return [
        {"type": "symlink", "dst": "/dev/fd", "target": "/proc/self/fd"},
        {"type": "symlink", "dst": "/dev/stdin", "target": "/proc/self/fd/0"},
        {"type": "symlink", "dst": "/dev/stdout", "target": "/proc/self/fd/1"},
        {"type": "symlink", "dst": "/dev/stderr", "target": "/proc/self/fd/2"},
    ]


def _pinned(entries: list[dict]) -> list[dict]:
    for entry in entries:  # what each host must find at these paths (runtime/paths.py)
        if entry["type"] in ("bind", "dev"):
            try:
                entry["pin"] = list(paths.pin(entry["src"]))
            except OSError:
                pass  # the host's own open (without symlinks) decides
    return entries


def layered_image(layers: list[str], image_env: list[str], project_paths: Iterable[str], what: str,
                  idmap: bool = False, python: str = "auto") -> Image:
    """An OCI image's or a root filesystem's entries: ``layers`` host directories,
    top first (``idmap``: their files belong to host users, not to the container's)."""
    pytest_version = None
    if len(layers) >= OVERLAY_MAX_LOWERS:  # the test roots stack one more: the skeleton
        raise ImageProblem(f"{what} has {len(layers)} layers; overlayfs stacks at most {OVERLAY_MAX_LOWERS - 1} "
                           "under a container's own: squash some of them")
    if python == "auto":
        python, pytest_version = image_python(layers, what)
    else:
        resolved = _resolve(layers, python)
        found = _in_layers(layers, resolved) if resolved else None
        if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise ImageProblem(f"{python} is not an executable file in {what}")
        python = resolved
    project = _covering(project_paths)
    # With the image's pytest, only this plugin and the project come from here: the
    # controller's packages are for another Python.
    imports = ([_plugin_only()] if pytest_version else _controller_packages()) + project
    packages = _covering(imports)  # what is bound: a directory inside another comes with it
    entries = [{"type": "layers", "dst": "/", "layers": list(layers), "idmap": idmap}]
    for path in packages:
        if path in NOT_BINDABLE or any(path == p or path.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
            continue
        entries.append({"type": "bind", "dst": path, "src": path, "ro": True, "idmap": path in project})
    env = dict(e.partition("=")[::2] for e in image_env if "=" in e)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # The import paths: the bound ones, and sys.path's entries inside them (the venv's
    # site-packages inside a project that PYTHONPATH names), not every package's directory.
    entries_of_sys_path = set(_existing(sys.path + (site.getsitepackages() if hasattr(site, "getsitepackages") else [])))
    sys_path = sorted(set(packages) | (set(_existing(imports)) & entries_of_sys_path))
    if pytest_version:  # the plugin imported from its parent, which holds nothing else here
        sys_path = list(dict.fromkeys([os.path.dirname(_plugin_only())] + [p for p in packages if p != _plugin_only()]))
    return Image(_pinned(entries + _system_entries()) + _dev_links(), python, env, sys_path, pytest_version)


def resolve(image: str, project_paths: list[str], pull: str = "missing", progress=None,
            python: str = "auto", insecure: Iterable[str] = ()) -> Image:
    """The Image of a normalised reference; an OCI image is read into the store first
    when it is missing there (``pull="missing"``), always, or never (``insecure``:
    registries that may use plain http or unverified TLS, oci/registry.py)."""
    from .oci import local, reference, store as store_module

    ref = reference.parse(image)
    if ref.transport == "host":
        if python != "auto":
            raise ImageProblem("python= picks an interpreter inside an image; the host image runs pytest's own")
        return Image(host_image(project_paths), sys.executable)
    if ref.transport == "dir":
        if not os.path.isdir(ref.path):
            raise ImageProblem(f"{image}: {ref.path} is not a directory (dir: names a root filesystem)")
        return layered_image([ref.path], [], project_paths, image, idmap=True, python=python)
    store = store_module.for_this_user()
    record = None if pull == "always" else store.image(str(ref))
    if record is None:
        if pull == "never":
            raise ImageProblem(f"{image} is not in the image store ({store.root}) and --isolate-pull=never: "
                               f"run `python -m pytest_isolate pull {image}` first")
        try:
            record = local.import_image(ref, store, progress, tuple(insecure))
        except (local.ImageError, store_module.StoreError) as exc:
            raise ImageProblem(str(exc)) from None
        except OSError as exc:
            raise ImageProblem(f"{image}: {exc}") from None
    layers = [store.layer_path(d) for d in reversed(record["layers"])]
    return layered_image(layers, record.get("env") or [], project_paths, image, python=python)


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
