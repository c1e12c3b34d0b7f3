"""Non-blocking sends with an output queue: the session protocol's and the replication
link's answers never block a stage loop; what a socket does not take waits in ``out``."""

from __future__ import annotations

import socket

__all__ = ["send_or_queue", "flush"]


def send_or_queue(sock: socket.socket, out: bytearray, data: bytes) -> bool:
    """Send ``data`` now unless something is already queued (then queue it behind, to keep
    the order); queue what the socket does not take. False when the socket failed (the
    caller closes it)."""
    if out:
        out += data
        return True
    try:
        n = sock.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        return False
    if n < len(data):
        out += data[n:]
    return True


def flush(sock: socket.socket, out: bytearray) -> bool:
    """Send what the socket takes of ``out``; False when the socket failed."""
    try:
        n = sock.send(out)
    except BlockingIOError:
        return True
    except OSError:
        return False
    del out[:n]
    return True
