"""``exposure web``: start the page's server (uvicorn) for one node or consolidator.

Before it binds, :func:`check_bind` refuses an address beyond loopback without a users
file (a page that shows every account to anyone who can reach the port), and a
certificate without its key. TLS: ``tls_cert`` and ``tls_key`` (PEM files), or a reverse
proxy in front (docs/web.md shows one).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

from exposure.config.model import NodeConfig
from exposure.net.hosts import is_loopback
from exposure.web.users import Users, load_users

__all__ = ["check_bind", "serve", "make_server", "listen_socket", "SNDBUF", "is_loopback",
           "WebError"]

log = logging.getLogger(__name__)


class WebError(ValueError):
    """A setting that ``exposure web`` refuses to start with; the message says why."""


def check_bind(host: str, users: str | Path | None, tls_cert: str | Path | None = None,
               tls_key: str | Path | None = None) -> None:
    """Raise :class:`WebError` if ``host`` is beyond loopback and there is no users file,
    or if only one of the certificate and key is given, or either is unreadable."""
    if users is None and not is_loopback(host):
        raise WebError(f"--host {host} is reachable beyond this machine: give a users file "
                       "(--users FILE: who may log in and which accounts each sees), or bind "
                       "to 127.0.0.1 behind a reverse proxy that authenticates")
    if (tls_cert is None) != (tls_key is None):
        raise WebError("TLS needs both --tls-cert and --tls-key")
    for f in (tls_cert, tls_key):
        if f is not None and not Path(f).is_file():
            raise WebError(f"{f}: no such file")


SNDBUF = 256 * 1024  # a client's kernel send buffer (fixed: no autotuning up to MiBs)


def listen_socket(host: str, port: int, sndbuf: int = SNDBUF) -> socket.socket:
    """The listening socket, with ``SO_SNDBUF`` set: every accepted client inherits it, so
    what the kernel holds for a client that does not read is bounded too (after it, the
    client's queue fills and the client is dropped: :mod:`exposure.web.app`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        s.bind((host, port))
        s.listen(256)
        s.set_inheritable(True)
    except OSError:
        s.close()
        raise
    return s


def make_server(asgi, host: str, port: int, tls_cert: str | Path | None = None,
                tls_key: str | Path | None = None, max_clients: int = 200):
    """The uvicorn server of ``asgi`` with the page's settings: client messages of at most
    4 KiB, WebSocket pings (a dead peer found in 40 s), at most ``max_clients`` + 64
    connections at once (more are answered 503), no Server header."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(
        asgi, host=host, port=port, log_level="warning",
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None, ws_max_size=4096,
        ws_ping_interval=20.0, ws_ping_timeout=20.0, limit_concurrency=max_clients + 64,
        lifespan="on", server_header=False, proxy_headers=False))


def serve(cfg: NodeConfig, host: str = "127.0.0.1", port: int = 8080,
          users: str | Path | None = None, tls_cert: str | Path | None = None,
          tls_key: str | Path | None = None, max_clients: int = 200,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve the page of the node ``cfg`` describes until SIGINT/SIGTERM. ``ready`` is
    called with the page's URL once it listens."""
    from exposure.web.app import WebApp
    from exposure.web.view import Book

    check_bind(host, users, tls_cert, tls_key)
    u: Users | None = load_users(users, cfg.names) if users is not None else None
    book = Book(cfg)
    try:
        app = WebApp(book, u, max_clients=max_clients, tls=tls_cert is not None)
        server = make_server(app.asgi, host, port, tls_cert, tls_key, max_clients)
        sock = listen_socket(host, port)
    except BaseException:
        book.close()
        raise
    scheme = "https" if tls_cert else "http"

    if ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets)
            ready(f"{scheme}://{host}:{port}/")

        server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        book.close()
