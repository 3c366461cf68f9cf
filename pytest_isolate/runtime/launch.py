"""Launcher of a container host: ``python -c <bootstrap> --spec B64 --exec CMD...``.

execnet starts the host with ``popen//python=<launcher>``: it appends the
interpreter's own arguments (``-u -c <bootstrap>``) to our command line, and we
exec them once this single-threaded process has become the container host.

If the container cannot be built, the interpreter is still exec'd, with the reason
in PYTEST_ISOLATE_HOST_ERROR: the remote side then only reports it over the execnet
channel and exits, so the user gets a message instead of a dead gateway.
"""

from __future__ import annotations

import base64
import json
import os
import sys

from . import container

HOST_ERROR_ENV = "PYTEST_ISOLATE_HOST_ERROR"
HOST_NOTES_ENV = "PYTEST_ISOLATE_HOST_NOTES"


def encode_spec(spec: dict) -> str:
    return base64.b64encode(json.dumps(spec).encode()).decode()


def launcher_command(spec: dict, python: str) -> str:
    """The ``python=`` value for an execnet popen spec (it is shell-split)."""
    import shlex

    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bootstrap = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        "from pytest_isolate.runtime.launch import main; main()"
    )
    parts = [python, "-S", "-c", bootstrap, "--spec", encode_spec(spec), "--exec", python]
    return " ".join(shlex.quote(p) for p in parts)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(base64.b64decode(argv[argv.index("--spec") + 1]))
    command = argv[argv.index("--exec") + 1 :]
    try:
        notes = container.enter_host(spec)
        if notes:
            os.environ[HOST_NOTES_ENV] = json.dumps(notes)
    except Exception as exc:  # reported by the remote side, see the module doc
        os.environ[HOST_ERROR_ENV] = describe_error(exc)
    os.execv(command[0], command)
