"""The runtime's system calls seen through the recording double (syscalls.recording()):
the order of mounts and prctls, without touching the kernel. The real-kernel tests
(test_isolation, test_escapes) check what the same calls do.

Paths the code creates (mount points, symlinks, the stage's skeleton) go to a
temporary directory: the module constants naming them are patched there.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

from pytest_isolate.runtime import capabilities, masks as masks_module, mountinfo, rootfs, stage as stage_module, syscalls
from pytest_isolate.runtime.syscalls import (
    MNT_DETACH, MOUNT_ATTR_IDMAP, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, MS_BIND,
    MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
)

RO_REMOUNT = MS_BIND | MS_REMOUNT | MS_RDONLY


def mount(source, target, fstype=None, flags=0, data=None):
    return ("mount", (source, target, fstype, flags, data))


class _AnyFd:
    """Equal to an fd the code under test opened: a number, or /proc/self/fd/N."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) or re.fullmatch(r"/proc/self/fd/\d+", str(other)) is not None


FD = _AnyFd()


# A host image as images.host_image builds it, cut down to one entry of each kind.
IMAGE = [
    {"type": "bind", "dst": "/usr", "src": "/usr", "ro": True},
    {"type": "symlink", "dst": "/bin", "target": "usr/bin"},
    {"type": "bind", "dst": "/etc", "src": "/etc", "ro": True},
    {"type": "proc", "dst": "/proc"},
    {"type": "sysfs", "dst": "/sys"},
    {"type": "tmpfs", "dst": "/tmp", "mode": "1777"},
    {"type": "tmpfs", "dst": "/dev", "mode": "755"},
    {"type": "devpts", "dst": "/dev/pts"},
    {"type": "tmpfs", "dst": "/dev/shm", "mode": "1777"},
    {"type": "dev", "dst": "/dev/null", "src": "/dev/null"},
    {"type": "symlink", "dst": "/dev/fd", "target": "/proc/self/fd"},
]


@pytest.fixture
def test_root(tmp_path, monkeypatch):
    """SCRATCH (with TEST_ROOT in it) and LOWER under tmp_path: (scratch, root)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()  # the double mounts no tmpfs there
    monkeypatch.setattr(rootfs, "SCRATCH", str(scratch))
    monkeypatch.setattr(rootfs, "TEST_ROOT", str(scratch / "root"))
    monkeypatch.setattr(rootfs, "LOWER", str(tmp_path / "lower"))
    return str(scratch), str(scratch / "root")


# -- the seam itself -------------------------------------------------------------------------

def no_new_privs_and_namespaces() -> tuple:
    with open("/proc/self/status") as f:
        flag = next(line for line in f if line.startswith("NoNewPrivs:"))
    return flag, os.readlink("/proc/self/ns/user"), os.readlink("/proc/self/ns/mnt")


def test_recording_replaces_the_kernel_only_inside_the_block():
    real, before = syscalls.kernel, no_new_privs_and_namespaces()
    with pytest.raises(RuntimeError), syscalls.recording() as calls:
        syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
        assert syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1) == 0
        raise RuntimeError
    assert syscalls.kernel is real and isinstance(real, syscalls.Kernel)
    assert calls == [("unshare", (syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS,)),
                     ("prctl", (syscalls.PR_SET_NO_NEW_PRIVS, 1, 0))]
    assert no_new_privs_and_namespaces() == before  # nothing reached the kernel


def test_every_kernel_call_has_a_recorder():
    calls = [name for name in vars(syscalls.Kernel) if not name.startswith("_")]
    assert {"mount", "umount2", "pivot_root", "setns", "unshare", "open_tree", "mount_setattr",
            "move_mount", "prctl", "keyctl", "capset"} <= set(calls)
    assert all(getattr(syscalls.Recording, name) is not getattr(syscalls.Kernel, name) for name in calls)


# -- rootfs: a test's root ---------------------------------------------------------------

def test_build_test_root_mounts_overlay_then_entries_parents_first(test_root):
    scratch, root = test_root
    data_source = os.path.join(os.path.dirname(scratch), "source-of-data")
    os.mkdir(data_source)
    user_mount = {"type": "bind", "dst": "/data", "src": "/home/me/data", "stage_src": data_source, "ro": True}
    with syscalls.recording() as calls:
        assert rootfs.build_test_root(IMAGE, [user_mount]) == root
    locked = mountinfo.locked_flags(root + "/data")
    assert calls == [
        mount(None, "/", None, MS_REC | MS_PRIVATE),
        mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"),
        mount("overlay", root, "overlay", MS_NOSUID,
              f"lowerdir={rootfs.LOWER},upperdir={scratch}/upper,workdir={scratch}/work,userxattr"),
        # depth 1, by name: /bin (a symlink: no mount), /data, /dev, /etc, /proc (later), /sys ...
        mount(data_source, root + "/data", None, MS_BIND | MS_REC),
        mount(None, root + "/data", None, RO_REMOUNT | MS_NOSUID | MS_NODEV | locked),
        mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"),
        mount("/etc", root + "/etc", None, MS_BIND | MS_REC),  # keeps the stage's flags
        mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC),
        mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        mount("/usr", root + "/usr", None, MS_BIND | MS_REC),
        # depth 2: /dev/fd (a symlink), /dev/null, /dev/pts, /dev/shm
        mount("/dev/null", root + "/dev/null", None, MS_BIND | MS_REC),
        mount("devpts", root + "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620"),
        mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ]
    assert os.readlink(root + "/bin") == "usr/bin"
    assert os.readlink(root + "/dev/fd") == "/proc/self/fd"
    assert os.readlink(root + "/dev/ptmx") == "pts/ptmx"
    assert os.path.isfile(root + "/dev/null")  # a file to bind a device onto
    assert os.path.isdir(root + "/proc") and os.path.isdir(root + "/usr")


def test_a_failing_mount_stops_the_build_with_its_description(test_root):
    scratch, root = test_root

    def refuse_overlay(name, args):
        return errno.EPERM if name == "mount" and args[2] == "overlay" else None

    with syscalls.recording(refuse_overlay) as calls, pytest.raises(OSError) as failure:
        rootfs.build_test_root(IMAGE, [])
    assert failure.value.errno == errno.EPERM
    assert str(failure.value) == f"[Errno 1] mount overlay on {root}: Operation not permitted"
    assert calls[-1][1][2] == "overlay" and len(calls) == 3  # nothing after it


def test_an_unknown_entry_type_is_a_value_error_naming_it(test_root):
    with syscalls.recording(), pytest.raises(ValueError, match=r"unknown image entry type 'squashfs' \(on /opt\)"):
        rootfs.build_test_root(IMAGE + [{"type": "squashfs", "dst": "/opt"}], [])
    assert set(rootfs.TYPES) == {"bind", "dev", "symlink", "tmpfs", "devpts", "proc", "sysfs", "overlay", "layers"}


def test_an_overlay_entry_layers_a_stage_directory_inside_the_test_tmp(test_root):
    """What shared fixtures wrote under tmp_path_factory (shared_container.py): after
    the test's own /tmp, an overlay with the host's directory as its lower layer and
    its upper and work directories in the test's scratch."""
    scratch, root = test_root
    shared = {"type": "overlay", "dst": "/tmp/pytest-of-root/pytest-0", "src": "/tmp/pytest-of-root/pytest-0"}
    with syscalls.recording() as calls:
        rootfs.build_test_root(IMAGE, [shared])
    layers = f"{scratch}/layers/tmp/pytest-of-root/pytest-0"
    overlay = mount("overlay", root + "/tmp/pytest-of-root/pytest-0", "overlay", MS_NOSUID | MS_NODEV,
                    f"lowerdir=/tmp/pytest-of-root/pytest-0,upperdir={layers}/upper,workdir={layers}/work,userxattr")
    assert calls.index(overlay) > calls.index(mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                                                    "mode=1777"))
    assert os.path.isdir(layers + "/upper") and os.path.isdir(root + "/tmp/pytest-of-root/pytest-0")
    with pytest.raises(ValueError, match="belongs to a test's root, not an image"):
        rootfs._steps(shared).stage(rootfs._Build("/nonexistent"), shared)


def test_mask_system_paths_mounts_one_empty_tmpfs_and_binds_it_over_other_dirs(tmp_path):
    root = str(tmp_path)
    os.makedirs(root + "/proc/sys")  # statvfs of a read-only path needs it
    masks = [("/proc/kcore", "file"), ("/proc/acpi", "dir"), ("/sys/firmware", "dir"), ("/proc/sys", "ro")]

    def absent(name, args):  # as in an image without /proc/acpi
        return errno.ENOENT if args[1] == root + "/proc/acpi" else None

    with syscalls.recording(absent) as calls:
        masks_module.mask_system_paths(root, masks)
    empty = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    assert calls == [
        mount(root + "/dev/null", root + "/proc/kcore", None, MS_BIND),
        mount("tmpfs", root + "/proc/acpi", "tmpfs", empty, "size=0,mode=0"),  # fails: skipped
        mount("tmpfs", root + "/sys/firmware", "tmpfs", empty, "size=0,mode=0"),
        mount(root + "/proc/sys", root + "/proc/sys", None, MS_BIND),
        mount(None, root + "/proc/sys", None, RO_REMOUNT | mountinfo.locked_flags(root + "/proc/sys")),
    ]
    with syscalls.recording() as calls:
        masks_module.mask_system_paths(root, masks[1:3])
    assert calls[1] == mount(root + "/proc/acpi", root + "/sys/firmware", None, MS_BIND)


# -- rootfs: the stage -------------------------------------------------------------------

def test_build_stage_mounts_the_skeleton_binds_and_idmaps_then_pivots(tmp_path, monkeypatch):
    stage = str(tmp_path / "stage")
    os.mkdir(stage)
    monkeypatch.setattr(stage_module, "STAGE_ATTACH", stage)
    monkeypatch.chdir(tmp_path)  # pivot_into ends in "/": restored after the test
    data = tmp_path / "data"
    data.mkdir()
    entries = [e for e in IMAGE if e["dst"] in ("/usr", "/bin", "/proc", "/sys", "/tmp", "/dev", "/dev/null",
                                                 "/dev/pts")]
    owner = (os.getuid(), os.getgid())
    with syscalls.recording() as calls:
        notes = stage_module.build_stage(entries, [{"src": str(data), "ro": True}], owner, userns_fd=99)
    assert notes == []
    lower, source = stage + rootfs.LOWER, stage + rootfs.source_path(0)
    tmpfs = MS_NOSUID | MS_NODEV
    assert calls == [
        mount(None, "/", None, MS_REC | MS_PRIVATE),
        mount("tmpfs", stage, "tmpfs", tmpfs, "mode=755"),
        mount("tmpfs", lower, "tmpfs", tmpfs, "mode=755"),
        mount("tmpfs", stage + "/dev", "tmpfs", tmpfs, "mode=755"),
        mount("/proc", stage + "/proc", None, MS_BIND | MS_REC),  # the host's, for the host
        mount("/sys", stage + "/sys", None, MS_BIND | MS_REC),
        mount(None, stage + "/sys", None, RO_REMOUNT | mountinfo.locked_flags(stage + "/sys")),
        mount("tmpfs", stage + "/tmp", "tmpfs", tmpfs, "mode=1777"),
        mount(FD, stage + "/usr", None, MS_BIND | MS_REC),
        mount(None, stage + "/usr", None, RO_REMOUNT | tmpfs | mountinfo.locked_flags(stage + "/usr")),
        # depth 2: the read-only mount source is idmapped, then /dev/null (not read-only)
        ("open_tree", (FD, syscalls.OPEN_TREE_CLONE | os.O_CLOEXEC | syscalls.AT_EMPTY_PATH
                       | syscalls.AT_RECURSIVE)),
        ("mount_setattr", (0, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_IDMAP, 99)),
        ("move_mount", (0, source)),
        ("close", (0,)),
        mount(FD, stage + "/dev/null", None, MS_BIND | MS_REC),
        mount(None, lower, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV),
        ("pivot_root", (".", ".")),
        ("umount2", (".", MNT_DETACH)),
        mount(None, "/", None, RO_REMOUNT | mountinfo.locked_flags("/")),
    ]
    # The skeleton mirrors the image's entries, not the mount sources.
    assert os.readlink(lower + "/bin") == "usr/bin" and os.readlink(stage + "/bin") == "usr/bin"
    assert os.path.isfile(lower + "/dev/null") and os.path.isdir(lower + "/dev/pts")
    assert sorted(os.listdir(lower)) == ["bin", "dev", "proc", "sys", "tmp", "usr"]
    assert os.path.isdir(source)


def test_build_stage_falls_back_to_a_plain_bind_with_a_note_when_idmapping_fails(tmp_path, monkeypatch):
    stage = str(tmp_path / "stage")
    os.mkdir(stage)
    monkeypatch.setattr(stage_module, "STAGE_ATTACH", stage)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()

    def no_idmap(name, args):
        return errno.EINVAL if name == "mount_setattr" else None

    with syscalls.recording(no_idmap) as calls:
        notes = stage_module.build_stage([], [{"src": str(tmp_path / "data"), "ro": True}],
                                   (os.getuid(), os.getgid()), userns_fd=99)
    assert len(notes) == 1 and notes[0].startswith(f"{tmp_path / 'data'} is not idmapped (")
    assert "Invalid argument" in notes[0]
    names = [name for name, _ in calls]
    # The tree is closed, then the source is bound and made read-only the ordinary way.
    assert names[3:8] == ["open_tree", "mount_setattr", "close", "mount", "mount"]
    assert "move_mount" not in names
    assert calls[7][1][3] & MS_RDONLY and calls[7][1][1] == stage + rootfs.source_path(0)


# -- capabilities ------------------------------------------------------------------------

def test_drop_all_empties_the_bounding_set_before_capset_and_raises_kept_ambient_last():
    net_admin = capabilities.NUMBERS["CAP_NET_ADMIN"]
    with syscalls.recording() as calls:
        capabilities.drop_all({"CAP_NET_ADMIN"})
    bounding = [("prctl", (syscalls.PR_CAPBSET_DROP, cap, 0))
                for cap in range(capabilities.last_cap() + 1) if cap != net_admin]
    mask = 1 << net_admin
    assert calls == bounding + [
        ("prctl", (syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL, 0)),
        ("capset", (mask, mask, mask)),
        ("prctl", (syscalls.PR_CAP_AMBIENT, capabilities.PR_CAP_AMBIENT_RAISE, net_admin)),
    ]


def test_drop_all_without_keep_drops_every_capability_and_raises_none():
    with syscalls.recording() as calls:
        capabilities.drop_all()
    drops = [args[1] for name, args in calls if args[0] == syscalls.PR_CAPBSET_DROP]
    assert drops == list(range(capabilities.last_cap() + 1))
    assert calls[len(drops):] == [("prctl", (syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL, 0)),
                                  ("capset", (0, 0, 0))]


def test_set_no_new_privs_is_one_prctl():
    with syscalls.recording() as calls:
        capabilities.set_no_new_privs()
    assert calls == [("prctl", (syscalls.PR_SET_NO_NEW_PRIVS, 1, 0))]


def test_a_refused_capset_raises_before_any_ambient_capability_is_raised():
    with syscalls.recording(lambda name, args: errno.EPERM if name == "capset" else None) as calls, \
            pytest.raises(PermissionError, match=r"^\[Errno 1\] capset: Operation not permitted$"):
        capabilities.drop_all({"CAP_NET_ADMIN"})
    assert calls[-1][0] == "capset"


def test_a_failed_move_mount_still_closes_the_tree_and_names_the_target():
    with syscalls.recording(lambda name, args: errno.ENOENT if name == "move_mount" else None) as calls, \
            pytest.raises(FileNotFoundError, match=r"^\[Errno 2\] move_mount to /x: No such file or directory$"):
        syscalls.idmapped_bind(7, "/x", 8, MOUNT_ATTR_RDONLY)
    assert [name for name, _ in calls] == ["open_tree", "mount_setattr", "move_mount", "close"]


# -- /proc/self/mountinfo ------------------------------------------------------------------

SAMPLE = """\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/l,upperdir=/u
36 22 98:0 /mnt1 /mnt/a\\040b rw,noatime shared:1 master:2 - ext3 /dev/root rw,errors=continue
37 36 0:40 / /mnt/a\\040b/sub rw - tmpfs none rw
40 22 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
41 22 0:34 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
42 22 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
43 22 0:36 / /sys/fs/cgroup/memory2 rw - cgroup cgroup rw,memory
"""


def test_mountinfo_lines_are_split_into_their_fields():
    mounts = [mountinfo.parse_line(line) for line in SAMPLE.splitlines(keepends=True)]
    m = mounts[1]
    assert (m.mount_id, m.parent_id, m.root, m.mount_point) == (36, 22, "/mnt1", "/mnt/a b")
    assert m.options == ("rw", "noatime") and m.optional == ("shared:1", "master:2")
    assert (m.fs_type, m.source, m.super_options) == ("ext3", "/dev/root", ("rw", "errors=continue"))
    assert mounts[2].optional == () and mounts[2].source == "none"
    tab = mountinfo.parse_line("5 1 0:1 /a\\011b /c\\134d\\012e rw - tmpfs a\\040b rw")
    assert (tab.root, tab.mount_point, tab.source) == ("/a\tb", "/c\\d\ne", "a b")


def test_mountinfo_helpers_answer_what_the_runtime_asks(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(SAMPLE)
    mounts = mountinfo.read(str(path))
    assert mountinfo.below("/mnt/a b", mounts) == ["/mnt/a b/sub"]
    assert mountinfo.below("/", mounts)[0] == "/mnt/a b"  # strictly below: not "/" itself
    assert mountinfo.fs_type_of(37, mounts) == "tmpfs" and mountinfo.fs_type_of(99, mounts) is None
    assert mountinfo.cgroup_mounts(("memory", "cpu", "pids"), mounts) == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct", "memory": "/sys/fs/cgroup/memory", "": "/sys/fs/cgroup/unified"}


def test_this_process_mountinfo_parses():
    mounts = mountinfo.read()
    assert any(m.mount_point == "/proc" and m.fs_type == "proc" for m in mounts)
    assert len({m.mount_id for m in mounts}) == len(mounts)


def test_build_stage_of_an_image_overlays_its_layers_and_binds_them_for_the_test_roots(tmp_path, monkeypatch):
    """An OCI image (a ``layers`` entry): the stage's root is an overlay of its layers
    (fds opened before the stage tmpfs covers anything), each layer bound read-only at
    LAYERS/n, and the launcher pivots into that overlay; a dir: image's layer is
    idmapped first, as root."""
    stage = str(tmp_path / "stage")
    os.mkdir(stage)
    monkeypatch.setattr(stage_module, "STAGE_ATTACH", stage)
    monkeypatch.chdir(tmp_path)
    layers = [str(tmp_path / name) for name in ("top", "base")]
    for layer in layers:
        os.mkdir(layer)
    entries = [{"type": "layers", "dst": "/", "layers": layers, "idmap": True},
               {"type": "tmpfs", "dst": "/tmp", "mode": "1777"}]
    owner = (os.getuid(), os.getgid())
    with syscalls.recording() as calls:
        stage_module.build_stage(entries, [], owner, userns_fd=99)
    root = stage + "/image"
    names = [name for name, _ in calls]
    # As root with idmap: each layer is an idmapped bind before the overlay uses it.
    assert names[:2] == ["mount", "mount"] and names[2:6] == ["open_tree", "mount_setattr", "move_mount", "close"]
    assert calls[4] == ("move_mount", (0, stage + "/.idmapped/0"))
    overlay = next(args for name, args in calls if name == "mount" and args[2] == "overlay")
    assert overlay[1] == root and overlay[4].startswith("lowerdir=/proc/self/fd/")
    assert overlay[4].count(":") == 1 and overlay[4].endswith(f",upperdir={stage}/.image-upper,"
                                                              f"workdir={stage}/.image-work,userxattr")
    binds = [args[1] for name, args in calls if name == "mount" and args[3] == MS_BIND | MS_REC]
    assert binds == [root + rootfs.LAYERS + "/0", root + rootfs.LAYERS + "/1"]
    assert calls.index(("pivot_root", (".", "."))) > names.index("move_mount")
    assert mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") in calls


def test_a_test_root_of_an_image_stacks_the_skeleton_on_its_layers(test_root):
    scratch, root = test_root
    with syscalls.recording() as calls:
        rootfs.build_test_root([{"type": "layers", "dst": "/", "layers": ["/a", "/b", "/c"]}], [])
    assert calls[2] == mount("overlay", root, "overlay", MS_NOSUID,
                             f"lowerdir={rootfs.LOWER}:{rootfs.LAYERS}/0:{rootfs.LAYERS}/1:{rootfs.LAYERS}/2,"
                             f"upperdir={scratch}/upper,workdir={scratch}/work,userxattr")


def test_a_deep_image_names_its_layers_from_their_directory(test_root):
    """Mount options are copied into one page: the lower directories of a deep image
    are named relative to LAYERS, and the overlay is mounted from there."""
    scratch, root = test_root
    with syscalls.recording() as calls:
        rootfs.build_test_root([{"type": "layers", "dst": "/", "layers": [f"/l{i}" for i in range(300)]}], [])
    relative = ":".join(["../" + rootfs.LOWER.lstrip("/")] + [str(i) for i in range(300)])
    assert calls[2] == ("mount_in", (rootfs.LAYERS, "overlay", root, "overlay", MS_NOSUID,
                                     f"lowerdir={relative},upperdir={scratch}/upper,workdir={scratch}/work,userxattr"))


def test_more_layers_than_overlayfs_stacks_is_an_error_that_says_so(test_root):
    with syscalls.recording() as calls, pytest.raises(OSError, match="501 layers; overlayfs stacks at most 500"):
        rootfs.build_test_root([{"type": "layers", "dst": "/", "layers": [f"/l{i}" for i in range(500)]}], [])
    assert not [args for name, args in calls if args[:1] == ("overlay",) or args[1:2] == ("overlay",)]
