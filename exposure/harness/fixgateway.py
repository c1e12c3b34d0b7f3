"""A real local FIX gateway (``exposure fix``) on a temporary config with unique ports,
beside a :class:`~exposure.harness.localnode.LocalNode` or a pair member's config, for the
gateway's tests and its benchmark; ``stop()`` always stops it and removes what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from exposure.harness.localnode import free_port, terminate
from exposure.harness.wait import WaitTimeout, wait_for

__all__ = ["LocalGateway", "FixSide", "FixClient"]


class FixSide:
    """One ``[[fix]]`` acceptor table of a :class:`LocalGateway`: the gateway's CompID
    (``sender``), the counterparty's (``target``), the port, the SPEC source."""

    def __init__(self, target: str, source: int, *, sender: str = "EXPOSURE",
                 begin_string: str = "FIX.4.4", port: int | None = None, extra: str = ""):
        self.sender, self.target, self.source = sender, target, source
        self.begin_string = begin_string
        self.port = port or free_port()
        self.extra = extra

    @property
    def key(self) -> str:
        return f"{self.begin_string}:{self.sender}->{self.target}"

    def table(self) -> str:
        return (f'[[fix]]\nrole = "acceptor"\nlisten = "127.0.0.1:{self.port}"\n'
                f'begin_string = "{self.begin_string}"\nsender_comp_id = "{self.sender}"\n'
                f'target_comp_id = "{self.target}"\nsource = {self.source}\n{self.extra}\n')


class LocalGateway:
    """``exposure fix --config`` on ``tmp/<name>.toml``: ``node_config`` the node's (or a
    pair member's) config, ``session`` the exposure session, ``sides`` the FIX sessions
    (default: one acceptor, target BROKER1, source 1), ``instruments`` / ``accounts`` the
    CSV text. ``start()`` waits for the ``ready`` line; ``kill9()``, ``stop()``,
    ``status()``, ``redeliver()``."""

    def __init__(self, tmp: Path, node_config: Path, *, session: int = 5,
                 sides: list[FixSide] | None = None, instruments: str = "symbol,instrument\n",
                 accounts: str = "name,account\n", gateway_extra: str = "",
                 limits: str = "", start: bool = True, order_key: str = "clordid"):
        self.name = f"gw{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.dir = Path(tmp)
        self.sides = sides or [FixSide("BROKER1", 1)]
        self.instruments = self.dir / f"{self.name}.instruments.csv"
        self.accounts = self.dir / f"{self.name}.accounts.csv"
        self.instruments.write_text(instruments)
        self.accounts.write_text(accounts)
        self.data_dir = self.dir / f"{self.name}.data"
        self.config = self.dir / f"{self.name}.toml"
        self.config.write_text(
            f'[gateway]\nnode = "{node_config}"\nsession = {session}\n'
            f'instruments = "{self.instruments.name}"\naccounts = "{self.accounts.name}"\n'
            f'data_dir = "{self.data_dir.name}"\norder_key = "{order_key}"\n'
            f"{gateway_extra}\n"
            + (f"[limits]\n{limits}\n" if limits else "")
            + "".join(s.table() for s in self.sides))
        self.log = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        if start:
            self.start()

    @property
    def port(self) -> int:
        return self.sides[0].port

    def start(self, timeout: float = 120) -> None:
        """Start ``exposure fix`` (again, after a kill: as systemd would) and wait for its
        ``ready`` line; RuntimeError with its log if it exits first."""
        self.starts += 1
        with open(self.log, "a") as log:
            log.write(f"--- start {self.starts}\n")
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "exposure", "fix", "--config", str(self.config)],
                stdout=log, stderr=log, text=True)
        mark = f"--- start {self.starts}\n"

        def ready() -> bool:
            text = self.log.read_text(errors="replace")
            mine = text[text.rfind(mark):]
            if "exposure fix: ready" in mine:
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}): {mine[-3000:]}")
            return False

        try:
            wait_for(ready, timeout, f"gateway {self.name} to say ready", step=0.01)
        except WaitTimeout:
            self.stop()
            raise

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exposure", "fix", *args, "--config",
                               str(self.config)], capture_output=True, timeout=timeout)

    def status(self) -> dict:
        """``exposure fix status --json``'s answer."""
        import orjson

        p = self.cli("status", "--json")
        if p.returncode != 0:
            raise RuntimeError(f"exposure fix status failed: {p.stderr.decode()[-2000:]}")
        return orjson.loads(p.stdout)

    def redeliver(self) -> dict:
        import orjson

        p = self.cli("redeliver")
        if p.returncode != 0:
            raise RuntimeError(f"exposure fix redeliver failed: {p.stderr.decode()[-2000:]}")
        return orjson.loads(p.stdout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        terminate(self.proc)


class FixClient:
    """A small, fast FIX counterparty in Python (an initiator): connects to a gateway's
    acceptor, logs on, sends pre-encoded application messages as fast as the socket takes
    them, answers the gateway's ResendRequests (PossDupFlag=Y copies of what it sent) and
    TestRequests, and logs out. For the benchmark (where QuickFIX cannot keep up) and for
    tests that need exact control of seqs. ``sender``: its CompID (the gateway's
    ``target_comp_id``)."""

    def __init__(self, port: int, sender: str = "BROKER1", target: str = "EXPOSURE",
                 begin_string: str = "FIX.4.4", host: str = "127.0.0.1",
                 first_seq: int = 1, reset: bool = False, heartbeat_s: int = 30):
        import socket
        import threading

        from exposure.fix.codec import FixReader

        self.sender, self.target, self.bs = sender, target, begin_string
        self.seq = first_seq              # the next outbound seq
        self.sent: dict[int, list] = {}   # seq -> fields (for resends)
        self.received: list = []
        self.resend_requests: list[tuple[int, int]] = []
        self.logged_on = threading.Event()
        self.logged_out = threading.Event()
        self._lock = threading.Lock()
        self._reader = FixReader(1 << 20)
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True, name="fix-client")
        self._thread.start()
        self._admin("A", [(98, 0), (108, heartbeat_s)] + ([(141, "Y")] if reset else []))
        if not self.logged_on.wait(30):
            raise RuntimeError(f"no Logon answer from the gateway on port {port}: "
                               f"{self.received[-3:]}")

    def encode(self, fields: list, seq: int, poss_dup: bool = False) -> bytes:
        from exposure.fix.codec import encode

        return encode(self.bs, "8", fields, sender=self.sender, target=self.target, seq=seq,
                      poss_dup=poss_dup)

    def _admin(self, mt: str, fields: list) -> None:
        from exposure.fix.codec import encode

        with self._lock:
            seq = self.seq
            self.seq += 1
            self.sent[seq] = [("admin", mt, fields)]
            self.sock.sendall(encode(self.bs, mt, fields, sender=self.sender,
                                     target=self.target, seq=seq))

    def prepare(self, reports: list[list]) -> list[bytes]:
        """Pre-encode ExecutionReports (field lists) with the next seqs; :meth:`send_raw`
        sends them (they are remembered for resends)."""
        with self._lock:
            out = []
            for fields in reports:
                self.sent[self.seq] = fields
                out.append(self.encode(fields, self.seq))
                self.seq += 1
            return out

    def send_raw(self, msgs: list[bytes], chunk: int = 256) -> None:
        for i in range(0, len(msgs), chunk):
            data = b"".join(msgs[i:i + chunk])
            with self._lock:
                self.sock.sendall(data)

    def send(self, reports: list[list]) -> None:
        self.send_raw(self.prepare(reports))

    def skip(self, n: int) -> None:
        """Leave a gap of ``n`` seqs (those messages are sent only on a ResendRequest)."""
        with self._lock:
            self.seq += n

    def _read(self) -> None:
        from exposure.fix.codec import FixMessage

        while not self._stop:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            for m in self._reader.feed(data):
                if not isinstance(m, FixMessage):
                    continue
                self.received.append(m)
                mt = m.msg_type
                if mt == "A":
                    self.logged_on.set()
                elif mt == "5":
                    self.logged_out.set()
                elif mt == "1":
                    self._admin("0", [(112, m.get(112) or "")])
                elif mt == "2":
                    self._resend(int(m.get(7) or 1), int(m.get(16) or 0))
        self.logged_out.set()

    def _resend(self, lo: int, hi: int) -> None:
        from exposure.fix.codec import encode

        self.resend_requests.append((lo, hi))
        with self._lock:
            hi = self.seq - 1 if hi == 0 else min(hi, self.seq - 1)
            out = []
            gap = None
            for s in range(lo, hi + 1):
                f = self.sent.get(s)
                if f is None or (f and f[0][0] == "admin"):
                    gap = s if gap is None else gap
                    continue
                if gap is not None:
                    out.append(encode(self.bs, "4", [(123, "Y"), (36, s)], sender=self.sender,
                                      target=self.target, seq=gap, poss_dup=True))
                    gap = None
                out.append(self.encode(f, s, poss_dup=True))
            if gap is not None:
                out.append(encode(self.bs, "4", [(123, "Y"), (36, hi + 1)],
                                  sender=self.sender, target=self.target, seq=gap,
                                  poss_dup=True))
            try:
                self.sock.sendall(b"".join(out))
            except OSError:
                pass

    def logout(self, timeout: float = 5) -> None:
        try:
            self._admin("5", [])
        except OSError:
            return
        self.logged_out.wait(timeout)

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        self._thread.join(2)
