"""The web page's server: Starlette routes, the WebSocket push, logins, security headers.

* ``GET /`` the page, ``GET /static/app.js`` and ``/static/app.css`` (served from the
  package, from memory); ``POST /login`` (JSON ``{"name", "password"}``; sets an HttpOnly,
  SameSite=Strict session cookie) and ``POST /logout``; ``GET /health``.
* ``/ws``: the WebSocket. On connect a client gets a full snapshot of what its user may
  see, then at most ``rate`` updates a second (the rows that moved since the last, one
  message per tick: conflated), and the drill-down (``{"open": ACCOUNT}``) of the account it
  opened: its positions ride in the next tick's message, and again whenever the account
  moves (a burst of requests costs one answer: the last one wins). The instruments and
  sectors (large, fund-level) go at most ``fund_level_rate`` times a second (default 2).
  Messages are JSON in binary frames (UTF-8, encoded once per tick and scope, not per
  client). Read-only: the only messages a client sends are ``open`` and ``close``.
* **Who sees what**: with a users file, every message is built for the user's accounts
  (:class:`~exposure.web.view.Tick`): the fund line, instruments and sectors are
  fund-level; account rows and positions are only the user's. Without a users file (bound
  to loopback only: :mod:`exposure.web.serve` refuses otherwise) every client sees all.
* **Bounds**: at most ``max_clients`` WebSockets (one more is closed with 1013, "try again
  later"); each client has a queue of at most ``queue`` messages: a client that does not
  take them (a slow link, a stopped tab) finds it full and is dropped (closed with 1008),
  never buffered without bound. A client message larger than 4 KiB is refused (uvicorn's
  ``ws_max_size``); at most ``max_sessions`` logins are held.
* **Headers**: every HTTP answer carries a Content-Security-Policy that allows only this
  origin's script, style and WebSocket (no inline script), ``X-Content-Type-Options:
  nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``, ``Cache-Control:
  no-store`` and, over TLS, ``Strict-Transport-Security``. A WebSocket whose Origin is not
  this host is refused (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from exposure.web.users import User, Users
from exposure.web.view import Book

__all__ = ["WebApp", "Client", "CSP", "SECURITY_HEADERS", "COOKIE"]

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
COOKIE = "exposure_session"
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_SESSION_S = 12 * 3600


def _static(name: str) -> bytes:
    return resources.files("exposure.web").joinpath("static", name).read_bytes()


@dataclass(eq=False)
class Client:
    """One connected page: its user (None: every account), its bounded queue of messages
    and the account it has opened (the drill-down), if any."""

    ws: WebSocket
    user: User | None
    queue: asyncio.Queue
    opened: int | None = None
    asked: bool = False     # a drill-down asked for: answered in the next tick
    dropped: bool = False
    sent: int = 0
    since: float = field(default_factory=time.monotonic)


class _Headers:
    """ASGI middleware: the security headers on every HTTP answer."""

    def __init__(self, app, tls: bool):
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        if tls:
            self.extra.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": [*msg.get("headers", []),
                                          *[h for h in self.extra if h[0] not in have]]}
            await send(msg)

        return await self.app(scope, receive, with_headers)


class WebApp:
    """The server of one :class:`~exposure.web.view.Book`: :attr:`asgi` is the ASGI app
    (what uvicorn runs). ``users``: the users file (None: no login, every client sees
    all). ``rate``: updates a second per client (at most 10). ``max_clients``: WebSockets
    at once. ``queue``: messages a client may have waiting before it is dropped."""

    def __init__(self, book: Book, users: Users | None = None, *, rate: float = 10.0,
                 max_clients: int = 200, queue: int = 64, tls: bool = False,
                 max_sessions: int = 10_000, fund_level_rate: float = 2.0):
        if not 0 < rate <= 10:
            raise ValueError(f"rate {rate}: updates per second, above 0 and at most 10")
        if max_clients < 1 or queue < 2:
            raise ValueError(f"max_clients {max_clients} (>= 1), queue {queue} (>= 2)")
        self.book = book
        self.users = users
        self.period = 1.0 / rate
        self.fund_level_every = max(1, round(rate / min(rate, fund_level_rate)))
        self.max_clients = max_clients
        self.queue = queue
        self.tls = tls
        self.max_sessions = max_sessions
        self.clients: set[Client] = set()
        self.sessions: dict[str, tuple[User, float]] = {}
        self.counters = {"connected": 0, "refused_full": 0, "refused_auth": 0,
                         "refused_origin": 0, "dropped_slow": 0, "logins": 0,
                         "login_failures": 0, "updates": 0, "bad_messages": 0}
        self._login_gate = asyncio.Semaphore(2)  # scrypt: bounded CPU for logins
        self._tasks: list[asyncio.Task] = []
        self._page = _static("index.html")
        self._static = {n: _static(n) for n in _STATIC}
        routes = [Route("/", self.index), Route("/static/{name}", self.static),
                  Route("/login", self.login, methods=["POST"]),
                  Route("/logout", self.logout, methods=["POST"]),
                  Route("/health", self.health), WebSocketRoute("/ws", self.ws)]
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan)
        self.asgi = _Headers(self.starlette, tls)

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        loop = asyncio.get_running_loop()
        socks = list(self.book.sub.selectables)
        for s in socks:
            loop.add_reader(s.fileno(), self._pump)
        self._tasks.append(asyncio.create_task(self._ticker()))
        try:
            yield
        finally:
            for s in socks:
                loop.remove_reader(s.fileno())
            for t in self._tasks:
                t.cancel()
            for c in list(self.clients):
                await self._drop(c, 1001, "server shutting down")

    def _pump(self) -> None:
        try:
            self.book.pump()
        except Exception:  # never let the feed kill the loop: log it, go on
            log.exception("feed poll failed")

    async def _ticker(self) -> None:
        """Every period: one tick of the book, offered to every client."""
        next_t = time.monotonic()
        beat = 0.0
        was_stale = None
        k = 0
        while True:
            next_t += self.period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if time.monotonic() - next_t > self.period:  # late (a busy loop): no burst
                next_t = time.monotonic()
            try:
                self.book.pump()
                self._expire_sessions()
                if not self.clients:
                    self.book.take()
                    continue
                stale = self.book.stale()
                flipped, was_stale = stale != was_stale, stale
                k += 1
                tick = self.book.take(fresh_meta=flipped,
                                      fund_level=k % self.fund_level_every == 0)
                now = time.monotonic()
                quiet = tick.empty and not tick.reset and not flipped and now - beat < 1.0
                if not quiet:  # (nothing moved: the node line once a second, a heartbeat)
                    beat = now
                for c in list(self.clients):
                    drill = c.opened is not None and (
                        c.asked or tick.reset or c.opened in tick.moved)
                    if quiet and not drill:
                        continue
                    if tick.reset:
                        msg = self.book.snapshot(c.user)
                    else:
                        msg = tick.message(c.user)
                    if drill:
                        # The opened account's positions ride in the tick's message (one
                        # push per tick, at most ``rate`` a second, drill-down or not).
                        c.asked = False
                        msg = msg[:-1] + b',"positions":' + \
                            self.book.positions(c.opened, c.user) + b"}"
                    self._offer(c, msg)
                self.counters["updates"] += 1
            except Exception:
                log.exception("tick failed")

    def _offer(self, c: Client, msg: bytes) -> None:
        if c.dropped:
            return
        try:
            c.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.counters["dropped_slow"] += 1
            log.warning("dropping a slow client (%s): %d messages waiting",
                        c.user.name if c.user else "local", c.queue.qsize())
            self._tasks.append(asyncio.create_task(self._drop(c, 1008, "too slow")))

    async def _drop(self, c: Client, code: int, reason: str) -> None:
        c.dropped = True
        self.clients.discard(c)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.ws.close(code, reason), 2.0)
        self._tasks = [t for t in self._tasks if not t.done()]

    # ------------------------------------------------------------------ logins
    def _expire_sessions(self) -> None:
        now = time.monotonic()
        if len(self.sessions) > self.max_sessions // 2:
            self.sessions = {k: v for k, v in self.sessions.items() if v[1] > now}

    def user_of(self, cookies: dict[str, str]) -> tuple[bool, User | None]:
        """(allowed, user) for a request's cookies: without a users file everyone is
        allowed and sees all (None)."""
        if self.users is None:
            return True, None
        tok = cookies.get(COOKIE)
        s = self.sessions.get(tok) if tok else None
        if s is None or s[1] < time.monotonic():
            return False, None
        return True, s[0]

    async def login(self, request: Request) -> Response:
        if self.users is None:
            return JSONResponse({"ok": True, "user": None})
        if request.headers.get("content-type", "").split(";")[0].strip() != \
                "application/json":
            return JSONResponse({"error": "JSON only"}, 415)
        body = b""
        async for chunk in request.stream():  # at most 4 KiB read, whatever is sent
            body += chunk
            if len(body) > 4096:
                return JSONResponse({"error": "too large"}, 413)
        try:
            d = orjson.loads(body)
            name, pw = d["name"], d["password"]
            assert isinstance(name, str) and isinstance(pw, str)
        except Exception:
            return JSONResponse({"error": "name and password"}, 400)
        async with self._login_gate:
            user = await asyncio.to_thread(self.users.authenticate, name, pw)
        if user is None:
            self.counters["login_failures"] += 1
            await asyncio.sleep(0.5)
            return JSONResponse({"error": "wrong name or password"}, 401)
        if len(self.sessions) >= self.max_sessions:
            self._expire_sessions()
            if len(self.sessions) >= self.max_sessions:
                return JSONResponse({"error": "too many sessions"}, 503)
        tok = secrets.token_urlsafe(32)
        self.sessions[tok] = (user, time.monotonic() + _SESSION_S)
        self.counters["logins"] += 1
        r = JSONResponse({"ok": True, "user": user.name})
        r.set_cookie(COOKIE, tok, max_age=_SESSION_S, httponly=True, samesite="strict",
                     secure=self.tls, path="/")
        return r

    async def logout(self, request: Request) -> Response:
        tok = request.cookies.get(COOKIE)
        if tok:
            self.sessions.pop(tok, None)
        r = JSONResponse({"ok": True})
        r.delete_cookie(COOKIE, path="/")
        return r

    # ------------------------------------------------------------------ pages
    async def index(self, request: Request) -> Response:
        return Response(self._page, media_type="text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static:
            return Response("not found", 404, media_type="text/plain")
        return Response(self._static[name], media_type=_STATIC[name])

    async def health(self, request: Request) -> Response:
        m = self.book.meta()
        return JSONResponse({"stale": m["stale"], "feed": m["feed"], "epoch": m["epoch"],
                             "clients": len(self.clients), **self.counters})

    # ------------------------------------------------------------------ the WebSocket
    def _origin_ok(self, ws: WebSocket) -> bool:
        origin = ws.headers.get("origin")
        if origin is None:  # not a browser (browsers always send it)
            return True
        host = ws.headers.get("host", "")
        return origin.split("://", 1)[-1].rstrip("/") == host

    async def ws(self, ws: WebSocket) -> None:
        if not self._origin_ok(ws):
            self.counters["refused_origin"] += 1
            await ws.close(1008, "cross-origin")
            return
        allowed, user = self.user_of(ws.cookies)
        await ws.accept()
        if not allowed:
            self.counters["refused_auth"] += 1
            await ws.close(4401, "log in")
            return
        if len(self.clients) >= self.max_clients:
            self.counters["refused_full"] += 1
            await ws.close(1013, f"too many clients (at most {self.max_clients})")
            return
        c = Client(ws, user, asyncio.Queue(self.queue))
        self.clients.add(c)
        self.counters["connected"] += 1
        c.queue.put_nowait(self.book.snapshot(user))
        sender = asyncio.create_task(self._send(c))
        try:
            while not c.dropped:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                self._request(c, msg.get("text") or msg.get("bytes") or b"")
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.clients.discard(c)
            sender.cancel()

    def _request(self, c: Client, raw: str | bytes) -> None:
        """A client's message: ``{"open": ACCOUNT}`` or ``{"close": true}``; anything
        else is counted and ignored."""
        try:
            d = orjson.loads(raw)
            if "open" in d:
                a = d["open"]
                if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < 1 << 31:
                    raise ValueError(a)
                c.opened, c.asked = a, True  # (answered in the next tick's message)
            elif d.get("close"):
                c.opened = None
            else:
                raise ValueError(d)
        except Exception:
            self.counters["bad_messages"] += 1

    async def _send(self, c: Client) -> None:
        try:
            while True:
                msg = await c.queue.get()
                await c.ws.send_bytes(msg)
                c.sent += 1
        except asyncio.CancelledError:
            raise
        except Exception:  # the connection went away: the receive loop ends it
            c.dropped = True
            self.clients.discard(c)
