"""Registry credentials as Docker and podman keep them: the auth files, and the
credential helpers they name (``docker-credential-NAME get``).

In each file, in order (Docker's): ``credHelpers`` for the registry, then
``credsStore``, then ``auths``; a helper that has nothing for the registry lets the
lookup go on. The first file with credentials wins. What a helper prints is capped
and validated like anything else from outside.
"""

from __future__ import annotations

import base64
import json
import os
import re
import selectors
import shutil
import subprocess
import time

from . import local
from .reference import DOCKER_HUB
from .store import MAX_MANIFEST

HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")
HUB_SERVER = "https://index.docker.io/v1/"  # what Docker asks helpers for, for Docker Hub
HELPER_TIMEOUT = 60.0  # a helper may unlock a keyring
MAX_HELPER_OUTPUT = 64 << 10
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def auth_files() -> list[str]:
    """Where credentials are looked for, in this order (podman's, then Docker's)."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(os.path.join(os.path.expanduser("~"), ".docker", "config.json"))
    return files


def _key(key: str) -> str:
    """An ``auths`` key as host[:port][/path]: Docker writes ``https://host/v1/`` too."""
    key = re.sub(r"^[a-z]+://", "", key.strip().lower()).rstrip("/")
    return re.sub(r"/v[12]$", "", key)


def credentials(registry: str, name: str) -> tuple[tuple[str, str] | None, str | None]:
    """((user, password), where they came from) for ``registry/name``, or (None, None).
    ImageError when a file names a helper that cannot answer."""
    hosts = HUB_KEYS if registry == DOCKER_HUB else (registry.lower(),)
    for path in auth_files():
        try:
            with open(path, "rb") as f:
                config = json.loads(f.read(MAX_MANIFEST))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        helpers = config.get("credHelpers") if isinstance(config.get("credHelpers"), dict) else {}
        named = [helper for key, helper in helpers.items() if _key(str(key)) in hosts]
        for helper, field in ((named[0] if named else None, "credHelpers"), (config.get("credsStore"), "credsStore")):
            if helper:
                found = from_helper(helper, HUB_SERVER if registry == DOCKER_HUB else registry, f"{field} in {path}")
                if found:
                    return found, f"docker-credential-{helper} ({field} in {path})"
        found = _from_auths(config.get("auths"), hosts, name)
        if found:
            return found, path
    return None, None


def _from_auths(auths, hosts, name: str) -> tuple[str, str] | None:
    """The most specific entry's credentials (podman allows ``host/namespace`` keys)."""
    best = None
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        key = _key(str(key))
        for host in hosts:
            if f"{host}/{name}/".startswith(key + "/") and isinstance(entry, dict) \
                    and (best is None or len(key) > len(best[0])):
                best = (key, entry)
    if best is None:
        return None
    entry = best[1]
    try:
        user, _, password = base64.b64decode(entry.get("auth") or "").decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        user = password = ""
    user, password = user or entry.get("username") or "", password or entry.get("password") or ""
    return (str(user), str(password)) if user else None


def from_helper(helper, server: str, where: str) -> tuple[str, str] | None:
    """``docker-credential-HELPER get`` for ``server``: (user, secret), or None when it
    has none ("credentials not found", as the helper protocol says)."""
    if not isinstance(helper, str) or not _HELPER_NAME.fullmatch(helper):
        raise local.ImageError(f"{where}: {str(helper)[:80]!r} is not a credential helper name "
                               "(docker-credential-NAME: letters, digits, '.', '_', '-')")
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise local.ImageError(f"{where} names the credential helper docker-credential-{helper}, which is not on "
                               f"PATH: install it, or remove it from that file to use its auths")
    status, output, errors = _run(program, server.encode(), where)
    text = output.decode(errors="replace").strip()
    if status != 0:
        if "credentials not found" in text.lower() or "credentials not found" in errors.lower():
            return None
        detail = (text or errors).splitlines()[0][:200] if (text or errors) else f"exit status {status}"
        raise local.ImageError(f"docker-credential-{helper} ({where}) failed for {server}: {detail}")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("Username"), str) \
            or not isinstance(answer.get("Secret"), str):
        raise local.ImageError(f"docker-credential-{helper} ({where}) answered for {server} with no "
                               '{"Username": ..., "Secret": ...} object')
    if answer["Username"] == "<token>":
        raise local.ImageError(f"docker-credential-{helper} ({where}) holds an identity token for {server}, "
                               "which pytest-isolate does not use: store a user name and password or access token")
    return (answer["Username"], answer["Secret"]) if answer["Username"] else None


def _run(program: str, stdin: bytes, where: str) -> tuple[int, bytes, str]:
    """Run a helper with a deadline, keeping at most MAX_HELPER_OUTPUT of each stream."""
    process = subprocess.Popen([program, "get"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    kept = {process.stdout: b"", process.stderr: b""}
    deadline = time.monotonic() + HELPER_TIMEOUT
    try:
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as selector:
            for stream in kept:
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise local.ImageError(f"{os.path.basename(program)} ({where}) did not answer within "
                                           f"{HELPER_TIMEOUT:.0f} s")
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    kept[key.fileobj] += chunk
                    if len(kept[key.fileobj]) > MAX_HELPER_OUTPUT:
                        raise local.ImageError(f"{os.path.basename(program)} ({where}) printed more than "
                                               f"{MAX_HELPER_OUTPUT} bytes")
        status = process.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise local.ImageError(f"{os.path.basename(program)} ({where}) did not exit within "
                               f"{HELPER_TIMEOUT:.0f} s") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    return status, kept[process.stdout], kept[process.stderr].decode(errors="replace")
