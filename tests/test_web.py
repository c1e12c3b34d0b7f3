"""The web page's server (exposure.web): the users file, who sees what (read from the pushed
messages themselves), the security headers, the refusal to bind beyond loopback without a
users file, the client bound, and a slow client dropped. One node and one server (uvicorn
in a thread of this process) for the module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import threading
import time

import orjson
import pytest
from websupport import ACCOUNTS, PASSWORDS, PM1, PM2, fed_node, flow, send, users_file

from exposure.harness.wait import wait_for
from exposure.web.serve import (
    WebError,
    check_bind,
    is_loopback,
    listen_socket,
    make_server,
)
from exposure.web.users import UsersError, check_password, hash_password, load_users

websockets = pytest.importorskip("websockets", reason="the web extra: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra: pip install -e '.[web]'")


# ----------------------------------------------------------------------------- no process
def test_a_password_is_stored_as_a_salted_scrypt_hash_and_checked():
    h = hash_password("s3cret")
    assert h.startswith("scrypt$") and "s3cret" not in h
    assert h != hash_password("s3cret")  # salted
    assert check_password("s3cret", h) and not check_password("s3creT", h)
    assert not check_password("s3cret", "scrypt$1$1$1$00$00")  # malformed: no
    assert not check_password("x" * 5000, h)


def test_the_users_file_is_checked_whole_and_names_resolve(tmp_path):
    from exposure.core.refdata import Account, RefData

    names = RefData.from_rows(accounts=[Account(7, "ALPHA-1")])
    h = hash_password("pw")
    p = tmp_path / "u.toml"
    p.write_text(f'[[user]]\nname = "a"\npassword = "{h}"\naccounts = ["ALPHA-1", 3]\n'
                 f'[[user]]\nname = "r"\npassword = "{h}"\naccounts = "all"\n')
    u = load_users(p, names)
    assert u.by_name["a"].accounts == {7, 3} and u.by_name["r"].sees_all
    assert u.authenticate("a", "pw") is u.by_name["a"]
    assert u.authenticate("a", "no") is None and u.authenticate("nobody", "pw") is None
    bad = {
        '[[user]]\nname = "a"\npassword = "plain"\naccounts = "all"\n': "hash",
        f'[[user]]\nname = "a"\npassword = "{h}"\naccounts = ["NOPE"]\n': "NOPE",
        f'[[user]]\nname = "a"\npassword = "{h}"\n': "no accounts",
        f'[[user]]\nname = "a"\npassword = "{h}"\naccounts = "some"\n': "all",
        f'[[user]]\nname = "a"\npassword = "{h}"\naccounts = "all"\nrole = 1\n': "role",
        (f'[[user]]\nname = "a"\npassword = "{h}"\naccounts = "all"\n' * 2): "second",
        "user = 3\n": "no .*user.* table",
        "not toml [": "TOML",
    }
    for text, why in bad.items():
        p.write_text(text)
        with pytest.raises(UsersError, match=why):
            load_users(p, names)


def test_binding_beyond_loopback_needs_a_users_file(tmp_path, capsys):
    from exposure.ops.cli import main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_bind("127.0.0.1", None)
    with pytest.raises(WebError, match="users file"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", tmp_path / "users.toml")
    with pytest.raises(WebError, match="both"):
        check_bind("127.0.0.1", None, tls_cert=tmp_path / "c.pem")
    assert main(["web", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "users file" in capsys.readouterr().err
    # The config's [web] gives the defaults (paths next to it); options override them.
    cfg = tmp_path / "node.toml"
    cfg.write_text("[web]\nhost = '0.0.0.0'\nport = 1\n")
    assert main(["web", "--config", str(cfg)]) == 2
    assert "users file" in capsys.readouterr().err
    cfg.write_text("[web]\nhost = '0.0.0.0'\nport = 1\nusers = 'absent.toml'\n")
    assert main(["web", "--config", str(cfg)]) == 2
    assert str(tmp_path / "absent.toml") in capsys.readouterr().err
    assert main(["web", "--config", str(cfg), "--host", "127.0.0.1",
                 "--users", str(tmp_path / "other.toml")]) == 2
    assert str(tmp_path / "other.toml") in capsys.readouterr().err


def test_hash_password_prints_a_hash_that_checks(monkeypatch, capsys):
    import io

    from exposure.ops.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))
    assert main(["web", "--hash-password"]) == 0
    h = capsys.readouterr().out.strip()
    assert check_password("correct horse", h) and not check_password("correct horse\n", h)


# ----------------------------------------------------------------------------- a server
class Server:
    """A WebApp of a Book on the node's feed, served by uvicorn in a thread. ``local``
    False: the Book never reads the node's shared memory (the page as on another host:
    the feed alone)."""

    def __init__(self, cfg_path, users_path, tls: tuple | None = None, local: bool = True,
                 **kw):
        from exposure.config.node import load_config
        from exposure.harness.localnode import free_port
        from exposure.web.app import WebApp
        from exposure.web.users import load_users as load
        from exposure.web.view import Book

        cfg = load_config(cfg_path)
        self.book = Book(cfg, local=local)
        self.app = WebApp(self.book, load(users_path, cfg.names), tls=tls is not None, **kw)
        self.port = free_port()
        self.server = make_server(self.app.asgi, "127.0.0.1", self.port, *(tls or ()))
        # A small kernel send buffer per client: a client that does not read fills it soon
        self.sock = listen_socket("127.0.0.1", self.port, sndbuf=16384)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],),
                                       daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the web server to start")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.book.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with fed_node(tmp_path_factory.mktemp("webnode")) as n:
        yield n


@pytest.fixture(scope="module")
def server(node, tmp_path_factory):
    s = Server(node.config, users_file(tmp_path_factory.mktemp("webusers")), max_clients=4,
               queue=4, local=False)  # the feed alone: positions and limits included
    try:
        yield s
    finally:
        s.stop()


def http(server: Server, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def login(server: Server, name: str, password: str | None = None) -> str:
    """The session cookie of ``name`` (its header value)."""
    st, h, _ = http(server, "POST", "/login", orjson.dumps(
        {"name": name, "password": password or PASSWORDS[name]}),
        {"content-type": "application/json"})
    assert st == 200, st
    return h["set-cookie"].split(";")[0]


def read_messages(server: Server, cookie: str | None, seconds: float,
                  during=None, send: list | None = None) -> tuple[list[dict], int | None]:
    """Connect as ``cookie``'s user, send ``send``, read every message for ``seconds``
    (while ``during()`` runs in a thread); the messages and the close code (None: open)."""
    out: list[dict] = []

    async def go():
        hdr = {"Cookie": cookie} if cookie else {}
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws",
                                      additional_headers=hdr) as ws:
            for m in send or ():  # (a number: a pause of that many seconds)
                if isinstance(m, float):
                    await asyncio.sleep(m)
                else:
                    await ws.send(orjson.dumps(m).decode())
            end = time.monotonic() + seconds
            try:
                while (left := end - time.monotonic()) > 0:
                    try:
                        out.append(orjson.loads(await asyncio.wait_for(ws.recv(), left)))
                    except TimeoutError:
                        break
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
        return None

    t = threading.Thread(target=during) if during else None
    if t:
        t.start()
    try:
        code = asyncio.run(go())
    finally:
        if t:
            t.join(60)
    return out, code


# ----------------------------------------------------------------------------- tests
@pytest.mark.process
def test_every_answer_carries_the_security_headers_and_a_strict_csp(server):
    st, h, body = http(server, "GET", "/")
    assert st == 200 and b'data-table="fund"' in body
    csp = h["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
    assert h["referrer-policy"] == "no-referrer" and h["cache-control"] == "no-store"
    assert "server" not in h
    st, h, body = http(server, "GET", "/static/app.js")
    assert st == 200 and h["content-type"].startswith("text/javascript") and body
    assert "content-security-policy" in h
    for path in ("/static/../users.py", "/static/nope.js", "/admin"):
        st, h, _ = http(server, "GET", path)
        assert st == 404 and "content-security-policy" in h
    # Read-only: nothing but the login is posted; a login is JSON only (no form CSRF).
    assert http(server, "POST", "/", b"x")[0] == 405
    assert http(server, "POST", "/login", b"name=risk&password=x",
                {"content-type": "application/x-www-form-urlencoded"})[0] == 415


@pytest.mark.process
def test_a_login_is_needed_and_wrong_passwords_are_refused(server):
    st, _, _ = http(server, "POST", "/login",
                    orjson.dumps({"name": "risk", "password": "wrong"}),
                    {"content-type": "application/json"})
    assert st == 401
    assert http(server, "POST", "/login", b"{not json",
                {"content-type": "application/json"})[0] == 400
    assert http(server, "POST", "/login", b"{" + b" " * 100_000 + b"}",
                {"content-type": "application/json"})[0] == 413
    msgs, code = read_messages(server, None, 2.0)
    assert msgs == [] and code == 4401
    msgs, code = read_messages(server, "exposure_session=forged", 2.0)
    assert msgs == [] and code == 4401
    # A page of another origin may not open the WebSocket with the user's cookie.
    cookie = login(server, "risk")

    async def cross():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws",
                                      origin="http://evil.example",
                                      additional_headers={"Cookie": cookie}) as ws:
            await ws.recv()

    with pytest.raises(Exception) as e:
        asyncio.run(cross())
    assert server.app.counters["refused_origin"] >= 1, e.value


@pytest.mark.process
def test_a_pm_receives_only_their_accounts_and_the_fund_level_tables(node, server):
    """Every message pushed to pm1 (the snapshot, the updates while a flow runs, a
    drill-down) carries only pm1's accounts; the risk user gets every account, equal to
    what dump prints; both get the same fund line, instruments and sectors. The page is
    fed by the feed alone (no desk): the drill-down and the limits come on the feed."""
    pm1, risk = login(server, "pm1"), login(server, "risk")
    seen: dict[str, list[dict]] = {}

    def flow_then_read_risk():
        send(node, flow(1500, seed=29))

    # pm1 opens its own account, then pm2's: the second gets no rows.
    seen["pm1"], code = read_messages(server, pm1, 3.0, during=flow_then_read_risk,
                                      send=[{"open": PM1[1]}, 0.5, {"open": PM2[0]}])
    assert code is None
    seen["risk"], _ = read_messages(server, risk, 1.5, send=[{"open": PM1[1]}])
    cols = seen["pm1"][0]["columns"]
    acc_ids: set[int] = set()
    updates = 0
    for m in seen["pm1"]:
        if m["type"] in ("snapshot", "update"):
            acc_ids |= {r[0] for r in m["accounts"]}
            updates += m["type"] == "update" and bool(m["accounts"])
    assert acc_ids and acc_ids <= set(PM1), acc_ids - set(PM1)
    assert updates >= 1
    pos = {m["positions"]["account"]: m["positions"] for m in seen["pm1"]
           if "positions" in m}
    assert pos[PM1[1]]["rows"] and pos[PM2[0]]["rows"] is None
    assert "not one of your accounts" in pos[PM2[0]]["why"]
    # The risk user's snapshot equals dump, names and all; pm1's fund-level parts too.
    want = node.dump()
    snap = seen["risk"][0]
    assert snap["type"] == "snapshot" and snap["user"] == "risk"
    rows = {r[0]: dict(zip(cols["accounts"], r, strict=True)) for r in snap["accounts"]}
    assert sorted(rows) == sorted(a["account"] for a in want["accounts"])
    for a in want["accounts"]:
        got = rows[a["account"]]
        named = a["account"] in ACCOUNTS  # (accounts.csv names the first flow's accounts)
        assert got["name"] == (f"ACC-{a['account']:04d}" if named else None)
        for k in ("gross", "net", "pnl", "live_orders", "breach", "worst_gross"):
            assert got[k] == a[k], (a["account"], k)
    for k in cols["fund"]:
        assert snap["fund"][k] == want["fund"][k], k
    ins = {r[0]: dict(zip(cols["instruments"], r, strict=True)) for r in snap["instruments"]}
    assert sorted(ins) == sorted(i["instrument"] for i in want["instruments"])
    for i, r in ins.items():  # instruments.csv names every third instrument
        assert r["symbol"] == (f"SYM{i}" if i % 3 == 0 and i < 400 else None), i
    # The drill-down off the feed equals dump's positions of the account, and each
    # account's limits (the breach flags' limit and use in percent) equal the node's.
    want_pos = [p for p in want["positions"] if p["account"] == PM1[1]]
    got_pos = [m["positions"] for m in seen["risk"] if "positions" in m][-1]
    assert got_pos["account"] == PM1[1] and not got_pos["why"]
    pcols = cols["positions"]
    got_rows = [dict(zip(pcols, r, strict=True)) for r in got_pos["rows"]]
    assert [r["instrument"] for r in got_rows] == [p["instrument"] for p in want_pos]
    for g, w in zip(got_rows, want_pos, strict=True):
        assert [g[k] for k in ("pos", "open_buy", "open_sell", "pnl")] == \
            [w[k] for k in ("pos", "open_buy", "open_sell", "pnl")], w
    from exposure.engine.desk import Desk

    with Desk(node.name) as desk:  # (the test reads the node's limits to compare)
        lim = desk.state.acc_lim.copy()
    assert any(r["limits"] and any(r["limits"]) for r in rows.values())
    for a, r in rows.items():
        assert r["limits"] == lim[a].tolist(), a
    assert snap["meta"]["role"] == "primary" and snap["meta"]["epoch"] >= 1
    assert not snap["meta"]["stale"]
    # SPEC 7: the money figures' currency; each instrument's own and its rate (base here)
    assert snap["meta"]["base_currency"] == "USD"
    assert {(r["currency"], r["rate"]) for r in ins.values()} == {("USD", 1.0)}


@pytest.mark.process
def test_clients_are_bounded_and_bad_messages_are_ignored(server):
    cookie = login(server, "risk")
    hdr = {"Cookie": cookie}

    async def go():
        held = [await websockets.connect(f"ws://127.0.0.1:{server.port}/ws",
                                         additional_headers=hdr)
                for _ in range(server.app.max_clients - len(server.app.clients))]
        try:
            for ws in held:
                assert orjson.loads(await ws.recv())["type"] == "snapshot"
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws",
                                          additional_headers=hdr) as extra:
                with pytest.raises(websockets.ConnectionClosed) as e:
                    await extra.recv()
                assert e.value.rcvd.code == 1013
            # Hostile messages: counted, ignored; the client (reading) stays connected.
            async def drain(ws):
                with contextlib.suppress(Exception):
                    while True:
                        await ws.recv()

            reader = asyncio.create_task(drain(held[0]))
            for junk in ("", "[]", "{\"open\": -1}", "{\"open\": true}", "\x00" * 100,
                         "{\"open\": 1e400}", "{\"drop\": 1}"):
                await held[0].send(junk)
            await held[0].send(b"\xff\xfe")
            for k in range(300):  # a burst of drill-downs: one answer, the last
                await held[0].send(orjson.dumps({"open": k}).decode())
            await asyncio.sleep(0.3)
            assert held[0].state.name == "OPEN"
            reader.cancel()
        finally:
            for ws in held:
                await ws.close()

    asyncio.run(go())
    assert server.app.counters["refused_full"] >= 1
    assert server.app.counters["bad_messages"] >= 7


@pytest.mark.process
def test_a_client_that_does_not_read_is_dropped_not_buffered(node, server):
    """A client that completes the handshake then never reads (its receive buffer a few
    KiB): its queue fills while the flow runs, and the server drops it; a reading client
    beside it is served throughout."""
    cookie = login(server, "risk")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n").encode())
    try:
        wait_for(lambda: len(server.app.clients) >= 1, 10, "the silent client to connect")
        before = server.app.counters["dropped_slow"]
        stop = threading.Event()

        def pump():
            k = 0
            while not stop.is_set() and k < 8:
                send(node, flow(2000, seed=100 + k))
                k += 1

        t = threading.Thread(target=pump)
        t.start()
        try:
            msgs, code = read_messages(server, cookie, 0.1)
            assert msgs and msgs[0]["type"] == "snapshot"
            wait_for(lambda: server.app.counters["dropped_slow"] > before, 30,
                     "the slow client to be dropped")
        finally:
            stop.set()
            t.join(120)
        # Another client is served as before.
        msgs, code = read_messages(server, cookie, 0.5)
        assert msgs and msgs[0]["type"] == "snapshot" and code is None
    finally:
        s.close()


@pytest.mark.process
def test_over_tls_the_page_is_https_with_hsts_and_a_secure_cookie(node, tmp_path):
    """--tls-cert/--tls-key: HTTPS (a self-signed certificate made here), the HSTS header,
    and the session cookie marked Secure."""
    import http.client
    import ssl

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {p.stderr[-300:]!r}")
    s = Server(node.config, users_file(tmp_path), tls=(cert, key))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        c = http.client.HTTPSConnection("127.0.0.1", s.port, context=ctx, timeout=10)
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and r.read()
        assert r.getheader("strict-transport-security").startswith("max-age=")
        c.request("POST", "/login", orjson.dumps({"name": "pm2", "password": PASSWORDS["pm2"]}),
                  {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 200 and "secure" in r.getheader("set-cookie").lower()
        c.close()
        # Plain HTTP to the TLS port gets no page.
        plain = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/")
            plain.getresponse()
        plain.close()
    finally:
        s.stop()
