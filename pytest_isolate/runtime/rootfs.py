"""Root filesystems: the staged image a container host sits in, and each test's root.

An image is a list of *entries* (plain dicts, so they cross execnet and JSON):

    {"type": "bind",    "dst": "/usr", "src": "/usr", "ro": True}
    {"type": "dev",     "dst": "/dev/null", "src": "/dev/null"}
    {"type": "symlink", "dst": "/bin", "target": "usr/bin"}
    {"type": "tmpfs",   "dst": "/tmp", "mode": "1777"}
    {"type": "devpts",  "dst": "/dev/pts"}
    {"type": "proc",    "dst": "/proc"}
    {"type": "overlay", "dst": "/tmp/x", "src": "/tmp/x"}   (test roots only)
    {"type": "layers",  "dst": "/", "layers": ["/cache/layers/top", ..., "/cache/layers/base"]}

The same entries are applied twice:

1. ``stage.build_stage`` (once per container host, from host paths): a tmpfs holding the
   image skeleton with every bind at its own path. The container host pivots into it.
   With a ``layers`` entry (an OCI image) the stage's root is instead an overlay of
   those layers (read-only once built), and each layer is also bound at
   ``LAYERS/<n>`` for the test roots.
2. ``build_test_root`` (once per test, inside the host): a copy-on-write overlay whose
   lower layers are the skeleton (and an image's layers), then every bind again, now taken from the
   stage, plus fresh tmpfs, /dev and devpts mounts. Nothing written there outlives the
   test's mount namespace.

Entries are applied sorted by destination so that a parent (``/tmp``) is mounted
before what goes inside it (a rootdir under ``/tmp``). Each entry type is one row of
``_STEPS`` (read it like bubblewrap's setup_newroot switch): what it leaves in the
stage's skeleton, how the stage mounts it, how a test root does. An unknown type is
a ValueError.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import Callable, NamedTuple

from . import mountinfo, paths, syscalls
from .syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

# Where a container host's per-test scratch tmpfs (overlay upper, work and the new
# root) is mounted, and where sources of user-requested mounts wait in the stage.
SCRATCH = "/.pytest-isolate"
SOURCES = "/.pytest-isolate-sources"
# The overlay's lower layer: the skeleton alone (directories, mount-point files and
# symlinks) on a tmpfs of its own. It cannot be the stage root itself: overlayfs
# refuses a lower layer with locked submounts ("failed to clone lowerpath").
LOWER = "/.pytest-isolate-lower"
# Where build_test_root mounts a test's root, before the test pivots into it.
TEST_ROOT = SCRATCH + "/root"
# Where an image's layers wait in the stage, top first: 0, 1, ...
LAYERS = "/.pytest-isolate-layers"
# Where the factory keeps the snapshots of services (snapshots.py): a tmpfs of its own
# mount namespace, so they end with it.
SNAPSHOTS = "/.pytest-isolate-snapshots"



def source_path(index: int) -> str:
    """Where the stage keeps the source of user mount number ``index``."""
    return f"{SOURCES}/{index}"


def ordered(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: (e["dst"].rstrip("/").count("/"), e["dst"]))


def _join(root: str, path: str) -> str:
    return root.rstrip("/") + "/" + path.lstrip("/")


def _makedirs(path: str, owner: tuple[int, int] | None = None, mode: int = 0o755) -> None:
    """mkdir -p; new directories get ``owner`` now, before anything is mounted on them."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        os.mkdir(p, mode)
        os.chmod(p, mode)  # the umask must not narrow the skeleton
        if owner is not None:
            os.lchown(p, *owner)


def _mountpoint(target: str, is_dir: bool, owner: tuple[int, int] | None = None) -> None:
    if is_dir:
        _makedirs(target, owner)
    elif not os.path.lexists(target):
        _makedirs(os.path.dirname(target), owner)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        if owner is not None:
            os.lchown(target, *owner)


def remount_readonly(target: str, extra: int = 0) -> None:
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | extra | mountinfo.locked_flags(target)
    syscalls.mount(None, target, None, flags)
    # Mounts that were below the source (e.g. /usr/local on its own filesystem) came
    # along with MS_REC and must be made read-only one by one.
    for sub in mountinfo.below(target):
        syscalls.mount(None, sub, None, MS_BIND | MS_REMOUNT | MS_RDONLY | mountinfo.locked_flags(sub))


def _bind(source: str, target: str, readonly: bool, extra: int = 0) -> None:
    syscalls.mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        remount_readonly(target, extra)


def _tmpfs(target: str, mode: str, extra: int = 0) -> None:
    syscalls.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra, f"mode={mode}")


@dataclasses.dataclass
class _Build:
    """What the steps of one phase share: the root they build under, and for the stage
    the owner of what it creates, the opened bind sources and the notes it returns."""

    root: str
    owner: tuple[int, int] | None = None
    fds: dict[str, int] = dataclasses.field(default_factory=dict)  # by destination
    userns_fd: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def target(self, entry: dict) -> str:
        return _join(self.root, entry["dst"])


# -- steps of several phases (the skeleton's leave whatever exists alone) -----------

def _directory(build: _Build, entry: dict) -> None:
    _makedirs(build.target(entry), build.owner)


def _symlink(build: _Build, entry: dict) -> None:
    target = build.target(entry)
    if not os.path.lexists(target):
        _makedirs(os.path.dirname(target), build.owner)
        os.symlink(entry["target"], target)
        if build.owner is not None:
            os.lchown(target, *build.owner)


def _source_point(build: _Build, entry: dict) -> None:
    """A directory or a file to bind onto, as the opened source is."""
    is_dir = stat.S_ISDIR(os.fstat(build.fds[entry["dst"]]).st_mode)
    _mountpoint(build.target(entry), is_dir, build.owner)


def _tmpfs_step(build: _Build, entry: dict) -> None:
    _directory(build, entry)
    _tmpfs(build.target(entry), entry.get("mode", "755"))


# -- the stage ------------------------------------------------------------------------

def _stage_bind(build: _Build, entry: dict) -> None:
    _source_point(build, entry)
    fd, target = build.fds[entry["dst"]], build.target(entry)
    dev = entry["type"] == "dev"
    readonly = entry.get("ro", not dev)
    if entry.get("idmap") and readonly and build.userns_fd is not None:
        try:
            attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_RDONLY
            syscalls.idmapped_bind(fd, target, build.userns_fd, attrs)
            return
        except OSError as exc:
            build.notes.append(f"{entry['src']} is not idmapped ({_fs_type(fd)}: {exc.strerror}): "
                               "container root reads it as an unprivileged uid; its filesystem needs "
                               "idmapped mounts (tmpfs: Linux 6.3+), or make it world-readable")
    _bind(f"/proc/self/fd/{fd}", target, readonly, 0 if dev else MS_NOSUID | MS_NODEV)


def _host_fs(build: _Build, entry: dict) -> None:
    """The host keeps the host's /proc and /sys, read-only for /sys (it is in neither a
    pid nor a network namespace of its own while it builds this); each test mounts
    fresh ones."""
    _directory(build, entry)
    sysfs = entry["type"] == "sysfs"
    syscalls.mount("/sys" if sysfs else "/proc", build.target(entry), None, MS_BIND | MS_REC)
    if sysfs:
        remount_readonly(build.target(entry))


# -- a test's root --------------------------------------------------------------------

def _test_bind(build: _Build, entry: dict) -> None:
    root, target = build.root, build.target(entry)
    source = entry.get("stage_src", entry["dst"])
    if entry.get("stage_src"):
        if not os.path.lexists(source):
            raise OSError(errno.ESTALE, f"the source of the mount on {entry['dst']}, {entry.get('src')}, "
                          "was replaced or became unreachable after the run started; it is not mounted")
        # As the test will see it: a symlink of the image leads inside its root.
        target = _join(root, paths.resolve_in_root(root, entry["dst"]))
    try:
        _mountpoint(target, os.path.isdir(source))
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise OSError(exc.errno, f"cannot mount on {entry['dst']}: it does not exist and lies in a "
                      "read-only part of the image; pick a destination that exists there, "
                      "or one outside it (e.g. under /mnt)") from None
    if entry.get("stage_src"):  # a user mount: its ro flag is the test's choice
        _bind(source, target, entry.get("ro", True), MS_NOSUID | MS_NODEV)
    else:  # an image bind keeps the flags it has in the stage
        syscalls.mount(source, target, None, MS_BIND | MS_REC)


def _devpts(build: _Build, entry: dict) -> None:
    _directory(build, entry)
    target = build.target(entry)
    syscalls.mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    ptmx = _join(os.path.dirname(target), "ptmx")
    if not os.path.lexists(ptmx):
        os.symlink("pts/ptmx", ptmx)


def _test_overlay(build: _Build, entry: dict) -> None:
    """A copy-on-write view of a directory of the stage, as the container host left it
    (what shared fixtures wrote under their tmp_path_factory): each test writes to
    its own upper layer. The source has no mounts below it, so overlayfs accepts it."""
    layers = _join(SCRATCH, "layers" + entry["dst"])
    upper, work = _join(layers, "upper"), _join(layers, "work")
    for d in (upper, work):
        _makedirs(d)
    _makedirs(build.target(entry))
    syscalls.mount("overlay", build.target(entry), "overlay", MS_NOSUID | MS_NODEV,
                   f"lowerdir={entry['src']},upperdir={upper},workdir={work},userxattr")


def _nothing(build: _Build, entry: dict) -> None:
    pass


def _test_root_only(build: _Build, entry: dict) -> None:
    raise ValueError(f"a {entry['type']!r} entry (on {entry.get('dst')}) belongs to a test's root, not an image")


def _sysfs(build: _Build, entry: dict) -> None:
    _directory(build, entry)
    mount_sysfs(build.root)


class _Steps(NamedTuple):
    skeleton: Callable[[_Build, dict], None]
    stage: Callable[[_Build, dict], None]
    test_root: Callable[[_Build, dict], None]
    binds: bool = False  # from a host path, which build_stage opens first


# One row per entry type: what it leaves in the stage's skeleton (the overlay's lower
# layer, where nothing is mounted), how the stage mounts it, how a test's root does.
_STEPS = {
    #                   skeleton       stage        test root
    "bind":    _Steps(_source_point, _stage_bind, _test_bind, binds=True),
    "dev":     _Steps(_source_point, _stage_bind, _test_bind, binds=True),
    "symlink": _Steps(_symlink,      _symlink,    _symlink),
    "tmpfs":   _Steps(_directory,    _tmpfs_step, _tmpfs_step),
    "devpts":  _Steps(_directory,    _directory,  _devpts),
    "proc":    _Steps(_directory,    _host_fs,    _directory),  # mount_proc mounts it later
    "sysfs":   _Steps(_directory,    _host_fs,    _sysfs),
    "overlay": _Steps(_test_root_only, _test_root_only, _test_overlay),
    "layers":  _Steps(_nothing, _nothing, _nothing),  # the stage's and the test roots' overlays
}
TYPES = tuple(_STEPS)


def _steps(entry: dict) -> _Steps:
    try:
        return _STEPS[entry["type"]]
    except KeyError:
        raise ValueError(f"unknown image entry type {entry['type']!r} (on {entry.get('dst')}); "
                         f"known: {', '.join(TYPES)}") from None


def _fs_type(fd: int) -> str:
    """The filesystem type of the mount ``fd`` lies on, for notes."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            mount_id = next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
        return mountinfo.fs_type_of(mount_id) or "unknown filesystem"
    except (OSError, StopIteration, ValueError):
        return "unknown filesystem"


def pivot_into(new_root: str) -> None:
    """Make ``new_root`` the root and detach the old one.

    pivot_root(".", ".") stacks the old root on top of the new one, so no directory
    for it is needed; unmounting "." then removes it.
    """
    os.chdir(new_root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def build_test_root(entries: list[dict], mounts: list[dict], snapshot: dict | None = None) -> str:
    """Build one test's root under SCRATCH, from the stage the caller sits in.

    Runs in a fresh mount namespace owned by the container user namespace. Returns
    the new root (TEST_ROOT); /proc is mounted later, by the test process. With
    ``snapshot`` (a service's, checked by snapshots.prepare), the overlay's upper
    layer is the snapshot's ("template") or the snapshot is its top lower layer
    ("copy"); either way /tmp is a directory of that root, not a tmpfs, so that
    what the service keeps there is in its snapshot.
    """
    syscalls.mount(None, "/", None, MS_REC | syscalls.MS_PRIVATE)
    _tmpfs(SCRATCH, "755")
    upper, work, root = _join(SCRATCH, "upper"), _join(SCRATCH, "work"), TEST_ROOT
    # Overlay layers never include submounts: the binds are bound again below.
    layered = next((e for e in entries if e["type"] == "layers"), None)
    lowers = [LOWER] + [f"{LAYERS}/{i}" for i in range(len(layered["layers"]) if layered else 0)]
    if snapshot is not None:
        kept = _join(SNAPSHOTS, snapshot["name"])
        if snapshot["role"] == "template":
            upper, work = _join(kept, "upper"), _join(kept, "work")
        else:
            lowers.insert(0, _join(kept, "upper"))
        entries = [e for e in entries if (e["type"], e["dst"]) != ("tmpfs", "/tmp")]
    for d in (upper, work, root):
        _makedirs(d)
    syscalls.mount_overlay(root, lowers, upper, work, MS_NOSUID, parent=LAYERS)
    if snapshot is not None and snapshot["role"] == "template":
        tmp = _join(root, paths.resolve_in_root(root, "/tmp"))  # an image's symlink leads inside its root
        _makedirs(tmp)
        os.chmod(tmp, 0o1777)  # copied up: the copies find it so in their lower layer
    build = _Build(root)
    for entry in ordered(entries + mounts):
        _steps(entry).test_root(build, entry)
    return root


def place_file(root: str, path: str, content: str) -> None:
    """A file of the runtime's (e.g. /etc/hosts) over ``path`` in the test root:
    written into the scratch tmpfs and bound there, since the image's /etc may be
    read-only. A symlink of the image leads inside its root, as for mounts."""
    source = _join(SCRATCH, "files/" + path.strip("/").replace("/", "-"))
    _makedirs(os.path.dirname(source))
    with open(os.open(source, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644), "w") as file:
        file.write(content)
    target = _join(root, paths.resolve_in_root(root, path))
    _mountpoint(target, False)
    syscalls.mount(source, target, None, MS_BIND)
    syscalls.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_proc(root: str) -> None:
    """Mount a /proc for the caller's pid namespace."""
    syscalls.mount("proc", _join(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_sysfs(root: str) -> None:
    """A read-only /sys of the caller's network namespace."""
    target = _join(root, "/sys")
    syscalls.mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
