"""A session client: log in, send records to a node, resend what it does not hold, wait for
acks (the protocol: :mod:`exposure.net.wire`)."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np

from exposure.core.types import NODE_REASONS
from exposure.net import wire as W

__all__ = ["send_records", "SendError", "login", "HEARTBEAT_S"]

HEARTBEAT_S = 5.0  # a client that has sent nothing this long sends a HEARTBEAT (the node
                   # closes a session idle for [ingest] idle_timeout_ms, 30 s by default)


class SendError(RuntimeError):
    """The node is unreachable, refused the session, or did not acknowledge in time."""


def _frames(sock: socket.socket, reader: W.FrameReader, deadline: list[float]):
    """Every frame the node sends, in order (one iterator per session: frames that arrive
    together are never dropped); ``deadline[0]`` may be moved between frames. Once logged
    in (a LOGIN_OK seen) it sends a HEARTBEAT every ``HEARTBEAT_S`` while it waits, however
    many answers arrive, so a long wait is not idleness (before login nothing but a LOGIN
    may be sent)."""
    live = False
    beat = time.monotonic() + HEARTBEAT_S  # (answers arriving are not sending: the node's
    while True:                            # idle timeout counts what it receives)
        now = time.monotonic()
        left = deadline[0] - now
        if left <= 0:
            raise SendError("timed out waiting for the node")
        if live and now >= beat:
            beat = now + HEARTBEAT_S
            try:
                sock.sendall(W.encode_heartbeat())
            except OSError as e:
                raise SendError(f"the node went away: {e}") from None
        sock.settimeout(max(0.01, min(left, beat - now if live else HEARTBEAT_S)))
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not data:
            raise SendError("the node closed the session")
        for kind, payload in reader.feed(data):
            live = live or kind == W.K_LOGIN_OK
            yield kind, payload


def _sleep_beating(sock: socket.socket, until: float) -> None:
    """Sleep until monotonic ``until``, with a HEARTBEAT every ``HEARTBEAT_S`` meanwhile
    (a slowly paced sender is not idle)."""
    while (wait := until - time.monotonic()) > 0:
        time.sleep(min(wait, HEARTBEAT_S))
        if until - time.monotonic() > 0:
            sock.sendall(W.encode_heartbeat())


def _reject_text(payload) -> str:
    code, detail, text = W.decode_reject(payload)
    return f"{text} ({W.REJECT_NAMES.get(code, code)})"


def login(sock: socket.socket, frames, session: int, secret: bytes | None) -> int:
    """Log in on a fresh connection (``frames``: :func:`_frames` of it): answer the
    node's CHALLENGE with the proof of ``secret`` (None: a node without a sessions file)
    and return the last seq the node holds for ``session``."""
    for kind, payload in frames:
        if kind == W.K_CHALLENGE:
            proof = W.login_mac(secret, session, payload) if secret else bytes(32)
            sock.sendall(W.encode_login(session, proof))
        elif kind == W.K_REJECT:
            raise SendError(f"login refused: {_reject_text(payload)}")
        elif kind == W.K_LOGIN_OK:
            (held,) = struct.unpack("<Q", payload)
            return held
    raise SendError("the node closed the session")  # (not reached: frames raises)


def _session_once(host: str, port: int, recs: np.ndarray, session: int, timeout: float,
                  frame: int, rate: float = 0.0, secret: bytes | None = None,
                  progress=None) -> dict:
    """One connection: login, send what the node does not hold, wait for every ACK."""
    n = len(recs)
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        raise SendError(f"cannot reach the node at {host}:{port}: {e.strerror or e}") from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = [time.monotonic() + timeout]
        frames = _frames(sock, W.FrameReader(), deadline)
        held = login(sock, frames, session, secret)
        todo = recs[recs["sseq"] > held]
        try:
            t0 = said = time.monotonic()
            for lo in range(0, len(todo), frame):
                if rate > 0:  # paced: frame k leaves at t0 + k * frame / rate
                    _sleep_beating(sock, t0 + lo / rate)
                part = todo[lo:lo + frame]
                part["send_ns"] = time.time_ns()
                sock.sendall(W.encode_events(part))
                if progress is not None and time.monotonic() - said >= 2.0:
                    said = time.monotonic()
                    progress(f"sent {lo + len(part):,} of {len(todo):,} events "
                             f"({(lo + len(part)) / (said - t0):,.0f}/s)")
        except OSError as e:
            raise SendError(f"the node went away while sending: {e}") from None
        # The node acknowledges after login and whenever compute moves on; wait for all.
        acked, rejects = -1, [0] * 8
        deadline[0] = time.monotonic() + timeout
        for kind, payload in frames:
            if kind == W.K_ACK:
                acked, rejects = W.decode_ack(payload)
                if acked >= n:
                    break
            elif kind == W.K_REJECT:
                raise SendError(f"the node refused: {_reject_text(payload)}")
    return {"session": session, "sent": int(len(todo)), "resent_skipped": int(n - len(todo)),
            "acknowledged": int(acked), "rejected": int(sum(rejects)),
            "rejects": {NODE_REASONS.get(k, str(k)): int(v) for k, v in enumerate(rejects)
                        if k and v}}


def send_records(host: str, port: int, recs: np.ndarray, session: int = 1,
                 timeout: float = 60.0, frame: int = 1024, retry_s: float = 0.0,
                 rate: float = 0.0, alternates=(), secret: bytes | None = None,
                 progress=None) -> dict:
    """Send ``recs`` in order as session ``session`` (seq 1..n); return the counts.

    With ``retry_s`` > 0 a lost connection (a node that restarts, or fails over) is not an
    error for that long: the client reconnects, the login answer says what the node holds,
    and it resends the rest, so nothing is lost and nothing counts twice. ``alternates``:
    the other node(s) of a pair, (host, port) each; after a failure the client tries the
    next endpoint in turn (a backup does not listen for sessions, so only the primary
    answers). ``sent`` counts the records sent on the last connection; ``reconnects`` how
    often it reconnected; ``endpoint`` where it finished. ``rate`` > 0 paces the sending
    at that many events per second. ``secret``: the session's secret (None for a node
    without a sessions file). ``progress(text)`` hears every 2 s how far a long send is."""
    recs = recs.copy()
    recs["sseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    endpoints = [(host, port), *[tuple(a) for a in alternates]]
    end = time.monotonic() + retry_s
    reconnects = 0
    k = 0
    while True:
        h, p = endpoints[k % len(endpoints)]
        try:
            res = _session_once(h, p, recs, session, timeout, frame, rate, secret, progress)
            res["reconnects"] = reconnects
            res["endpoint"] = f"{h}:{p}"
            return res
        except (SendError, OSError):
            if time.monotonic() >= end:
                raise
            reconnects += 1
            k += 1
            time.sleep(0.1 if k % len(endpoints) == 0 else 0.02)
