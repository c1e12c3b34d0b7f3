"""Checks of single values that several sections share: ports and IP:PORT addresses."""

from __future__ import annotations

import ipaddress

from exposure.config.model import ConfigError

__all__ = ["port", "address", "is_loopback"]


def port(v: int, key: str) -> int:
    """``v`` as a TCP/UDP port; ConfigError naming ``key`` otherwise."""
    if not 1 <= v <= 65535:
        raise ConfigError(f"{key} = {v}: a port is 1..65535")
    return v


def address(v: str, key: str) -> tuple[str, int]:
    """``"IP:PORT"`` as ``(ip, port)``; ConfigError naming ``key`` otherwise."""
    host, sep, p = v.rpartition(":")
    try:
        ipaddress.ip_address(host)
        if not sep:
            raise ValueError
        n = int(p)
    except ValueError:
        raise ConfigError(f"{key} = {v!r}: expected IP:PORT, e.g. 127.0.0.1:7702") from None
    return host, port(n, key)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
