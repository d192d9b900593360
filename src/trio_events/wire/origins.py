"""Which web pages may use a server that has no authentication. Sans-IO: pure functions over a
request's headers.

A server without tokens trusts whoever can reach it, and a browser reaches a great deal: any
page the user visits can open a WebSocket to ``ws://127.0.0.1:8765`` (browsers apply no CORS to
WebSockets), and a site whose DNS name is made to point at 127.0.0.1 (DNS rebinding) can even
read the server's pages. Two checks close both doors, and leave other clients alone:

- **Origin.** A browser names the page behind every WebSocket handshake in ``Origin``. Without
  authentication, only the server's own pages (the same host and port) and the origins in
  ``allowed_origins`` may connect; a client that sends no ``Origin`` is not a browser page and
  is not affected. (With tokens, a page has no credential to use unless it holds a token, so
  the check applies only to the origins listed, if any.)
- **Host.** Without authentication, the server answers only requests addressed to an IP
  address, ``localhost``, or a name in ``allowed_hosts``: a rebinding site's requests carry
  its own name.

Example::

    >>> why = refusal(
    ...     [(b"host", b"127.0.0.1:8765"), (b"origin", b"https://evil.example")],
    ...     upgrade=True, authenticated=False, allowed_origins=(), allowed_hosts=(),
    ... )
    >>> why.startswith("the web page at origin 'https://evil.example' may not connect")
    True
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

__all__ = ["normalize_origin", "refusal"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> str:
    """`origin` as browsers send it: ``scheme://host[:port]``, lowercase, no default port.

    ``*`` (any origin) and ``null`` (a sandboxed page, a ``file:`` URL) stay as they are.

    Raises:
        ValueError: not an origin (a path, a query, no scheme or host); the message says so.
    """
    text = origin.strip()
    if text in ("*", "null"):
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(
            f"{origin!r} is not an origin: write scheme://host[:port], such as "
            f"https://app.example.com or http://localhost:3000 (or * for any)"
        )
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _split_host(host: str) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]:port`` too) as the lowercase name and the port, if given."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port_text = host.partition(":")
    elif ":" in host and not _is_ip(host):
        # An IPv6 address and a port without brackets, as trio-websocket's client writes it.
        name, _, port_text = host.rpartition(":")
    else:
        name, port_text = host, ""
    return name, int(port_text) if port_text.isdigit() else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` (normalized) is the server's own, as the request's `host` names it."""
    if host is None or origin in ("*", "null"):
        return False
    parts = urlsplit(origin)  # normalized: it parses
    name, port = _split_host(host)
    origin_name = (parts.hostname or "").lower()
    origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    # Behind a TLS proxy the Host header has no port while the page is https: either
    # scheme's default port is the same origin then.
    return origin_name == name and (origin_port == port if port else parts.port is None)


def refusal(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    upgrade: bool,
    authenticated: bool,
    allowed_origins: Iterable[str],
    allowed_hosts: Iterable[str],
) -> str | None:
    """Why the request must be refused (the message of a 403), or None if it may go on.

    `headers` are the request's, names lowercase (as h11 gives them); `upgrade` says whether it
    asks for a WebSocket; `authenticated` whether the server checks tokens. `allowed_origins`
    are normalized origins (`normalize_origin`), `allowed_hosts` lowercase host names (``*``:
    any).
    """
    host = _header(headers, b"host")
    if not authenticated and host is not None:
        name, _ = _split_host(host)
        hosts = set(allowed_hosts)
        if not (_is_ip(name) or name == "localhost" or name in hosts or "*" in hosts):
            return (
                f"this server has no authentication, so it answers only requests addressed to "
                f"an IP address or localhost, not to {name!r} (a DNS rebinding attack looks "
                f"like this); start it with --allowed-host {name} (ServerConfig.allowed_hosts) "
                f"to answer that name"
            )
    origin_header = _header(headers, b"origin") if upgrade else None
    if origin_header is None:
        return None
    origins = set(allowed_origins)
    if authenticated and not origins:
        return None  # a page needs a token to do anything: no list, no check
    if "*" in origins:
        return None
    try:
        origin = normalize_origin(origin_header)
    except ValueError:
        pass  # not an origin a browser sends (a path, a bad port): allowed by "*" only
    else:
        if origin in origins or _same_origin(origin, host):
            return None
    why = (
        "it is not in the server's allowed origins"
        if authenticated
        else "it has no authentication, so only its own pages may"
    )
    return (
        f"the web page at origin {origin_header!r} may not connect to this server ({why}); "
        f"start it with --allowed-origin {origin_header} (ServerConfig.allowed_origins) "
        f"to allow that origin"
    )
