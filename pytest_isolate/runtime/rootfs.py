"""Root filesystems: the staged image a container host sits in, and each test's root.

An image is a list of *entries* (plain dicts, so they cross execnet and JSON):

    {"type": "bind",    "dst": "/usr", "src": "/usr", "ro": True}
    {"type": "dev",     "dst": "/dev/null", "src": "/dev/null"}
    {"type": "symlink", "dst": "/bin", "target": "usr/bin"}
    {"type": "tmpfs",   "dst": "/tmp", "mode": "1777"}
    {"type": "devpts",  "dst": "/dev/pts"}
    {"type": "proc",    "dst": "/proc"}

The same entries are applied twice:

1. ``build_stage`` (once per container host, from host paths): a tmpfs holding the
   image skeleton with every bind at its own path. The container host pivots into it.
2. ``build_test_root`` (once per test, inside the host): a copy-on-write overlay whose
   lower layer is the stage's root directory, then every bind again, now taken from the
   stage, plus fresh tmpfs, /dev and devpts mounts. Nothing written there outlives the
   test's mount namespace.

Entries are applied sorted by destination so that a parent (``/tmp``) is mounted
before what goes inside it (a rootdir under ``/tmp``).
"""

from __future__ import annotations

import errno
import os
import stat

from . import paths, syscalls, tiny_init
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

# The mount point the stage tmpfs is attached to in the launcher's private mount
# namespace. Every host path is opened before it is covered (see build_stage).
STAGE_ATTACH = "/tmp"

_STATVFS_TO_MS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: 1024,
    os.ST_NODIRATIME: 2048,
    os.ST_RELATIME: 1 << 21,
}


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


def _locked_flags(path: str) -> int:
    """Flags of the mount at ``path`` that a remount inside a user namespace must keep."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_TO_MS.items() if f_flag & st)


def remount_readonly(target: str, extra: int = 0) -> None:
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | extra | _locked_flags(target)
    syscalls.mount(None, target, None, flags)
    # Mounts that were below the source (e.g. /usr/local on its own filesystem) came
    # along with MS_REC and must be made read-only one by one.
    for sub in _submounts(target):
        syscalls.mount(None, sub, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked_flags(sub))


def _submounts(target: str) -> list[str]:
    prefix = target.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ", 5)[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
    return found


def _bind(source: str, target: str, readonly: bool, extra: int = 0) -> None:
    syscalls.mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        remount_readonly(target, extra)


def _tmpfs(target: str, mode: str, extra: int = 0) -> None:
    syscalls.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra, f"mode={mode}")


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
    notes: list[str] = []
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
    fds: dict[str, int] = {}
    try:
        for entry in entries + source_entries:
            if entry["type"] in ("bind", "dev"):
                try:
                    fds[entry["dst"]] = paths.open_pinned(entry["src"], entry.get("pin"))
                except OSError as exc:
                    if entry not in source_entries:
                        raise
                    notes.append(f"the mount source {entry['src']} is not mounted: {exc.strerror}")
        source_entries = [entry for entry in source_entries if entry["dst"] in fds]
        _tmpfs(STAGE_ATTACH, "755")
        os.lchown(STAGE_ATTACH, *owner)
        lower = _join(STAGE_ATTACH, LOWER)
        _makedirs(lower, owner)
        _tmpfs(lower, "755")
        os.lchown(lower, *owner)
        for entry in ordered(entries + source_entries):
            target = _join(STAGE_ATTACH, entry["dst"])
            kind = entry["type"]
            if not entry["dst"].startswith(SOURCES + "/"):
                _skeleton(lower, entry, fds, owner)
            if kind == "symlink":
                _makedirs(os.path.dirname(target), owner)
                os.symlink(entry["target"], target)
                os.lchown(target, *owner)
            elif kind in ("bind", "dev"):
                fd = fds[entry["dst"]]
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                _mountpoint(target, is_dir, owner)
                readonly = entry.get("ro", kind == "bind")
                if entry.get("idmap") and readonly and userns_fd is not None:
                    try:
                        attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
                        syscalls.idmapped_bind(fd, target, userns_fd,
                                               attrs | (syscalls.MOUNT_ATTR_RDONLY if readonly else 0))
                        continue
                    except OSError as exc:
                        notes.append(f"{entry['src']} is not idmapped ({_fs_type(fd)}: {exc.strerror}): "
                                     "container root reads it as an unprivileged uid; its filesystem needs "
                                     "idmapped mounts (tmpfs: Linux 6.3+), or make it world-readable")
                extra = 0 if kind == "dev" else MS_NOSUID | MS_NODEV
                _bind(f"/proc/self/fd/{fd}", target, readonly, extra)
            elif kind == "tmpfs":
                _makedirs(target, owner)
                _tmpfs(target, entry.get("mode", "755"))
            elif kind in ("proc", "sysfs"):
                # The host keeps the host's /proc and /sys, read-only for /sys (it is in
                # neither a pid nor a network namespace of its own while it builds
                # this); each test mounts fresh ones.
                _makedirs(target, owner)
                syscalls.mount("/" + kind.replace("sysfs", "sys"), target, None, MS_BIND | MS_REC)
                if kind == "sysfs":
                    remount_readonly(target)
            elif kind == "devpts":
                _makedirs(target, owner)
        _makedirs(_join(STAGE_ATTACH, SCRATCH), owner)
        _install_tiny_init(owner)
        syscalls.mount(None, lower, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in fds.values():
            os.close(fd)
    pivot_into(STAGE_ATTACH)
    # The skeleton itself is never written after this: each test writes to its overlay.
    syscalls.mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked_flags("/"))
    return notes


def _install_tiny_init(owner: tuple[int, int]) -> None:
    """The containers' init (tiny_init.py), where the factory spawns it from."""
    program = tiny_init.program()
    if program is None:
        return
    path = _join(STAGE_ATTACH, tiny_init.PATH)
    _makedirs(os.path.dirname(path), owner)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, program)
        os.fchmod(fd, 0o755)  # the umask must not narrow it
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _fs_type(fd: int) -> str:
    """The filesystem type of the mount ``fd`` lies on (from mountinfo), for notes."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            mount_id = next(line.split()[1] for line in f if line.startswith("mnt_id:"))
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[0] == mount_id:
                    return fields[fields.index("-") + 1]
    except (OSError, StopIteration, ValueError):
        pass
    return "unknown filesystem"


def _skeleton(lower: str, entry: dict, fds: dict[str, int], owner: tuple[int, int]) -> None:
    """Mirror an entry's mount point (or symlink) in the lower layer, mounting nothing."""
    target = _join(lower, entry["dst"])
    if os.path.lexists(target):
        return
    if entry["type"] == "symlink":
        _makedirs(os.path.dirname(target), owner)
        os.symlink(entry["target"], target)
        os.lchown(target, *owner)
    elif entry["type"] in ("bind", "dev"):
        _mountpoint(target, stat.S_ISDIR(os.fstat(fds[entry["dst"]]).st_mode), owner)
    else:
        _makedirs(target, owner)


def pivot_into(new_root: str) -> None:
    """Make ``new_root`` the root and detach the old one.

    pivot_root(".", ".") stacks the old root on top of the new one, so no directory
    for it is needed; unmounting "." then removes it.
    """
    os.chdir(new_root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def build_test_root(entries: list[dict], mounts: list[dict]) -> str:
    """Build one test's root under SCRATCH, from the stage the caller sits in.

    Runs in a fresh mount namespace owned by the container user namespace. Returns
    the new root (TEST_ROOT); /proc is mounted later, by the test process.
    """
    syscalls.mount(None, "/", None, MS_REC | syscalls.MS_PRIVATE)
    _tmpfs(SCRATCH, "755")
    upper, work, root = _join(SCRATCH, "upper"), _join(SCRATCH, "work"), TEST_ROOT
    for d in (upper, work, root):
        os.mkdir(d)
    # Overlay layers never include submounts: the binds are bound again below.
    syscalls.mount(
        "overlay", root, "overlay", MS_NOSUID,
        f"lowerdir={LOWER},upperdir={upper},workdir={work},userxattr",
    )
    for entry in ordered(entries + mounts):
        target = _join(root, entry["dst"])
        kind = entry["type"]
        if kind in ("bind", "dev"):
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
        elif kind == "symlink":
            if not os.path.lexists(target):
                _makedirs(os.path.dirname(target))
                os.symlink(entry["target"], target)
        elif kind == "tmpfs":
            _makedirs(target)
            _tmpfs(target, entry.get("mode", "755"))
        elif kind == "devpts":
            _makedirs(target)
            syscalls.mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC,
                           "newinstance,ptmxmode=0666,mode=0620")
            ptmx = _join(os.path.dirname(target), "ptmx")
            if not os.path.lexists(ptmx):
                os.symlink("pts/ptmx", ptmx)
        elif kind == "proc":
            _makedirs(target)
        elif kind == "sysfs":
            _makedirs(target)
            mount_sysfs(root)
    return root


def mount_proc(root: str) -> None:
    """Mount a /proc for the caller's pid namespace."""
    syscalls.mount("proc", _join(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


# Docker's masked and read-only paths: kernel state a container must not read (masked:
# /dev/null over files, an empty read-only tmpfs over directories) or write.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/firmware", "/sys/devices/virtual/powercap",
)
MASKED_GLOBS = ("/sys/devices/system/cpu/cpu*/thermal_throttle",)
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def system_path_masks() -> list[tuple[str, str]]:
    """What mask_system_paths does, worked out once by the host (which sees the same
    kernel): ``(path, how)`` with how "dir" (empty tmpfs), "file" (/dev/null bound
    over it) or "ro" (bound read-only)."""
    import glob

    masks = []
    for path in list(MASKED_PATHS) + [p for pattern in MASKED_GLOBS for p in glob.glob(pattern)]:
        if os.path.isdir(path):
            masks.append((path, "dir"))
        elif os.path.exists(path):
            masks.append((path, "file"))
    masks += [(path, "ro") for path in READ_ONLY_PATHS if os.path.exists(path)]
    return masks


def mask_system_paths(root: str, masks: list | None = None) -> None:
    """Apply the masked and read-only paths under ``root`` (after /proc and /sys)."""
    empty_dir = None  # one empty read-only tmpfs, bound over every masked directory
    for path, how in system_path_masks() if masks is None else masks:
        target = _join(root, path)
        try:
            if how == "dir" and empty_dir is None:
                syscalls.mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               "size=0,mode=0")
                empty_dir = target
            elif how == "dir":
                syscalls.mount(empty_dir, target, None, MS_BIND)
            elif how == "file":
                syscalls.mount(_join(root, "/dev/null"), target, None, MS_BIND)
            else:  # a fresh /proc has nothing mounted below these: no MS_REC, no scan
                syscalls.mount(target, target, None, MS_BIND)
                syscalls.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked_flags(target))
        except FileNotFoundError:  # e.g. no /sys in this image
            continue


def mount_sysfs(root: str) -> None:
    """A read-only /sys of the caller's network namespace."""
    target = _join(root, "/sys")
    syscalls.mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
