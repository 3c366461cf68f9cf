"""Command line: ``python -m pytest_isolate <command>``."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_isolate",
        description="Tools for pytest-isolate, which runs pytest tests in Linux containers.",
    )
    parser.add_argument("--version", action="version", version=f"pytest-isolate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="report what this host offers pytest-isolate and what is missing",
        description="Check user namespaces, overlayfs, cgroups, seccomp, Landlock and the "
                    "Python interpreter. Exit status 0 when basic isolation (user namespaces "
                    "and overlayfs) works, 1 otherwise.",
    )
    doctor.add_argument("--json", action="store_true", help="print machine-readable results")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", metavar="DIR", help="the image store (default: $PYTEST_ISOLATE_CACHE, "
                       "else $XDG_CACHE_HOME/pytest-isolate, else ~/.cache/pytest-isolate)")
    pull = commands.add_parser("pull", parents=[cache], help="fill the image store with an image",
                               description="Read IMAGE (docker://REFERENCE, oci:PATH[:TAG] or "
                                           "docker-archive:PATH[:NAME:TAG]) into the store: every blob verified, "
                                           "every layer unpacked safely.")
    pull.add_argument("image", metavar="IMAGE")
    pull.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append",
                      help="a registry reached over plain http or with an unverified certificate (repeatable; "
                           "loopback registries may use plain http anyway)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress")
    commands.add_parser("images", parents=[cache], help="list the images in the store and their sizes")
    commands.add_parser("prune", parents=[cache], help="remove the layers and blobs no image uses, and "
                        "what interrupted pulls left")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from . import doctor

        return doctor.run(as_json=args.json)
    if args.command in ("pull", "images", "prune"):
        from . import images_cli

        return getattr(images_cli, args.command)(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
