"""Unpacking one layer into a directory of its own, safely.

A layer is untrusted input. Python's ``tarfile.extract*`` is never used: its filters
refuse what real images need (absolute symlinks) or clear setuid bits, and were
bypassed repeatedly (CVE-2024-12718, CVE-2025-4138/4330/4517/4435). tarfile only
parses headers here; every file operation is ours, relative to a directory fd and
never following a symlink:

- names: a leading ``./`` is dropped; absolute names, ``..`` and empty components
  are refused;
- parents are walked component by component with O_NOFOLLOW | O_DIRECTORY inside
  the layer's own directory: a symlink planted by an earlier member is never
  written through (CVE-2021-29136 class); missing parents are made (the image root's, 0755);
- the root entry (``./``) must stay a directory;
- hardlinks must name a file already unpacked in this layer, walked the same way;
- device nodes are made only where the kernel lets us (else refused, naming them);
- whiteouts become overlayfs whiteouts (a 0/0 character device, allowed without
  privileges since Linux 5.8) and opaque directories the ``user.overlay.opaque``
  xattr that overlayfs reads with ``userxattr``, which every test root uses: each
  layer stays a directory of its own, stacked as an overlay lower layer;
- no extended attributes are applied (file capabilities are dropped); setuid bits
  stay, inert under nosuid and no_new_privs;
- the uncompressed size is capped (a decompression bomb stops at the cap) and the
  stream is hashed: the result is the layer's diff_id, which the caller checks.

Errors are ``LayerError`` naming the member and why; the caller adds the image and
the layer digest and removes the half-made directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import time
from typing import BinaryIO, Callable

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"
DEFAULT_MAX_BYTES = 32 << 30
_CHUNK = 1 << 20
# (uid, gid) of the image -> what to chown to, or None to leave the unpacker's own.
Owner = Callable[[int, int], "tuple[int, int] | None"]


class LayerError(Exception):
    """A layer that cannot be unpacked safely; the message names the member."""


class _Hashing:
    """The uncompressed stream, hashed and capped as tarfile reads it."""

    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self.stream, self.max_bytes = stream, max_bytes
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n is not None and n >= 0 else _CHUNK)
        self.size += len(data)
        if self.size > self.max_bytes:
            raise LayerError(f"the layer unpacks to more than {self.max_bytes} bytes (a decompression bomb?)")
        self.hash.update(data)
        return data

    def drain(self) -> None:
        """The rest of the stream (tar padding after the end blocks) counts in the diff_id."""
        while self.read(_CHUNK):
            pass


def _components(name: str, member: str) -> list[str]:
    """The normalised path components of a member name; [] is the root itself."""
    if name.startswith("/"):
        raise LayerError(f"{member!r} has an absolute name")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    parts = name.split("/") if name not in ("", ".") else []
    for part in parts:
        if part in ("", ".", ".."):
            raise LayerError(f"{member!r} has a {part!r} component" if part else f"{member!r} has an empty component")
    return parts


class _Layer:
    def __init__(self, root: str, owner: Owner | None) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.owner = owner
        self.directories: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.files: set[tuple[str, ...]] = set()  # regular files unpacked here (hardlink targets)

    def close(self) -> None:
        os.close(self.root_fd)

    def parent(self, parts: list[str], member: str, create: bool = True) -> int:
        """An fd of the directory holding ``parts[-1]``, walked without symlinks."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise LayerError(f"{member!r}: {'/'.join(parts[:i + 1])} does not exist in this layer") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    # A parent no member names is the image root's, 0755, as containerd makes
                    # it (else it would be this unpacker's, a stranger to the container).
                    self.directories.setdefault(tuple(parts[:i + 1]), _implicit_directory(parts[:i + 1]))
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise LayerError(f"{member!r} goes through {'/'.join(parts[:i + 1])}, which is not a "
                                         "directory in this layer (a symlink planted to write elsewhere?)") from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def clear(self, fd: int, name: str, member: str, keep_directory: bool = False) -> None:
        """Make room for a new entry: a later member replaces an earlier one (not a directory)."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_directory:
                return
            raise LayerError(f"{member!r} would replace a directory of this layer")
        os.unlink(name, dir_fd=fd)

    def chown(self, name: str, fd: int, info: tarfile.TarInfo) -> None:
        ids = self.owner(info.uid, info.gid) if self.owner else None
        if ids is not None:
            os.chown(name, *ids, dir_fd=fd, follow_symlinks=False)

    def apply(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        member = info.name
        parts = _components(info.name, member)
        if not parts:  # the root of the layer
            if not info.isdir():
                raise LayerError(f"{member!r} would change the root's type to {_kind(info)}")
            self.directories[()] = info
            return
        base = parts[-1]
        if base == OPAQUE:
            fd = self.parent(parts, member)
            try:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
                # Whiteouts there are redundant now, and overlayfs would list them.
                for name in os.listdir(fd):
                    if _is_whiteout(name, fd):
                        os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)
            return
        if base.startswith(WHITEOUT):
            hidden = base[len(WHITEOUT):]
            if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT):
                raise LayerError(f"{member!r} is not a valid whiteout")
            fd = self.parent(parts, member)
            try:
                if not _exists(hidden, fd) and not _is_opaque(fd):  # this layer's own file stays
                    os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
            except PermissionError:
                raise LayerError(f"{member!r}: this kernel refuses overlay whiteouts here") from None
            finally:
                os.close(fd)
            return
        fd = self.parent(parts, member)
        try:
            self._entry(tar, info, tuple(parts), fd, base, member)
        finally:
            os.close(fd)

    def _entry(self, tar, info, parts, fd, base, member) -> None:
        if info.isdir():
            self.clear(fd, base, member, keep_directory=True)
            try:
                os.mkdir(base, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            self.directories[parts] = info  # mode, owner and time last: it may be read-only
            return
        self.clear(fd, base, member)
        if info.isreg():
            out = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                source = tar.extractfile(info)
                remaining = info.size
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise LayerError(f"{member!r} is truncated")
                    os.write(out, chunk)
                    remaining -= len(chunk)
            finally:
                os.close(out)
            self.files.add(parts)
        elif info.issym():
            os.symlink(info.linkname, base, dir_fd=fd)
        elif info.islnk():
            target = _components(info.linkname, member)
            if tuple(target) not in self.files:
                raise LayerError(f"{member!r} is a hardlink to {info.linkname!r}, which is not a file of this layer")
            source_fd = self.parent(target, member, create=False)
            try:
                os.link(target[-1], base, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(source_fd)
            self.files.add(parts)
            return  # the same inode: its owner and mode are the target's
        elif info.ischr() or info.isblk() or info.isfifo():
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK if info.isblk() else stat.S_IFIFO
            try:
                os.mknod(base, kind | 0o600, os.makedev(info.devmajor, info.devminor), dir_fd=fd)
            except PermissionError:
                raise LayerError(f"{member!r} is a {_kind(info)}, which cannot be made here "
                                 "(device nodes need root)") from None
        else:
            raise LayerError(f"{member!r} has an unknown type {info.type!r}")
        self.chown(base, fd, info)
        if not info.issym():
            os.chmod(base, info.mode & 0o7777, dir_fd=fd)  # after chown, which clears setuid
        os.utime(base, (info.mtime, info.mtime), dir_fd=fd, follow_symlinks=False)

    def finish_directories(self) -> None:
        """Owners, modes and times of directories, deepest first (a read-only parent
        would have refused its children)."""
        for parts in sorted(self.directories, key=len, reverse=True):
            info = self.directories[parts]
            if not parts:
                fd, name = os.dup(self.root_fd), "."
            else:
                fd, name = self.parent(list(parts), info.name, create=False), parts[-1]
            try:
                self.chown(name, fd, info)
                if parts:
                    os.chmod(name, info.mode & 0o7777, dir_fd=fd)
                else:
                    os.fchmod(fd, info.mode & 0o7777)
                os.utime(name, (info.mtime, info.mtime), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)


def _implicit_directory(parts: list[str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo("/".join(parts))
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, 0, 0, int(time.time())
    return info


def _is_whiteout(name: str, dir_fd: int) -> bool:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _kind(info: tarfile.TarInfo) -> str:
    for test, name in ((info.isreg, "file"), (info.isdir, "directory"), (info.issym, "symlink"),
                       (info.islnk, "hardlink"), (info.ischr, "character device"), (info.isblk, "block device"),
                       (info.isfifo, "fifo")):
        if test():
            return name
    return f"type {info.type!r}"


def unpack_layer(stream: BinaryIO, root: str, owner: Owner | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, int]:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``root``.
    Returns (diff_id, uncompressed size). LayerError when a member is refused."""
    hashing = _Hashing(stream, max_bytes)
    layer = _Layer(root, owner)
    members = 0
    try:
        try:
            with tarfile.open(fileobj=hashing, mode="r|", format=tarfile.PAX_FORMAT) as tar:
                for info in tar:
                    members += 1
                    try:
                        layer.apply(tar, info)
                    except OSError as exc:
                        raise LayerError(f"{info.name!r}: {exc.strerror or exc}") from None
        except tarfile.ReadError as exc:
            # umoci writes layers without the end-of-archive blocks: tolerated once a
            # member was read; the diff_id still checks every byte.
            if members == 0:
                raise LayerError(f"not a tar archive ({exc})") from None
        layer.finish_directories()
        hashing.drain()
    finally:
        layer.close()
    return "sha256:" + hashing.hash.hexdigest(), hashing.size
