"""systemd's notify protocol (sd_notify(3)), without libsystemd: datagrams to
``$NOTIFY_SOCKET``.

The supervisor sends ``READY=1`` once the node's processes are started (``Type=notify``
units wait for it), ``STATUS=...`` on a change of role, ``WATCHDOG=1`` while every process
makes progress (``WatchdogSec=``: systemd kills and restarts a node whose supervisor
stops sending it, hung or stopped), and ``STOPPING=1``. Outside systemd (no
``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    """Sends to ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket).
    ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set, naming this process) enable the
    watchdog; :meth:`watchdog` pings at most every third of that interval."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.addr = ("\0" + path[1:]) if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.addr:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.every_ns = 0
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.every_ns = int(usec) * 1000 // 3
        self.next_ping = 0

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, message: str) -> bool:
        """One notification; False if it could not be sent (never raises)."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto(message.encode(), self.addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        if not self.every_ns:
            return
        now = time.monotonic_ns()
        if now >= self.next_ping:
            self.next_ping = now + self.every_ns
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
