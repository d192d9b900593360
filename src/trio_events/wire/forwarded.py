"""Who the client is behind reverse proxies: ``X-Forwarded-For``, believed only from proxies
the server is told to trust. Sans-IO: pure functions over addresses and header values.

Each proxy appends the address it got the request from to ``X-Forwarded-For``, so the header
reads ``client, proxy1, proxy2`` and the TCP peer is the last proxy. Anyone can send the header,
so only its right end, written by proxies we trust, is evidence: walking from the right, the
first address that is not a trusted proxy is the client. Entries further left were written by
the client itself and are ignored.

Example::

    >>> trusted = parse_trusted_proxies(["10.0.0.0/8"])
    >>> client_address("10.0.0.2", [b"198.51.100.1, 203.0.113.7, 10.0.0.3"], trusted)
    '203.0.113.7'
    >>> client_address("192.0.2.9", [b"203.0.113.7"], trusted)  # not a trusted peer: ignored
    '192.0.2.9'
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TypeAlias

__all__ = ["TrustedProxies", "client_address", "is_trusted_proxy", "parse_trusted_proxies"]

TrustedProxies: TypeAlias = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def parse_trusted_proxies(
    entries: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of `entries` (addresses like ``10.0.0.2`` or networks like ``10.0.0.0/8``).

    Raises:
        ValueError: an entry is neither; the message names it.
    """
    networks = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"a trusted proxy is an IP address or network as a str, not {entry!r}")
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted proxy {entry!r} is not an IP address or network "
                f"(such as 10.0.0.2, 10.0.0.0/8 or fd00::/8)"
            ) from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: TrustedProxies
) -> bool:
    return any(address in network for network in trusted)


def is_trusted_proxy(peer: str, trusted: TrustedProxies) -> bool:
    """Whether the TCP peer `peer` is one of the `trusted` proxies."""
    if not trusted:
        return False
    address = _address(peer)
    return address is not None and _trusted(address, trusted)


def client_address(peer: str, forwarded_for: Sequence[bytes], trusted: TrustedProxies) -> str:
    """The client's IP address: `peer` (the TCP peer), unless it is a trusted proxy.

    `forwarded_for` holds the values of every ``X-Forwarded-For`` header of the request, in
    order. From a trusted peer, the answer is the rightmost entry that is not a trusted proxy;
    if every entry is one, the leftmost; if an entry that would decide is not an address (the
    header is garbled), the last trusted hop, so a bad header never lets a client choose its
    address.
    """
    peer_address = _address(peer)
    if not trusted or peer_address is None or not _trusted(peer_address, trusted):
        return peer
    entries = [
        entry
        for value in forwarded_for
        for entry in value.decode("latin-1").split(",")
        if entry.strip()
    ]
    client = peer_address
    for entry in reversed(entries):
        address = _address(entry)
        if address is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return str(client)
