"""The gateway's control socket: a Unix stream socket in its data directory (mode 0600)
that ``exposure fix status`` and ``exposure fix redeliver`` talk to while it runs.

One request per connection: a line (``status`` or ``redeliver``, at most 256 bytes), one
JSON answer. A client that sends nothing within a second, or too much, is dropped; at
most :data:`MAX_CLIENTS` are served at once. While the gateway is down, ``status`` reads
the status file the gateway rewrites every second (:func:`read_status`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

__all__ = ["ControlServer", "ControlError", "request", "read_status", "write_status",
           "MAX_CLIENTS", "render_status", "GatewayCollector"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
_MAX_REQUEST = 256


class ControlError(RuntimeError):
    """The gateway's control socket cannot be reached or answered an error."""


class ControlServer:
    """Serve ``handlers[command]() -> dict`` on ``path`` until :meth:`close`."""

    def __init__(self, path: Path, handlers: dict[str, Callable[[], dict]]):
        self.path = Path(path)
        self.handlers = handlers
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(MAX_CLIENTS)
        self._sock.settimeout(0.2)
        self._busy = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fix-control", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                c, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop:
                    return
                time.sleep(0.05)
                continue
            if not self._busy.acquire(blocking=False):
                c.close()
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            c.settimeout(1.0)
            data = b""
            while b"\n" not in data and len(data) <= _MAX_REQUEST:
                chunk = c.recv(_MAX_REQUEST + 1)
                if not chunk:
                    break
                data += chunk
            cmd = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
            h = self.handlers.get(cmd)
            if len(data) > _MAX_REQUEST or h is None:
                ans = {"error": f"unknown request {cmd[:40]!r} (known: "
                                f"{', '.join(sorted(self.handlers))})"}
            else:
                c.settimeout(None)
                try:
                    ans = h()
                except Exception as e:  # an answer, never the server's end
                    log.exception("control request %s", cmd)
                    ans = {"error": f"{type(e).__name__}: {e}"}
            c.sendall(orjson.dumps(ans, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        except OSError:
            pass
        finally:
            c.close()
            self._busy.release()

    def close(self) -> None:
        self._stop = True
        self._sock.close()
        self._thread.join(2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, command: str, timeout: float = 30.0) -> dict:
    """Ask the gateway listening on ``path``; ControlError if none answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(f"no gateway is running on {path} ({e.strerror or e})") from e
    except OSError as e:
        raise ControlError(f"the gateway on {path} did not answer: {e}") from e
    finally:
        s.close()
    try:
        ans = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ControlError(f"the gateway on {path} answered {data[:80]!r}") from e
    if isinstance(ans, dict) and "error" in ans:
        raise ControlError(ans["error"])
    return ans


def write_status(path: Path, st: dict) -> None:
    """Replace the status file (no sync: it is a view, rewritten every second)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(st, option=orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, path)


def read_status(socket_path: Path, status_path: Path) -> dict:
    """The running gateway's status (``running: true``), else the last one it wrote
    (``running: false``); ControlError when there is neither."""
    try:
        st = request(socket_path, "status", timeout=5)
        st["running"] = True
        return st
    except ControlError as e:
        why = str(e)
    try:
        st = orjson.loads(status_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        raise ControlError(f"{why}; no status file {status_path} either") from None
    st["running"] = False
    return st


def render_status(st: dict) -> str:
    """``exposure fix status`` as text."""
    run = "running" if st.get("running") else "not running (its last status)"
    j = st.get("journal", {})
    lines = [
        f"gateway {st.get('gateway')}: {run}, pid {st.get('pid')}, exposure session "
        f"{st.get('session')}",
        f"  messages {st.get('messages', 0):,}  events {st.get('events', 0):,}  seq "
        f"{st.get('seq', 0):,}  acked {st.get('acked', 0):,}",
        f"  dead letters {st.get('dead_letters', 0):,} (pending {st.get('dead_pending', 0):,}"
        f", redelivered {st.get('redelivered', 0):,})"
        + "".join(f"  {k} {v:,}" for k, v in sorted(st.get("dead_reasons", {}).items())),
        "  not mapped (counted): " + (", ".join(
            f"{k} {v:,}" for k, v in sorted(st.get("not_mapped", {}).items())) or "none"),
        "  node rejects: " + (", ".join(
            f"{k} {v:,}" for k, v in sorted(st.get("node_rejects", {}).items())) or "none"),
        f"  journal: {j.get('records', 0):,} records ({j.get('durable', 0):,} durable), "
        f"{j.get('segments', 0)} segments, {j.get('bytes', 0):,} bytes",
    ]
    fix = st.get("fix") or {}
    sessions = fix.get("sessions") if isinstance(fix, dict) else None
    if isinstance(sessions, dict):
        for name, s in sorted(sessions.items()):
            lines.append(f"  {name}: " + " ".join(
                f"{k}={v}" for k, v in sorted(s.items()) if v not in (0, None, "")))
    for k, v in sorted(fix.items()) if isinstance(fix, dict) else ():
        if k != "sessions" and not isinstance(v, dict) and v:
            lines.append(f"  fix {k}: {v}")
    for name, seq in sorted(st.get("inbound", {}).items()):
        lines.append(f"  inbound {name}: last seq {seq:,}")
    return "\n".join(lines)


_FIX_REJECT_KINDS = ("rejects_sent", "business_rejects_sent", "garbage", "bad_length",
                     "bad_checksum", "too_long", "garbled", "missing_tag", "bad_value",
                     "unknown_msg_type", "unsupported_msg_type", "wrong_comp_id",
                     "wrong_begin_string", "bad_password", "seq_too_low", "not_logon_first")


class GatewayCollector:
    """Prometheus metrics of a gateway (``exposure metrics --fix GATEWAY.toml``), read from
    its control socket at each scrape: ``exposure_fix_up``, ``exposure_fix_messages_total``,
    ``exposure_fix_events_total``, ``exposure_fix_dead_letters_total``,
    ``exposure_fix_dead_letters_pending``, ``exposure_fix_redelivered_total``,
    ``exposure_fix_not_mapped_total{kind}``, ``exposure_fix_node_rejects_total{reason}``,
    ``exposure_fix_rejects_total{kind}`` (the session layer's, all sessions),
    ``exposure_fix_sessions_logged_on``, ``exposure_fix_acked_seq``; label ``gateway``."""

    def __init__(self, cfg):
        self.cfg = cfg

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        name = self.cfg.name
        try:
            st = request(self.cfg.control_socket, "status", timeout=5)
        except ControlError:
            g = GaugeMetricFamily("exposure_fix_up", "1 while the gateway answers",
                                  labels=["gateway"])
            g.add_metric([name], 0)
            yield g
            return
        g = GaugeMetricFamily("exposure_fix_up", "1 while the gateway answers",
                              labels=["gateway"])
        g.add_metric([name], 1)
        yield g
        for key, doc in (("messages", "FIX application messages journaled"),
                         ("events", "SPEC events produced"),
                         ("dead_letters", "messages sent to the dead letters"),
                         ("redelivered", "dead letters passed on by redeliver")):
            c = CounterMetricFamily(f"exposure_fix_{key}", doc, labels=["gateway"])
            c.add_metric([name], int(st.get(key, 0)))
            yield c
        for key, doc in (("dead_pending", "dead letters held for redeliver"),
                         ("acked", "the exposure seq the node acknowledged")):
            metric = "dead_letters_pending" if key == "dead_pending" else "acked_seq"
            g = GaugeMetricFamily(f"exposure_fix_{metric}", doc, labels=["gateway"])
            g.add_metric([name], int(st.get(key, 0)))
            yield g
        for metric, src, label, doc in (
                ("not_mapped", st.get("not_mapped", {}), "kind",
                 "reports that map to nothing on purpose"),
                ("node_rejects", st.get("node_rejects", {}), "reason",
                 "events the node rejected"),
                ("dead_letters_by_kind", st.get("dead_reasons", {}), "kind",
                 "dead letters by kind")):
            c = CounterMetricFamily(f"exposure_fix_{metric}", doc, labels=["gateway", label])
            for k, v in sorted(src.items()):
                c.add_metric([name, k], int(v))
            yield c
        fix = st.get("fix") or {}
        totals = fix.get("totals", {}) if isinstance(fix, dict) else {}
        c = CounterMetricFamily("exposure_fix_rejects", "FIX input refused or answered with "
                                "a reject, by kind", labels=["gateway", "kind"])
        for k in _FIX_REJECT_KINDS:
            c.add_metric([name, k], int(totals.get(k, 0)))
        for k in ("connections_refused", "unknown_comp_id", "address_not_allowed"):
            c.add_metric([name, k], int(fix.get(k, 0)))
        yield c
        sessions = fix.get("sessions", {}) if isinstance(fix, dict) else {}
        g = GaugeMetricFamily("exposure_fix_sessions_logged_on", "FIX sessions logged on",
                              labels=["gateway"])
        g.add_metric([name], sum(1 for s in sessions.values() if s.get("state") == "active"))
        yield g
