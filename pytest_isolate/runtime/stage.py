"""The stage: the image as the container host sees it, built once per host by the
launcher, from host paths (``build_stage``); rootfs.py holds the entry types and
each test's root, which is built from this stage.

The order is forced: every host path (bind sources, an image's layers) is opened
first, because the stage tmpfs is attached over STAGE_ATTACH and may hide some; the
skeleton (the test roots' top lower layer) is built beside the stage; the launcher
pivots into the stage last and makes it read-only.
"""

from __future__ import annotations

import dataclasses
import os

from . import mountinfo, paths, syscalls, tiny_init
from .rootfs import (LAYERS, LOWER, SCRATCH, SNAPSHOTS, SOURCES, _bind, _Build, _join, _makedirs, _steps, _tmpfs, ordered,
                     pivot_into, source_path)
from .syscalls import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

# The mount point the stage tmpfs is attached to in the launcher's private mount
# namespace. Every host path is opened before it is covered (see build_stage).
STAGE_ATTACH = "/tmp"


def _unwritable_sources(source_entries: list[dict], fds: dict[str, int], owner: tuple[int, int]) -> list[str]:
    """Notes on :rw sources that container root cannot write to. As root, container
    root is an unprivileged host uid, and writable sources are not idmapped (see
    build_stage): the test would meet a bare PermissionError."""
    notes = []
    for entry in source_entries:
        if entry["ro"] or os.geteuid() != 0:  # rootless, container root is the user
            continue
        st = os.fstat(fds[entry["dst"]])
        if not (st.st_mode & 0o002 or (st.st_uid == owner[0] and st.st_mode & 0o200)
                or (st.st_gid == owner[1] and st.st_mode & 0o020)):
            notes.append(f"the :rw mount source {entry['src']} is not writable by container root (host uid "
                         f"{owner[0]}): make it so (e.g. chown {owner[0]} {entry['src']}), or run pytest as a "
                         "user (container root is then that user)")
    return notes


def build_stage(
    entries: list[dict], sources: list[dict], owner: tuple[int, int], userns_fd: int | None = None
) -> list[str]:
    """Build the image stage and pivot the calling process into it.

    Called in the launcher, in a mount namespace of its own. ``sources`` are host
    paths that tests may bind later (``mounts=``); they wait under SOURCES.
    ``owner`` is the host uid/gid of container root: the skeleton is chowned to it so
    that overlay copy-up of its directories works inside the user namespace.

    With ``userns_fd`` (pytest runs as root), read-only binds marked ``idmap`` -- the
    project and read-only mount sources, not the system -- are idmapped through the
    container's user namespace, so that files of the user who runs pytest belong to
    container root (pytest's own temporary directories are mode 700). Writable
    sources never are: through an idmapped writable bind, container root would
    create files owned by host root, setuid ones included. Returns notes on what
    could not be done that way.
    """
    stage = _Build(STAGE_ATTACH, owner, userns_fd=userns_fd)
    # Nothing done here may propagate back into the host's mount namespace.
    syscalls.mount(None, "/", None, MS_REC | syscalls.MS_PRIVATE)

    # Open every host path first: the stage tmpfs is attached over STAGE_ATTACH and
    # may hide some of them. Binds then go through /proc/self/fd, which also pins the
    # object that was checked (no path swapped for a symlink in between).
    # Each is the object the controller pinned, reached without a symlink: a test
    # with a :rw mount may have swapped a path for a symlink since (paths.py). A
    # user's mount source that moved is left out (the tests that use it fail and
    # say so); an image path that moved fails the host.
    source_entries = [
        {"type": "bind", "src": s["src"], "dst": source_path(i), "ro": s["ro"], "idmap": s["ro"],
         "pin": s.get("pin")}
        for i, s in enumerate(sources)
    ]
    layered = next((e for e in entries if e["type"] == "layers"), None)
    layer_fds = []
    try:
        for layer in (layered or {}).get("layers", []):
            layer_fds.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        for entry in entries + source_entries:
            if _steps(entry).binds:
                try:
                    stage.fds[entry["dst"]] = paths.open_pinned(entry["src"], entry.get("pin"))
                except OSError as exc:
                    if entry not in source_entries:
                        raise
                    stage.notes.append(f"the mount source {entry['src']} is not mounted: {exc.strerror}")
        source_entries = [entry for entry in source_entries if entry["dst"] in stage.fds]
        stage.notes += _unwritable_sources(source_entries, stage.fds, owner)
        _tmpfs(STAGE_ATTACH, "755")
        os.lchown(STAGE_ATTACH, *owner)
        if layer_fds and layered.get("idmap") and userns_fd is not None:
            layer_fds = _idmapped_layers(layer_fds, userns_fd)
        if layer_fds:
            stage.root = _image_root(layer_fds, owner)
        skeleton = dataclasses.replace(stage, root=_join(stage.root, LOWER))
        _makedirs(skeleton.root, owner)
        _tmpfs(skeleton.root, "755")
        os.lchown(skeleton.root, *owner)
        for entry in ordered(entries + source_entries):
            if not entry["dst"].startswith(SOURCES + "/"):
                _steps(entry).skeleton(skeleton, entry)
            _steps(entry).stage(stage, entry)
        for i, fd in enumerate(layer_fds):  # for the test roots' overlays
            target = _join(stage.root, f"{LAYERS}/{i}")
            _makedirs(target, owner)
            _bind(f"/proc/self/fd/{fd}", target, True, MS_NOSUID | MS_NODEV)
        _makedirs(_join(stage.root, SCRATCH), owner)
        _makedirs(_join(stage.root, SNAPSHOTS), owner)
        _install_tiny_init(owner, stage.root)
        syscalls.mount(None, skeleton.root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in list(stage.fds.values()) + layer_fds:
            os.close(fd)
    pivot_into(stage.root)
    # The skeleton itself is never written after this: each test writes to its overlay.
    syscalls.mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | mountinfo.locked_flags("/"))
    return stage.notes


def _idmapped_layers(layer_fds: list[int], userns_fd: int) -> list[int]:
    """As root, a plain root filesystem (``dir:``) belongs to host uids that container
    root is not: through idmapped binds its files belong to the container's users
    (host root's to container root), which overlayfs needs to copy them up. An OCI
    image's layers need none: they were unpacked with the container's uids."""
    mapped = []
    for i, fd in enumerate(layer_fds):
        target = _join(STAGE_ATTACH, f"/.idmapped/{i}")
        _makedirs(target)
        attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_RDONLY
        syscalls.idmapped_bind(fd, target, userns_fd, attrs)
        mapped.append(os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        os.close(fd)
    return mapped


def _image_root(layer_fds: list[int], owner: tuple[int, int]) -> str:
    """The stage's root for an image: its layers (top first) under an upper layer on
    the stage tmpfs, writable while the stage is built (mount points), read-only after.
    ``userxattr``: opaque directories are marked as a user namespace can read them."""
    upper, work, root = (_join(STAGE_ATTACH, d) for d in ("/.image-upper", "/.image-work", "/image"))
    for d in (upper, work, root):
        os.mkdir(d, 0o755)
        os.lchown(d, *owner)
    lowers = [f"/proc/self/fd/{fd}" for fd in layer_fds]
    syscalls.mount_overlay(root, lowers, upper, work, MS_NOSUID | MS_NODEV, parent="/proc/self/fd")
    return root


def _install_tiny_init(owner: tuple[int, int], root: str = STAGE_ATTACH) -> None:
    """The containers' init (tiny_init.py), where the factory spawns it from."""
    program = tiny_init.program()
    if program is None:
        return
    path = _join(root, tiny_init.PATH)
    _makedirs(os.path.dirname(path), owner)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, program)
        os.fchmod(fd, 0o755)  # the umask must not narrow it
        os.fchown(fd, *owner)
    finally:
        os.close(fd)
