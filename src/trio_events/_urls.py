"""URLs as they may be shown: in messages, logs and reports, never with a password."""

from __future__ import annotations

__all__ = ["safe_url"]


def safe_url(url: str) -> str:
    """The URL without its password (in the user part or the query), for messages and logs."""
    scheme, sep, rest = url.partition("://")
    rest, question, query = rest.partition("?")
    if question:
        query = "&".join(
            f"{name}=***" if name.lower() == "password" else part
            for part in query.split("&")
            for name in [part.split("=", 1)[0]]
        )
    userinfo, at, host = rest.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        rest = f"{user + ':***' if ':' in userinfo else user}@{host}"
    return f"{scheme}{sep}{rest}{question}{query}"
