"""``docker://`` images from a registry: the Docker Registry HTTP API v2 / OCI
distribution spec, pull only, standard library only.

A manifest is fetched by tag or pinned digest and verified, the platform chosen from
an index, then the config and layers are streamed through ``local._finish`` like a
local image: every blob checked against its digest and size while it streams.

Trust rules (docs/images.md, "Registries"):
- plain http only for loopback registries (Docker's rule) or those the user named
  insecure (``--isolate-insecure-registry``): https with an unverified certificate
  first, then plain http, as Docker does for its ``insecure-registries``;
- credentials come from the auth files or their credential helpers (credentials.py)
  and go to the registry and its token realm only; any redirect to another origin
  loses the Authorization header;
- a layer descriptor's foreign ``urls`` are never followed: blobs come from the registry.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from . import local
from .credentials import auth_files, credentials  # noqa: F401 - also this module's API
from .reference import DOCKER_HUB, Reference
from .store import MAX_MANIFEST, Store, StoreError, Verified

ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
TRIES, BACKOFF, MAX_RETRY_AFTER, TIMEOUT = 3, 0.25, 5.0, 60.0
_TRANSIENT = {408, 429, 500, 502, 503, 504}
_HUB_API = "registry-1.docker.io"  # docker.io is a name; its API lives here
INSECURE_HINT = ("if it serves plain http or a certificate this machine does not trust, and you trust the "
                 "network, name it an insecure registry: --isolate-insecure-registry={0} (ini "
                 "isolate_insecure_registries; `python -m pytest_isolate pull --insecure-registry={0}`)")


def _host(netloc: str) -> str:
    """The host of ``host[:port]`` or ``[v6][:port]``, lowercased, without brackets."""
    if netloc.startswith("["):
        return netloc[1:netloc.index("]")].lower()
    return netloc.rsplit(":", 1)[0].lower() if netloc.count(":") == 1 else netloc.lower()


def is_loopback(netloc: str) -> bool:
    host = _host(netloc)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def named_insecure(netloc: str, insecure=()) -> bool:
    """The user named this registry (``host[:port]``, or its host for every port) insecure."""
    netloc = netloc.lower()
    for name in (n.lower() for n in insecure):
        if name == netloc or (name.strip("[]") == _host(name) and _host(name) == _host(netloc)):
            return True
    return False


def plain_http_allowed(netloc: str, insecure=()) -> bool:
    return is_loopback(netloc) or named_insecure(netloc, insecure)


def scheme_for(registry: str, insecure=()) -> str:
    """The scheme tried first: ``http`` on loopback, else ``https`` (an insecure
    registry falls back to http when https fails, see Client._open)."""
    return "http" if is_loopback(registry) else "https"


# -- HTTP ----------------------------------------------------------------------------------------

class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects keep the Authorization header only within the registry's own origin
    (it is an unredirected header, so urllib drops it on every redirect; we put it back
    for the same origin), and never go to plain http off loopback."""

    def __init__(self, client: Client) -> None:
        self.client = client  # its origin changes when an insecure registry falls back to http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(newurl)
        if target.scheme not in ("http", "https") or \
                target.scheme == "http" and not plain_http_allowed(target.netloc, self.client.insecure):
            raise local.ImageError(f"the registry redirected to {target.scheme}://{target.netloc}: "
                                   "refused (plain http is used on loopback or for insecure registries only)")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and f"{target.scheme}://{target.netloc}" == self.client.origin \
                and req.has_header("Authorization"):
            new.add_unredirected_header("Authorization", req.get_header("Authorization"))
        return new


class _TLS(urllib.request.HTTPSHandler):
    """Certificates are verified, but those of the registries the user named insecure."""

    def __init__(self, insecure) -> None:
        super().__init__(context=ssl.create_default_context())
        self.insecure = insecure
        self.unverified = ssl.create_default_context()
        self.unverified.check_hostname, self.unverified.verify_mode = False, ssl.CERT_NONE

    def https_open(self, req):
        if named_insecure(urllib.parse.urlsplit(req.full_url).netloc, self.insecure):
            return self.do_open(http.client.HTTPSConnection, req, context=self.unverified)
        return super().https_open(req)


class _Body:
    """A response body read as a stream that says when the connection ended early, and
    resumes a blob (``reopen(offset)``: a Range request) after a reset or a short read:
    a large layer need not start again from its first byte."""

    def __init__(self, response, expected: int | None, what: str, reopen=None) -> None:
        self.response, self.expected, self.what, self.got = response, expected, what, 0
        self.reopen, self.resumes, self.failed = reopen, 0, None
        length = response.headers.get("Content-Length")
        if self.expected is None and length and length.isdigit():
            self.expected = int(length)

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.failed:
                raise StoreError(self.failed)
            try:
                data = self.response.read(n if n is not None and n >= 0 else 1 << 20)
                failure = None
            except (OSError, http.client.HTTPException) as exc:
                data, failure = b"", f"{self.what}: the connection failed after {self.got} bytes ({exc})"
            self.got += len(data)
            if data or n == 0 or (failure is None and (self.expected is None or self.got >= self.expected)):
                return data
            failure = failure or (f"{self.what} is truncated: the connection ended after {self.got} of "
                                  f"{self.expected} bytes")
            if not self._resume():
                self.failed = failure  # and stays so: what a failed resume got is not this blob
                raise StoreError(failure)

    def _resume(self) -> bool:
        if self.reopen is None or self.resumes >= TRIES - 1:
            return False
        self.resumes += 1
        self.response.close()
        time.sleep(BACKOFF * self.resumes)
        try:
            self.response = self.reopen(self.got)
        except local.ImageError:
            return False
        # A server that ignores Range (200) would start again from byte 0: not a resume.
        return self.response.status == 206 and \
            (self.response.headers.get("Content-Range") or "").startswith(f"bytes {self.got}-")

    def close(self) -> None:
        self.response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client:
    """One repository of one registry: its origin, credentials and token."""

    def __init__(self, reference: Reference, insecure=()) -> None:
        self.reference, self.insecure = reference, tuple(insecure)
        host = _HUB_API if reference.registry == DOCKER_HUB else reference.registry
        self.origin = f"{scheme_for(reference.registry, self.insecure)}://{host}"
        self.may_fall_back = self.origin.startswith("https:") and named_insecure(reference.registry, self.insecure)
        self.credentials, self.auth_file = credentials(reference.registry, reference.name)
        self.authorization: str | None = None
        self.openers = {proxy: urllib.request.build_opener(
            urllib.request.ProxyHandler() if proxy else urllib.request.ProxyHandler({}),
            _TLS(self.insecure), _Redirects(self)) for proxy in (True, False)}

    def _fall_back(self, url: str, reason) -> str | None:
        """The same URL over plain http, once, when https to an insecure registry failed."""
        if not self.may_fall_back or not url.startswith(self.origin + "/") or \
                not isinstance(reason, (ssl.SSLError, ConnectionRefusedError, ConnectionResetError)):
            return None
        self.may_fall_back = False
        self.origin = "http" + self.origin[len("https"):]
        return "http" + url[len("https"):]

    def _open(self, url: str, headers: dict, authorization: str | None):
        """One GET, retried on transient failures; HTTPError for any other error status."""
        # As Go's net/http: a loopback host never goes through a proxy.
        opener = self.openers[not is_loopback(urllib.parse.urlsplit(url).netloc)]
        for attempt in range(TRIES):
            request = urllib.request.Request(url, headers=headers)
            if authorization:
                request.add_unredirected_header("Authorization", authorization)
            try:
                return opener.open(request, timeout=TIMEOUT)
            except urllib.error.HTTPError as exc:
                if exc.code not in _TRANSIENT or attempt == TRIES - 1:
                    raise
                retry_after = (exc.headers.get("Retry-After") or "").strip()
                delay = min(float(retry_after), MAX_RETRY_AFTER) if retry_after.isdigit() else BACKOFF * 2 ** attempt
                exc.close()
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                plain = self._fall_back(url, reason)
                if plain:
                    url = plain
                    continue
                # A refused connection or an unknown name will not heal in a second.
                if isinstance(reason, (ConnectionRefusedError, socket.gaierror, ssl.SSLError, str)) \
                        or attempt == TRIES - 1:
                    netloc = urllib.parse.urlsplit(url).netloc
                    hint = "; " + INSECURE_HINT.format(netloc) if isinstance(reason, ssl.SSLError) and \
                        not plain_http_allowed(netloc, self.insecure) else ""
                    raise local.ImageError(f"{self.reference}: cannot reach registry {netloc} ({reason}){hint}") \
                        from None
                delay = BACKOFF * 2 ** attempt
            time.sleep(delay)
        raise AssertionError("unreachable")

    def get(self, path: str, accept: str | None = None, what: str = "", headers: dict | None = None):
        """GET ``/v2/<name>/<path>`` with the token (or Basic credentials) the registry asks for."""
        url = f"{self.origin}/v2/{self.reference.name}/{path}"
        headers = dict(headers or {}, **({"Accept": accept} if accept else {}))
        for attempt in (1, 2):
            try:
                return self._open(url, headers, self.authorization)
            except urllib.error.HTTPError as exc:
                challenge = exc.headers.get("WWW-Authenticate") or ""
                exc.close()
                # Only the registry's own challenge is answered: a blob host it redirected
                # to does not get to name a realm for the user's credentials.
                answered_by = urllib.parse.urlsplit(exc.geturl() or url)
                if f"{answered_by.scheme}://{answered_by.netloc}" != self.origin:
                    challenge = ""
                if exc.code == 401 and attempt == 1 and challenge:
                    self.authenticate(challenge)
                    continue
                if exc.code in (401, 403):
                    raise local.ImageError(self._denied()) from None
                if exc.code == 404:
                    raise local.ImageError(f"{self.reference} not found: check the name and tag"
                                           if path.startswith("manifests/") else
                                           f"{self.reference}: the registry has no {what} (HTTP 404)") from None
                raise local.ImageError(f"{self.reference}: the registry answered HTTP {exc.code} "
                                       f"({exc.reason}) for {what or path}") from None
        raise AssertionError("unreachable")

    def _denied(self) -> str:
        if self.auth_file:
            return (f"access denied to {self.reference}: check your credentials in {self.auth_file} "
                    f"or `docker login {self.reference.registry}`")
        return (f"access denied to {self.reference}: no credentials for {self.reference.registry} in "
                f"{', '.join(auth_files())}; log in with `docker login {self.reference.registry}` "
                "(or the repository does not exist)")

    def _basic(self) -> str:
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def authenticate(self, challenge: str) -> None:
        scheme, _, rest = challenge.strip().partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if scheme.lower() == "basic":
            if not self.credentials:
                raise local.ImageError(self._denied())
            self.authorization = self._basic()
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise local.ImageError(f"{self.reference}: the registry asks for {scheme or 'an'} authentication, "
                                   "which pytest-isolate does not speak (Bearer and Basic only)")
        realm = urllib.parse.urlsplit(params["realm"])
        # Docker's model: the registry names its token service (Docker Hub's is on another
        # host), and the user's credentials for the registry go there; but only over
        # https, or plain http on loopback or to a registry the user named insecure.
        if realm.scheme not in ("http", "https") or (realm.scheme == "http" and
                                                      not plain_http_allowed(realm.netloc, self.insecure)):
            raise local.ImageError(f"{self.reference}: refused the token service {params['realm']} (credentials "
                                   "and tokens travel over https; plain http on loopback or to insecure registries)")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        query.setdefault("scope", f"repository:{self.reference.name}:pull")
        url = params["realm"] + ("&" if realm.query else "?") + urllib.parse.urlencode(query)
        try:
            with self._open(url, {}, self._basic() if self.credentials else None) as response:
                answer = json.loads(response.read(MAX_MANIFEST))
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise local.ImageError(self._denied()) from None
            raise local.ImageError(f"{self.reference}: the token service {realm.netloc} answered HTTP "
                                   f"{exc.code} ({exc.reason})") from None
        except ValueError:
            answer = None
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise local.ImageError(f"{self.reference}: the token service {realm.netloc} gave no token")
        self.authorization = "Bearer " + token

    def small(self, path: str, what: str, digest: str | None, size: int | None = None,
              accept: str | None = None) -> tuple[bytes, dict]:
        """A manifest or config: capped, and checked against ``digest`` when one is known."""
        response = self.get(path, accept, f"blob {digest}" if path.startswith("blobs/") else what)
        with response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST:
                raise local.ImageError(f"{what} is {length} bytes; the most accepted is {MAX_MANIFEST}")
            body = _Body(response, None, what)
            data = b""
            while len(data) <= MAX_MANIFEST:
                chunk = body.read(MAX_MANIFEST + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            if len(data) > MAX_MANIFEST:
                raise local.ImageError(f"{what} is larger than {MAX_MANIFEST} bytes")
            headers = dict(response.headers.items())
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        claimed = headers.get("Docker-Content-Digest", "")
        expected = digest or (claimed if claimed.startswith("sha256:") else None)
        if expected and got != expected:
            raise local.ImageError(f"{what} does not match its digest {expected} (got {got})")
        if size is not None and len(data) != size:
            raise local.ImageError(f"{what} is {len(data)} bytes, its descriptor says {size}")
        return data, headers


def import_registry(reference: Reference, store: Store, progress: local.Progress | None = None,
                    insecure=()) -> dict:
    """Pull ``reference`` (transport ``docker``) into ``store``; the image's record."""
    client = Client(reference, insecure)
    what = f"the manifest of {reference}"
    # A pinned digest wins over the tag.
    data, headers = client.small(f"manifests/{reference.digest or reference.tag}", what, reference.digest,
                                 accept=ACCEPT)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest = local._json(data, what)
    media_type = manifest.get("mediaType") or headers.get("Content-Type", "").split(";")[0].strip()
    for _ in range(4):  # nested indexes
        if media_type not in local.INDEX_TYPES and "manifests" not in manifest:
            break
        descriptor = local.choose_platform(manifest, f"the index of {reference}")
        digest = descriptor["digest"]
        data, headers = client.small(f"manifests/{digest}", what, digest, descriptor.get("size"), ACCEPT)
        manifest = local._json(data, what)
        media_type = manifest.get("mediaType") or headers.get("Content-Type", "").split(";")[0].strip()
    if manifest.get("schemaVersion") == 1 or media_type.startswith("application/vnd.docker.distribution.manifest.v1"):
        raise local.ImageError(f"{reference}: a Docker schema 1 manifest (deprecated since 2017): "
                               "push the image again with a current Docker or skopeo")
    config_descriptor = local._descriptor(manifest.get("config"), f"the config descriptor of {reference}")
    config, _ = client.small(f"blobs/{config_descriptor['digest']}", f"the config of {reference}",
                             config_descriptor["digest"], config_descriptor.get("size"))
    layers = [local._descriptor(layer, f"a layer of {reference}") for layer in manifest.get("layers") or []]

    def open_layer(i: int):
        # A descriptor's foreign "urls" are not followed: the registry serves the blob or
        # the pull fails; no credentials, and no fetch, go to a host the manifest names.
        layer = layers[i]
        what = f"layer {i + 1}/{len(layers)} of {reference} ({layer['digest']})"
        path, blob = f"blobs/{layer['digest']}", f"blob {layer['digest']}"
        body = _Body(client.get(path, what=blob), layer.get("size"), what,
                     lambda offset: client.get(path, what=blob, headers={"Range": f"bytes={offset}-"}))
        return local._Closing(Verified(body, layer["digest"], layer.get("size"), what), body)

    try:
        return local._finish(reference, store, data, digest, config, config_descriptor["digest"], layers,
                             open_layer, progress)
    except StoreError as exc:
        raise local.ImageError(str(exc)) from None
