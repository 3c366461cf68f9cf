"""Snapshots of service containers, in the factory (services_snapshot.py is the host's side).

A snapshot is the upper directory of one service container, the "template": the
factory keeps it in a tmpfs of its own mount namespace (rootfs.SNAPSHOTS, mounted
there at the first snapshot) instead of the container's scratch tmpfs, so it
outlives the container. Each "copy" stacks it as the top lower layer of its
overlay under a fresh upper directory of its own: it starts from the template's
state and writes nothing back. Whiteouts and opaque directories the template left
(user.overlay.* xattrs: every overlay here is mounted with userxattr) are valid
lower-layer content.

Nothing else holds the tmpfs: it ends with the factory, which dies with the
container host, however the run ends.
"""

from __future__ import annotations

import errno
import os
import re
import stat

from . import rootfs

_NAME = re.compile(r"^[0-9a-f]{16,64}$")
_ROLES = ("template", "copy")
_mounted: list[bool] = []


def prepare(snapshot: dict) -> None:
    """Before a template's or a copy's container, in the factory's own mount
    namespace: check the request, mount the tmpfs once, and give a template fresh
    upper and work directories (a failed template's are removed first)."""
    name, role = snapshot.get("name"), snapshot.get("role")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or role not in _ROLES:
        raise ValueError(f"a bad snapshot request: {snapshot!r}")
    if not _mounted:
        rootfs._tmpfs(rootfs.SNAPSHOTS, "700")
        _mounted.append(True)
    kept = rootfs._join(rootfs.SNAPSHOTS, name)
    if role == "copy":
        if not os.path.isdir(rootfs._join(kept, "upper")):
            raise OSError(errno.ENOENT, f"the snapshot {name} is gone")
        return
    if os.path.lexists(kept):
        _remove(kept)
    for path in (kept, rootfs._join(kept, "upper"), rootfs._join(kept, "work")):
        os.mkdir(path, 0o755)


def _remove(path: str) -> None:
    """rm -r, without following symlinks; overlayfs leaves its work directory's
    own directories with mode 000, so each directory is opened up first."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    for entry in os.listdir(path):
        _remove(os.path.join(path, entry))
    os.rmdir(path)
