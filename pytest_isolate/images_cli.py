"""``python -m pytest_isolate pull | images | prune``: the image store from the shell
(e.g. ``pull`` as a CI step before the tests)."""

from __future__ import annotations

import re
import shutil
import sys
import time

from .limits import human
from .oci import local, reference, store


def _store(args) -> store.Store:
    return store.for_this_user(args.cache)


def pull(args) -> int:
    try:
        ref = reference.parse(args.image)
    except reference.ReferenceError as exc:
        print(f"pytest-isolate pull: {exc}", file=sys.stderr)
        return 2
    insecure = []
    for value in args.insecure_registry or []:
        try:
            insecure.append(reference.parse_registry_host(value))
        except reference.ReferenceError as exc:
            print(f"pytest-isolate pull: --insecure-registry: {exc}", file=sys.stderr)
            return 2
    if ref.transport in ("host", "dir"):
        print(f"{ref}: nothing to pull (it is used where it is)")
        return 0
    show = not args.quiet and sys.stderr.isatty()
    started = time.monotonic()
    progress = _Progress(str(ref)) if show else None
    try:
        record = local.import_image(ref, _store(args), progress, tuple(insecure))
    except (local.ImageError, store.StoreError, OSError) as exc:
        if progress:
            progress.end(failed=True)
        print(f"pytest-isolate pull: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{record['reference']}: {len(record['layers'])} layers, config {record['config'][:19]}, "
              f"in {time.monotonic() - started:.1f}s")
    return 0


class _Progress:
    """docker pull's display: one line per layer, rewritten in place while it downloads
    (bytes and rate), left as it ended ("done" or "already present")."""

    def __init__(self, reference: str) -> None:
        self.reference, self.line, self.bytes, self.started = reference, None, 0, 0.0

    def __call__(self, what: str, done: int, total: int, bytes_done: int | None = None,
                 bytes_total: int | None = None) -> None:
        label = re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]+", r"\1", what.replace(f" of {self.reference}", ""))
        if bytes_done is None:
            self.end()
            if done < total:
                self.line, self.bytes, self.started = label, 0, time.monotonic()
                self.show("")
            return
        self.bytes = bytes_done
        rate = bytes_done / max(time.monotonic() - self.started, 1e-3)
        self.show(f"{human(bytes_done)}" + (f" / {human(bytes_total)}" if bytes_total else "") +
                  f"  {human(rate)}/s")

    def show(self, state: str) -> None:
        width = shutil.get_terminal_size().columns - 1
        print(f"\r\x1b[K{f'{self.line}  {state}'[:width]}", end="", file=sys.stderr, flush=True)

    def end(self, failed: bool = False) -> None:
        if self.line is not None:
            self.show("failed" if failed else f"done, {human(self.bytes)}" if self.bytes else "already present")
            print(file=sys.stderr, flush=True)
            self.line = None


def images(args) -> int:
    the_store = _store(args)
    sizes = the_store.layer_sizes()
    records = the_store.images()
    if not records:
        print(f"no images in {the_store.root}")
        return 0
    width = max(len(r["reference"]) for r in records)
    print(f"{'IMAGE':{width}}  LAYERS  SIZE       CONFIG")
    for record in records:
        layers = [d for d in record.get("layers", []) if isinstance(d, str)]
        size = sum(sizes.get(d, 0) for d in layers)
        missing = "" if all(d in sizes for d in layers) else "  (layers missing: pull again)"
        print(f"{record['reference']:{width}}  {len(layers):6}  {human(size):9}  {str(record.get('config'))[7:19]}"
              f"{missing}")
    print(f"store: {the_store.root}, {human(sum(sizes.values()))} in {len(sizes)} layers")
    return 0


def prune(args) -> int:
    the_store = _store(args)
    removed, freed = the_store.prune()
    print(f"removed {removed} unused entr{'y' if removed == 1 else 'ies'} from {the_store.root}, freed {human(freed)}")
    return 0
