"""The FIX tests' counterparties: QuickFIX (C++, Debian's libquickfix-dev) built from
tests/fix/counterparty.cpp, scripted one line at a time (see its header), and a raw peer
that writes whatever bytes a test wants and reads what our session answers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from exposure.fix.codec import FixMessage, FixReader, encode
from exposure.harness.wait import wait_for

__all__ = ["QuickFix", "RawPeer", "build_counterparty", "free_port"]

SOURCE = Path(__file__).resolve().parent / "fix" / "counterparty.cpp"
HEADER = Path("/usr/include/quickfix/Application.h")


def build_counterparty(out_dir: Path) -> Path:
    """Compile the QuickFIX counterparty into ``out_dir`` (about 2 s); skip the test where
    QuickFIX or g++ is missing (tools/install-quickfix)."""
    if shutil.which("g++") is None or not HEADER.exists():
        pytest.skip("QuickFIX is not installed (tools/install-quickfix)")
    exe = out_dir / "counterparty"
    r = subprocess.run(["g++", "-O1", "-std=c++14", "-w", str(SOURCE), "-o", str(exe),
                        "-lquickfix", "-lpthread"], capture_output=True, text=True,
                       timeout=120)
    if r.returncode:
        raise AssertionError(f"g++ failed on {SOURCE}:\n{r.stderr[-4000:]}")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuickFix:
    """One QuickFIX counterparty process: ``role`` "initiator" (it connects to our
    acceptor at ``port``) or "acceptor" (it listens on ``port`` for our initiator). Its
    FileStore lives in ``workdir``, so a second process on the same workdir is the same
    counterparty restarted (with ``reset_on_logon`` or without)."""

    def __init__(self, exe: Path, workdir: Path, *, role: str, port: int,
                 begin_string: str = "FIX.4.4", sender: str = "BROKER1",
                 target: str = "EXPOSURE", script: list[str] = (),
                 reset_on_logon: bool = False, heartbeat_s: int = 30,
                 name: str = "qf") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        settings = workdir / f"{name}.cfg"
        lines = [
            "[DEFAULT]",
            f"ConnectionType={role}",
            "ReconnectInterval=1",
            f"FileStorePath={workdir / 'store'}",
            f"FileLogPath={workdir / 'log'}",
            "StartTime=00:00:00",
            "EndTime=00:00:00",
            "UseDataDictionary=N",
            "ValidateUserDefinedFields=N",
            f"HeartBtInt={heartbeat_s}",
            f"ResetOnLogon={'Y' if reset_on_logon else 'N'}",
            "LogonTimeout=5",
            "[SESSION]",
            f"BeginString={begin_string}",
            f"SenderCompID={sender}",
            f"TargetCompID={target}",
        ]
        if begin_string == "FIXT.1.1":
            lines.append("DefaultApplVerID=FIX.5.0SP2")
        if role == "initiator":
            lines += ["SocketConnectHost=127.0.0.1", f"SocketConnectPort={port}"]
        else:
            lines += [f"SocketAcceptPort={port}", "SocketReuseAddress=Y"]
        settings.write_text("\n".join(lines) + "\n")
        self.script = workdir / f"{name}.script"
        self.script.write_text("\n".join(script) + "\n")
        self.out = workdir / f"{name}.{time.monotonic_ns()}.out"
        self._f = open(self.out, "w")
        self.proc = subprocess.Popen([str(exe), str(settings), str(self.script)],
                                     stdin=subprocess.PIPE, stdout=self._f,
                                     stderr=subprocess.STDOUT)

    def lines(self) -> list[str]:
        return self.out.read_text(errors="replace").splitlines()

    def received(self, msg_type: str) -> list[str]:
        """The messages of ``msg_type`` it received (as | separated text)."""
        return [ln[3:] for ln in self.lines() if ln.startswith("IN ")
                and f"|35={msg_type}|" in ln]

    def sent(self, msg_type: str) -> list[str]:
        return [ln[4:] for ln in self.lines() if ln.startswith("OUT ")
                and f"|35={msg_type}|" in ln]

    def wait(self, what: str, pred, timeout: float = 10.0):
        return wait_for(pred, timeout, what, show=lambda: self.lines()[-12:])

    def wait_line(self, line: str, timeout: float = 10.0, count: int = 1) -> None:
        self.wait(f"{count} x {line!r} from QuickFIX",
                  lambda: sum(1 for ln in self.lines() if ln == line) >= count, timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """Close its standard input (it logs out and exits); kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._f.close()


class RawPeer:
    """A FIX counterparty in the test itself: ``send`` any bytes, ``msg`` encodes one
    message with the next seq, ``read`` collects what our side answered."""

    def __init__(self, port: int, *, begin_string: str = "FIX.4.4", sender: str = "BROKER1",
                 target: str = "EXPOSURE") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(0.05)
        self.bs, self.sender, self.target = begin_string, sender, target
        self.seq = 1
        self.reader = FixReader(1 << 20)
        self.got: list[FixMessage] = []
        self.closed = False

    def msg(self, msg_type: str, fields=(), *, seq: int | None = None, **kw) -> bytes:
        if seq is None:
            seq = self.seq
            self.seq += 1
        return encode(self.bs, msg_type, list(fields), sender=self.sender, target=self.target,
                      seq=seq, **kw)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def logon(self, heartbeat_s: int = 30, extra=()) -> FixMessage:
        self.send(self.msg("A", [(98, 0), (108, heartbeat_s), *extra]))
        return self.expect("A")

    def poll(self) -> list[FixMessage]:
        try:
            data = self.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            return self.got
        except OSError:
            self.closed = True
            return self.got
        if not data:
            self.closed = True
        for m in self.reader.feed(data):
            if isinstance(m, FixMessage):
                self.got.append(m)
        return self.got

    def of(self, msg_type: str) -> list[FixMessage]:
        return [m for m in self.got if m.msg_type == msg_type]

    def expect(self, msg_type: str, count: int = 1, timeout: float = 5.0) -> FixMessage:
        wait_for(lambda: len(self.of(msg_type)) >= count or (self.poll() and False),
                 timeout, f"{count} x 35={msg_type} from our session",
                 show=lambda: self.got[-6:])
        return self.of(msg_type)[count - 1]

    def wait_closed(self, timeout: float = 5.0) -> None:
        wait_for(lambda: self.poll() is not None and self.closed, timeout,
                 "our side to close the connection", show=lambda: self.got[-6:])

    def close(self) -> None:
        self.sock.close()
