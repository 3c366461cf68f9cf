"""Image references, in skopeo's transport syntax (so a Docker or podman user needs
nothing new), parsed and validated before anything touches the disk or the network.

    host                                   a read-only view of this host (the default)
    dir:/srv/rootfs                        a plain root filesystem (not skopeo's dir:)
    oci:PATH[:TAG]                         an OCI image layout directory
    docker-archive:PATH[:NAME[:TAG]]       `docker save` output
    docker://[REGISTRY/]NAME[:TAG][@sha256:HEX]

A docker:// name resolves as Docker resolves short names: ``python`` is
``docker.io/library/python:latest``; a first component with a dot or a port, or
``localhost``, is a registry. A pinned digest wins over the tag.
"""

from __future__ import annotations

import dataclasses
import os
import re

TRANSPORTS = ("host", "dir", "oci", "docker-archive", "docker")
DOCKER_HUB = "docker.io"
# distribution/reference's grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                     r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
ACCEPTED = ("'host', 'dir:/path/to/rootfs', 'oci:PATH[:TAG]', 'docker-archive:PATH[:NAME:TAG]' "
            "or 'docker://[REGISTRY/]NAME[:TAG][@sha256:DIGEST]'")


class ReferenceError(ValueError):
    """A reference that cannot be one; the message says what is accepted."""


def parse_registry_host(value) -> str:
    """A registry named insecure: ``host[:port]`` (a name, an IPv4 address or an
    [IPv6] one), as Docker's ``insecure-registries`` takes it; lowercased."""
    text = value.strip() if isinstance(value, str) else ""
    port = re.search(r":([0-9]+)$", text)
    if not _DOMAIN.fullmatch(text) or (port and not 0 < int(port.group(1)) < 65536):
        raise ReferenceError(f"got {value!r:.80}; accepted: a registry as host[:port], e.g. registry.lan:5000 or "
                             "10.0.0.5:5000 (no scheme, no path)")
    return text.lower()


@dataclasses.dataclass(frozen=True)
class Reference:
    transport: str
    path: str = ""            # dir:, oci:, docker-archive: (absolute)
    registry: str = ""        # docker://
    name: str = ""            # docker:// repository; oci:/docker-archive: the tag's name part
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.transport == "host":
            return "host"
        if self.transport == "docker":
            text = f"docker://{self.registry}/{self.name}"
            text += f":{self.tag}" if self.tag else ""
            return text + (f"@{self.digest}" if self.digest else "")
        suffix = ""
        if self.transport == "oci" and self.tag:
            suffix = f":{self.tag}"
        elif self.transport == "docker-archive" and self.name:
            suffix = f":{self.name}" + (f":{self.tag}" if self.tag else "")
        return f"{self.transport}:{self.path}{suffix}"

    @property
    def local(self) -> bool:
        return self.transport in ("host", "dir", "oci", "docker-archive")


def parse(text: str, base: str = "") -> Reference:
    """``text`` as a Reference; relative paths are taken from ``base``."""
    if not isinstance(text, str) or not text or "\0" in text or text != text.strip():
        raise ReferenceError(f"not an image reference: {text!r}; accepted: {ACCEPTED}")
    if text == "host":
        return Reference("host")
    transport, colon, rest = text.partition(":")
    if not colon or transport not in TRANSPORTS[1:]:
        known = ", ".join(f"{t}:" for t in TRANSPORTS[1:])
        try:
            parse_docker(text, text)
            hint = f" (did you mean 'docker://{text}'?)"
        except ReferenceError:
            hint = ""
        raise ReferenceError(f"unknown transport in {text!r}{hint}; transports: host, {known}; "
                             f"accepted: {ACCEPTED}")
    if transport == "docker":
        if not rest.startswith("//"):
            raise ReferenceError(f"{text!r}: a registry image is written docker://NAME (two slashes)")
        return parse_docker(rest[2:], text)
    path, _, ref = rest.partition(":")  # skopeo: the first ':' ends the path
    if not path:
        raise ReferenceError(f"{text!r} names no path; accepted: {ACCEPTED}")
    path = os.path.normpath(os.path.join(base or os.getcwd(), path))
    if transport == "dir":
        if ref:
            raise ReferenceError(f"{text!r}: dir: takes a path only (a ':' ends the path)")
        return Reference("dir", path=path)
    if transport == "oci":
        if ref and not TAG.match(ref) and not _is_ref_name(ref):
            raise ReferenceError(f"{text!r}: {ref!r} is not a tag")
        return Reference("oci", path=path, tag=ref or None)
    # docker-archive:PATH[:NAME:TAG] (a name from the archive's RepoTags)
    if not ref:
        return Reference("docker-archive", path=path)
    name, _, tag = ref.rpartition(":") if ":" in ref else (ref, "", "latest")
    if not _NAME.match(name.split("/", 1)[-1]) or not TAG.match(tag):
        raise ReferenceError(f"{text!r}: {ref!r} is not NAME:TAG")
    return Reference("docker-archive", path=path, name=name, tag=tag)


def _is_ref_name(ref: str) -> bool:
    """podman writes full names (docker.io/library/x:1) as an OCI layout's ref name."""
    return bool(re.match(r"^[\w./:@-]{1,255}$", ref))


def parse_docker(rest: str, text: str) -> Reference:
    name, at, digest = rest.partition("@")
    if at and not DIGEST.match(digest):
        raise ReferenceError(f"{text!r}: {digest!r} is not a digest (sha256: and 64 hex digits)")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not TAG.match(tag):
            raise ReferenceError(f"{text!r}: {tag!r} is not a tag")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, remainder
        if not _DOMAIN.match(registry):
            raise ReferenceError(f"{text!r}: {registry!r} is not a registry host")
    else:
        registry, repository = DOCKER_HUB, name
        if "/" not in repository:
            repository = "library/" + repository
    if not repository or not _NAME.match(repository) or len(repository) > 255:
        raise ReferenceError(f"{text!r}: {repository!r} is not a repository name (lowercase letters, digits, "
                             "'.', '_', '-' and '/')")
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    return Reference("docker", registry=registry, name=repository,
                     tag=tag if tag or at else "latest", digest=digest or None)
