"""A server's side of one non-blocking TCP connection, and the table of a server's open
connections: what the node's three TCP servers share (the session port,
:mod:`exposure.node.stages.ingest`; the replication port, :mod:`exposure.node.stages.replica`;
the recovery server, :mod:`exposure.node.stages.snapshot_server`).

Nothing here blocks and nothing raises for what a peer does: :meth:`Conn.recv` says
"nothing now" (``None``) apart from "the peer has gone" (``b""``: closed, shut its write
side, reset), and :meth:`Conn.send` sends what the socket takes now and queues the rest in
``out``, bounded by ``max_out``: a peer that does not read what it is sent is reported
(``SLOW``) and is never waited for. Each server keeps its own bounds (the values in
docs/security.md), its own counters and its own protocol; every method is one syscall at
most.
"""

from __future__ import annotations

import select
import socket
import time

from exposure.net.sock import flush, send_or_queue

__all__ = ["Conn", "Conns", "discard", "OK", "GONE", "SLOW"]

# What Conn.send did.
OK = 0      # sent, or queued behind what waits
GONE = 1    # the socket failed: the caller closes it
SLOW = 2    # nothing sent: the queue would pass max_out (the peer does not read)


def discard(sock: socket.socket, n: int) -> None:
    """Read (and drop) up to ``n`` bytes the peer sent, if any: a close with unread bytes
    is a reset, which can destroy what is still on its way to the peer; after it, a FIN."""
    try:
        sock.recv(n)
    except OSError:
        pass


class Conn:
    """One accepted connection (non-blocking): its socket and descriptor, the peer's
    address, when it was accepted (monotonic ns: deadlines count from it), and the bytes
    queued for it (``out``, at most ``max_out``). Servers subclass it for their state."""

    __slots__ = ("sock", "fd", "addr", "since", "out", "max_out")

    def __init__(self, sock: socket.socket, addr=None, now: int | None = None,
                 max_out: int = 0):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.since = time.monotonic_ns() if now is None else now
        self.out = bytearray()
        self.max_out = max_out

    def peer(self) -> str:
        """``host:port`` of the peer (for log lines)."""
        try:
            return f"{self.addr[0]}:{self.addr[1]}"
        except (IndexError, TypeError):
            return str(self.addr)

    def recv(self, n: int) -> bytes | None:
        """Up to ``n`` bytes: ``None`` when nothing is there now, ``b""`` when the peer has
        gone (closed, shut its write side, reset)."""
        try:
            return self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def recv_into(self, buf) -> int | None:
        """Receive into ``buf`` (a writable buffer): the bytes received, ``None`` when
        nothing is there now, 0 when the peer has gone."""
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return 0

    def send(self, data: bytes) -> int:
        """Send ``data`` now unless something is already queued (then behind it, to keep
        the order); what the socket does not take is queued. :data:`SLOW` (nothing sent)
        when the queue would pass ``max_out``, :data:`GONE` when the socket failed, else
        :data:`OK`."""
        if len(self.out) + len(data) > self.max_out:
            return SLOW
        return OK if send_or_queue(self.sock, self.out, data) else GONE

    def flush(self) -> bool:
        """Send what the socket takes of the queue; False when the socket failed."""
        return flush(self.sock, self.out)

    def send_now(self, data) -> int | None:
        """Hand the kernel what it takes of ``data`` now, queueing nothing: the bytes it
        took (0: none now), ``None`` when the socket failed."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return None


class Conns(dict):
    """A server's open connections by descriptor, each registered with the server's epoll
    ``ep`` while it is in the table."""

    def __init__(self, ep) -> None:
        super().__init__()
        self.ep = ep

    def add(self, c: Conn, events: int = select.EPOLLIN) -> None:
        """Register ``c`` with the epoll (raises OSError), then enter it."""
        self.ep.register(c.fd, events)
        self[c.fd] = c

    def drop(self, c: Conn) -> bool:
        """Unregister ``c`` and leave it out; False when it was out already (closed: its
        descriptor number may belong to a newer connection). The caller closes the
        socket."""
        if self.get(c.fd) is not c:
            return False
        try:
            self.ep.unregister(c.fd)
        except (KeyError, ValueError, OSError):
            pass
        del self[c.fd]
        return True
