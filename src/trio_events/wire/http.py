"""The plain-HTTP side of the server's port: a pure router, testable without sockets.

`serve_streams` reads each request head with h11; a WebSocket upgrade goes on to trio-websocket,
anything else is answered by `HttpRouter.route` with one small `HttpResponse` (the server then
closes the connection). The routes:

- ``GET /healthz``: public; ``{"status": "ok", "uptime_s", "streams", "connections",
  "version"}``; 503 with ``"status": "shutting_down"`` while the server closes.
- ``GET /metrics``: the Prometheus text exposition. With an authenticator it needs an
  ``Authorization: Bearer`` token whose grant allows ``read`` on every stream (pattern ``*``),
  since the metrics name every stream: none or a bad one is 401, a narrower one 403.
- ``GET /`` and ``GET /<file>``: the files of the ``trio_events.web`` package directory (the
  viewer page, the JavaScript client), loaded once by `load_static_files`; public, since they
  hold no data (the page connects over WebSocket with a token the user gives, checked there).
- ``/v1/streams/...`` without a WebSocket upgrade: 426.

``HEAD`` is allowed wherever ``GET`` is. An unknown path is 404, another method 405 (with
``Allow``), a request with a body 413, a target that is not a path 400. Every error has the
protocol's ``error`` JSON as its body.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Literal, Protocol

import attrs
import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import Authenticator, Permission
from .protocol import Error, ErrorCode, ProtocolError, encode_message

__all__ = [
    "Health",
    "HttpResponse",
    "HttpRouter",
    "HttpState",
    "StaticFile",
    "error_response",
    "load_static_files",
    "package_version",
]

#: Content types of the static files served (any other file in the directory is not served).
CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".map": "application/json",
}


_JSON: Final = "application/json"
_ALLOW: Final = "GET, HEAD"
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*) *")
_STREAMS_PREFIX: Final = "/v1/streams/"


def package_version() -> str:
    """The installed trio-events version (``"unknown"`` when run from an uninstalled tree)."""
    try:
        return version("trio-events")
    except PackageNotFoundError:
        return "unknown"


@attrs.frozen(kw_only=True)
class HttpResponse:
    """One response, whole: the server adds ``Connection: close`` and sends it.

    Attributes:
        status: The HTTP status code.
        headers: ``(name, value)`` pairs, ``Content-Length`` included (for ``HEAD`` too, where
            it is the length ``GET`` would send).
        body: The body (empty for ``HEAD`` and 304).
        route: A bounded label for metrics and logs: the route's path (``/healthz``,
            ``/metrics``, ``/``, ``static``, ``/v1/streams``) or ``other``; never the target.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    route: str

    @property
    def reason(self) -> str:
        """The status's reason phrase (``Not Found``)."""
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return ""


@attrs.frozen(kw_only=True)
class Health:
    """What ``/healthz`` reports, a snapshot from the server.

    Attributes:
        closing: The server is shutting down (503).
        uptime_s: Seconds since the server started.
        streams: Streams open in the hub.
        connections: Open WebSocket connections.
        version: The trio-events version.
    """

    closing: bool
    uptime_s: float
    streams: int
    connections: int
    version: str


class HttpState(Protocol):
    """What the router asks of the running server, at most once per request."""

    def health(self) -> Health:
        """The ``/healthz`` snapshot."""
        ...

    def metrics(self) -> bytes:
        """The ``/metrics`` body (Prometheus text exposition)."""
        ...


@attrs.frozen(kw_only=True)
class StaticFile:
    """One file of the viewer, held in memory.

    Attributes:
        body: Its bytes.
        content_type: From its extension (`CONTENT_TYPES`).
        etag: A strong ETag (quoted) from a hash of `body`.
    """

    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> StaticFile:
        """The file `name` (its extension decides the type) with contents `body`.

        Raises:
            ValueError: `name` has an extension that is not in `CONTENT_TYPES`.
        """
        suffix = _suffix(name)
        if suffix not in CONTENT_TYPES:
            raise ValueError(
                f"{name!r}: cannot serve a {suffix or 'extensionless'} file; "
                f"the types served are {sorted(CONTENT_TYPES)}"
            )
        digest = hashlib.sha256(body).hexdigest()[:32]
        return cls(body=body, content_type=CONTENT_TYPES[suffix], etag=f'"{digest}"')


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def load_static_files(
    package: str = "trio_events", directory: str = "web"
) -> dict[str, StaticFile]:
    """Read the files served over HTTP: those directly in `directory` of `package`.

    Only regular files whose extension is in `CONTENT_TYPES` and whose name does not start
    with ``.`` are taken (no subdirectories, no Python files). A missing directory gives an
    empty mapping (``GET /`` is then 404). Blocking file reads: call it before serving.
    """
    root = resources.files(package).joinpath(directory)
    if not root.is_dir():
        return {}
    files: dict[str, StaticFile] = {}
    for entry in root.iterdir():
        name = entry.name
        if name.startswith(".") or _suffix(name) not in CONTENT_TYPES or not entry.is_file():
            continue
        files[name] = StaticFile.of(name, entry.read_bytes())
    return files


def error_response(
    status: int, code: ErrorCode, message: str, *, route: str = "other", head: bool = False
) -> HttpResponse:
    """A response with the protocol's ``error`` JSON as its body (none for ``HEAD``)."""
    body = encode_message(Error(code, message))
    return _response(status, _JSON, body, route=route, head=head, cache="no-store")


def _response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    route: str,
    head: bool,
    cache: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> HttpResponse:
    headers = (
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", cache),
        ("X-Content-Type-Options", "nosniff"),
        *extra,
    )
    return HttpResponse(status=status, headers=headers, body=b"" if head else body, route=route)


def _header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for n, v in headers if n.lower() == name]


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    if _header_values(headers, b"transfer-encoding"):
        return True
    return any(v.strip() != "0" for v in _header_values(headers, b"content-length"))


_Route = Literal["/healthz", "/metrics", "/", "static", "/v1/streams", "other"]


@attrs.frozen(kw_only=True)
class HttpRouter:
    """Answers plain HTTP requests: routing, methods, auth for ``/metrics``, static files.

    Attributes:
        static: The files served at ``/<name>`` (``index.html`` also at ``/``), usually from
            `load_static_files`.
        auth: The server's authenticator; ``None`` leaves ``/metrics`` open.
    """

    static: Mapping[str, StaticFile] = attrs.field(factory=dict)
    auth: Authenticator | None = None

    def route(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        state: HttpState,
        *,
        now: float,
    ) -> HttpResponse:
        """The response to one request (never raises for any method, target or headers).

        Args:
            method: The request method, as sent (``b"GET"``).
            target: The request target, as sent (``b"/healthz?x=1"``).
            headers: The request headers, names lower-case (as h11 gives them).
            state: The running server, asked for health or metrics when the route needs it.
            now: The current Unix time, for checking a token's expiry.
        """
        head = method == b"HEAD"
        path = _target_path(target)
        if path is None:
            return error_response(
                400,
                ErrorCode.BAD_REQUEST,
                "the request target must be a path such as /healthz",
                head=head,
            )
        route, name = self._find(path)
        if route == "other":
            return error_response(
                404,
                ErrorCode.NOT_FOUND,
                "no such path; the server has /healthz, /metrics, / and /v1/streams/<id>",
                head=head,
            )
        if method not in (b"GET", b"HEAD"):
            response = error_response(
                405,
                ErrorCode.BAD_REQUEST,
                f"method not allowed on {route}; use GET or HEAD",
                route=route,
                head=head,
            )
            return attrs.evolve(response, headers=(*response.headers, ("Allow", _ALLOW)))
        if _has_body(headers):
            return error_response(
                413,
                ErrorCode.TOO_LARGE,
                "this server takes no request bodies; send the request without one",
                route=route,
                head=head,
            )
        if route == "/healthz":
            return self._health(state.health(), head)
        if route == "/metrics":
            refusal = self._check_metrics_token(headers, now)
            if refusal is not None:
                return attrs.evolve(refusal, body=b"" if head else refusal.body)
            return _response(
                200, CONTENT_TYPE_LATEST, state.metrics(), route=route, head=head, cache="no-store"
            )
        if route == "/v1/streams":
            response = error_response(
                426,
                ErrorCode.BAD_REQUEST,
                "this path is a WebSocket endpoint: open it with a WebSocket client",
                route=route,
                head=head,
            )
            return attrs.evolve(response, headers=(*response.headers, ("Upgrade", "websocket")))
        return self._static(self.static[name], headers, route, head)

    def _find(self, path: str) -> tuple[_Route, str]:
        """The route of a decoded path, and the static file's name for ``static`` and ``/``."""
        if path == "/healthz":
            return "/healthz", ""
        if path == "/metrics":
            return "/metrics", ""
        if path.startswith(_STREAMS_PREFIX):
            return "/v1/streams", ""
        if path == "/":
            return ("/", "index.html") if "index.html" in self.static else ("other", "")
        # Only names of the preloaded files match, so no path can reach another file.
        name = path[1:]
        if name in self.static:
            return "static", name
        return "other", ""

    @staticmethod
    def _health(health: Health, head: bool) -> HttpResponse:
        body = orjson.dumps(
            {
                "status": "shutting_down" if health.closing else "ok",
                "uptime_s": round(health.uptime_s, 3),
                "streams": health.streams,
                "connections": health.connections,
                "version": health.version,
            }
        )
        status = 503 if health.closing else 200
        return _response(status, _JSON, body, route="/healthz", head=head, cache="no-store")

    def _check_metrics_token(
        self, headers: Sequence[tuple[bytes, bytes]], now: float
    ) -> HttpResponse | None:
        """None if ``/metrics`` may be read, else the 400/401/403 to send."""
        if self.auth is None:
            return None
        challenge = (("WWW-Authenticate", 'Bearer realm="trio-events"'),)
        values = _header_values(headers, b"authorization")
        if len(values) > 1:
            return error_response(
                400,
                ErrorCode.BAD_REQUEST,
                "more than one Authorization header; send one",
                route="/metrics",
            )
        match = _BEARER.fullmatch(values[0]) if values else None
        if match is None:
            response = error_response(
                401,
                ErrorCode.UNAUTHORIZED,
                "/metrics needs an 'Authorization: Bearer <token>' header with a token that may "
                "read every stream",
                route="/metrics",
            )
            return attrs.evolve(response, headers=(*response.headers, *challenge))
        try:
            grant = self.auth.authenticate(match.group(1), now=now)
        except ProtocolError as exc:
            response = error_response(exc.code.http_status, exc.code, exc.message, route="/metrics")
            if exc.code is ErrorCode.UNAUTHORIZED:
                response = attrs.evolve(response, headers=(*response.headers, *challenge))
            return response
        if "*" not in grant.streams or Permission.READ not in grant.permissions:
            return error_response(
                403,
                ErrorCode.FORBIDDEN,
                "/metrics names every stream: use a token granted 'read' on all streams "
                "(stream pattern '*')",
                route="/metrics",
            )
        return None

    @staticmethod
    def _static(
        file: StaticFile, headers: Sequence[tuple[bytes, bytes]], route: str, head: bool
    ) -> HttpResponse:
        etag = (("ETag", file.etag),)
        if any(
            file.etag in (tag.strip() for tag in value.split(",")) or value.strip() == "*"
            for value in _header_values(headers, b"if-none-match")
        ):
            return HttpResponse(
                status=304,
                headers=(("Cache-Control", "no-cache"), *etag),
                body=b"",
                route=route,
            )
        return _response(
            200, file.content_type, file.body, route=route, head=head, cache="no-cache", extra=etag
        )


def _target_path(target: bytes) -> str | None:
    """The percent-decoded path of a request target, or None if it is not a usable path.

    Origin-form (``/a?b``) and absolute-form (``http://host/a?b``) are accepted; the query is
    ignored. A path that decodes to something with ``\\``, a NUL or a non-UTF-8 byte is refused.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith("/"):
        try:
            split = urllib.parse.urlsplit(text)
        except ValueError:
            return None
        if split.scheme.lower() not in ("http", "https") or not split.netloc:
            return None
        text = split.path or "/"
    raw_path = text.split("?", 1)[0].split("#", 1)[0]
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    return path
