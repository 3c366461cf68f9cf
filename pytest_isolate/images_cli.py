"""``python -m pytest_isolate pull | images | prune``: the image store from the shell
(e.g. ``pull`` as a CI step before the tests)."""

from __future__ import annotations

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
    if ref.transport in ("host", "dir"):
        print(f"{ref}: nothing to pull (it is used where it is)")
        return 0
    show = not args.quiet and sys.stderr.isatty()
    started = time.monotonic()

    def progress(what: str, done: int, total: int) -> None:
        if show:
            print(f"\r{what}", end="", file=sys.stderr, flush=True)

    try:
        record = local.import_image(ref, _store(args), progress)
    except (local.ImageError, store.StoreError, OSError) as exc:
        if show:
            print(file=sys.stderr)
        print(f"pytest-isolate pull: {exc}", file=sys.stderr)
        return 1
    if show:
        print(file=sys.stderr)
    if not args.quiet:
        print(f"{record['reference']}: {len(record['layers'])} layers, config {record['config'][:19]}, "
              f"in {time.monotonic() - started:.1f}s")
    return 0


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
