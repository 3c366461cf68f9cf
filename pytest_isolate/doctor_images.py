"""The doctor's image check: can this machine run tests in OCI images?

What an image needs beyond the host image: overlayfs whiteouts (0/0 character
devices, made without privileges since Linux 5.8) and opaque directories
(``user.overlay.opaque``, read with ``userxattr``) honoured in a user namespace, a
writable image store, and something that reads zstd layers. Rootless, it also says
whether image owners are kept (a subordinate range through newuidmap, subids.py)
or every file belongs to container root, and why.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from .runtime import subids, syscalls, user_ns


def probe_layers() -> None:
    """In a throwaway child: two lower layers, the top one with a whiteout and an
    opaque directory, must read as one image."""
    user_ns.enter_self_mapped()
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=755")
    for d in ("base/etc", "base/var/cache", "top/var/cache", "upper", "work", "merged"):
        os.makedirs(f"/tmp/{d}")
    for path in ("base/etc/gone", "base/var/cache/old", "top/var/cache/new"):
        with open(f"/tmp/{path}", "w") as f:
            f.write("x")
    os.makedirs("/tmp/top/etc")
    os.mknod("/tmp/top/etc/gone", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
    os.setxattr("/tmp/top/var/cache", "user.overlay.opaque", b"y")
    syscalls.mount("overlay", "/tmp/merged", "overlay", 0,
                   "lowerdir=/tmp/top:/tmp/base,upperdir=/tmp/upper,workdir=/tmp/work,userxattr")
    if os.path.lexists("/tmp/merged/etc/gone"):
        raise OSError(errno.EIO, "a whiteout in a lower layer does not hide the file below it")
    if sorted(os.listdir("/tmp/merged/var/cache")) != ["new"]:
        raise OSError(errno.EIO, "an opaque directory (user.overlay.opaque) does not hide the layers below")


def zstd_reader() -> str | None:
    try:
        import compression.zstd  # noqa: F401  # Python 3.14
        return "Python's compression.zstd"
    except ImportError:
        pass
    try:
        import zstandard  # noqa: F401
        return "the zstandard package"
    except ImportError:
        pass
    return "the zstd program" if shutil.which("zstd") else None


def check_images(in_child, result, ok: str, warn: str, missing: str):
    from .oci import store as store_module

    failure = in_child(probe_layers)
    if failure is not None:
        return result("images", missing, failure[1],
                      "tests cannot run in OCI images here (the host image works)",
                      "overlayfs with userxattr whiteouts and opaque directories needs Linux 5.11+; "
                      "unprivileged whiteouts need 5.8+", {"error": failure[1]})
    root = store_module.default_root()
    try:
        images = store_module.for_this_user().images() if os.path.isdir(root) else []  # made on first use
        where = f"store {root} ({len(images)} image{'' if len(images) == 1 else 's'})"
    except OSError as exc:
        return result("images", warn, f"layer whiteouts work, but the image store {root} is not usable: "
                      f"{exc.strerror}", "images cannot be pulled or run",
                      "set PYTEST_ISOLATE_CACHE to a writable directory", {"store": root})
    zstd = zstd_reader()
    details = {"store": root, "images": len(images), "zstd": zstd}
    if os.geteuid() == 0:
        owner = "files mapped into the containers' range"
    else:  # rootless: the subordinate range decides whether image owners survive
        mapping = subids.rootless_mapping()
        owner = mapping.describe()
        details["ownership"] = {"kept": mapping.ranged, "uids": mapping.uids, "gids": mapping.gids,
                                "why_not": mapping.why_not}
    if zstd is None:
        return result("images", warn, f"layer whiteouts and opaque directories work; {where}; no zstd reader",
                      "images with zstd layers cannot be unpacked (gzip and plain ones can)",
                      "apt install zstd, or pip install zstandard", details)
    return result("images", ok, f"layer whiteouts and opaque directories work; {where}, {owner}; zstd via {zstd}",
                  details=details)
