"""Host names as a client sees them: where a wildcard bind address is reached from this
machine (:func:`client_host`), and whether an address or name is reachable only from this
machine (:func:`is_loopback`). Used by the producer (which endpoints may use a node's IPC
ring), the node (the name of its IPC socket) and the web page's bind check."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["client_host", "is_loopback"]

_WILDCARD = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def client_host(host: str) -> str:
    """``host`` as a client on this machine connects to it (a wildcard: the loopback)."""
    return _WILDCARD.get(host, host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addrs)
