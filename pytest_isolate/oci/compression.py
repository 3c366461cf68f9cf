"""Layer blobs' compression, told by their magic bytes (media types lie): gzip,
zstd (Python 3.14's compression.zstd, the zstandard package or the zstd program) or
none."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import subprocess
import tempfile
from typing import BinaryIO, Iterator

_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def decompressed(stream: BinaryIO) -> Iterator[BinaryIO]:
    """The uncompressed tar of a layer blob, by its magic bytes (media types lie)."""
    head = stream.read(4)
    rest = _Prefixed(head, stream)
    if head[:2] == _GZIP:
        return contextlib.closing(gzip.GzipFile(fileobj=rest, mode="rb"))
    if head == _ZSTD:
        return _zstd(rest)
    return contextlib.nullcontext(rest)


class _Prefixed:
    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
            return data
        return self.stream.read(n)


@contextlib.contextmanager
def _zstd(stream) -> Iterator[BinaryIO]:
    try:
        from compression import zstd  # Python 3.14
        with zstd.ZstdFile(stream) as f:
            yield f
        return
    except ImportError:
        pass
    try:
        import zstandard
        yield zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        return
    except ImportError:
        pass
    if not shutil.which("zstd"):
        raise _store_error("a zstd layer needs Python 3.14, the zstandard package or the zstd program "
                         "(Debian: apt install zstd)")
    # The zstd program, fed from a thread-free pipe pair: its stdin from a temp file.
    with tempfile.TemporaryFile() as spool:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            spool.write(chunk)
        spool.seek(0)
        process = subprocess.Popen(["zstd", "-dc"], stdin=spool, stdout=subprocess.PIPE)
        try:
            yield process.stdout
        finally:
            process.stdout.close()
            if process.wait() != 0:
                raise _store_error("zstd could not decompress the layer")


def _store_error(message: str) -> Exception:
    from .store import StoreError  # the store's error: callers catch that one

    return StoreError(message)
