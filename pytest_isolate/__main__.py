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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from . import doctor

        return doctor.run(as_json=args.json)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
