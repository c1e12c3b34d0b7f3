"""Guards for a listening TCP port that anyone on the network may reach: accepting without
ever dying of the file-descriptor limit, TCP keepalive, and logs that a flood cannot turn
into a flood of lines (:class:`exposure.core.log.RateLog`, re-exported here). Used by the
session port (ingest) and the replication port."""

from __future__ import annotations

import errno
import os
import socket

from exposure.core.log import RateLog

__all__ = ["Listener", "keepalive", "RateLog"]

_RETRY = (errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EPERM)
_FD_LIMIT = (errno.EMFILE, errno.ENFILE)


def keepalive(sock: socket.socket, idle_s: int = 10, interval_s: int = 5,
              count: int = 3) -> None:
    """Detect a dead peer (a half-open connection) after about idle + interval x count."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class Listener:
    """A non-blocking listening socket whose :meth:`accept` never raises.

    When the process is out of file descriptors (EMFILE, ENFILE) a pending connection would
    stay in the backlog and wake every poll; so one descriptor is kept in reserve: it is
    closed, the connection accepted and closed at once (the peer sees it refused), and the
    reserve reopened. ``fd_limit`` counts those; ``accept_errors`` counts the other failures
    of accept() that are not retried (ENOBUFS, ENOMEM). The caller may read and reset both."""

    def __init__(self, addr: tuple[str, int] | str, backlog: int = 128) -> None:
        # ``addr``: (host, port), or a Unix socket's name (a str: a leading NUL is Linux's
        # abstract namespace, no file)
        self.unix = isinstance(addr, str)
        self.sock = socket.socket(socket.AF_UNIX if self.unix else socket.AF_INET,
                                  socket.SOCK_STREAM)
        try:
            if not self.unix:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(backlog)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.fd = self.sock.fileno()
        self._spare = os.open(os.devnull, os.O_RDONLY)
        self.fd_limit = 0
        self.accept_errors = 0

    def accept(self, log: RateLog | None = None) -> socket.socket | None:
        """One pending connection (non-blocking; TCP_NODELAY on TCP), or None when there is none
        now (or it could not be kept)."""
        got = self.accept_addr(log)
        return None if got is None else got[0]

    def accept_addr(self, log: RateLog | None = None) -> tuple[socket.socket, object] | None:
        """As :meth:`accept`, with the peer's address as accept() gave it."""
        for _ in range(8):
            try:
                s, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno in _RETRY:
                    continue
                if e.errno in _FD_LIMIT:
                    self._shed()
                    if log:
                        log("fd", f"out of file descriptors ({e.strerror}): refusing "
                                  "connections until some close")
                    return None
                self.accept_errors += 1  # ENOBUFS, ENOMEM: try again on a later pass
                if log:
                    log("accept", f"accept failed: {e.strerror or e}")
                return None
            try:
                s.setblocking(False)
                if not self.unix:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                s.close()
                continue
            return s, addr
        return None

    def _shed(self) -> None:
        self.fd_limit += 1
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        try:
            s, _ = self.sock.accept()
            s.close()
        except OSError:
            pass
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._spare = -1

    def close(self) -> None:
        self.sock.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
