"""Mirror stage: the primary's records to the backup, over the replication link.

The journal stage hands every block it has written to the mirror ring (after ``write``,
so the backup never holds a record the primary's own journal lacks after a process crash).
The mirror connects to the backup's ``[replication] listen`` address, authenticates both
ways (:mod:`exposure.net.repl`), and compares what the backup holds with its own journal:

* the backup's last record equals the primary's record at that gseq: stream from the next
  gseq;
* it differs, or the primary's journal no longer holds it, or the backup is ahead: RESET
  (the backup moves its state aside and reconnects empty);
* the backup needs a gseq older than the journal's first (segments removed after a
  snapshot): the newest snapshot is sent first, and the backup reloads from it.

Then the mirror always sends gseq ``next``: from the ring when the ring's next record is
it, otherwise from the journal files (:class:`exposure.store.journal.JournalCursor`). The journal
stage never waits for the mirror: when the mirror ring is full (a slow or absent backup) the
journal drops those hand-offs, and the mirror later reads the gap from disk. Catch-up thus
never stalls the hot path; it costs this process's reads of its own journal.

The backup's ACKs (highest gseq received, highest durable) go to the control block
(``CTL_REPL_RECV`` / ``CTL_REPL_DUR``), where ingest's release policy reads them. A
HEARTBEAT with this node's clock goes out every ``heartbeat_ms``; the backup's echo of it
renews the fence (``CTL_VALID_NS``, :mod:`exposure.net.repl`).

Liveness (:mod:`exposure.net.liveness`): a backup that has sent nothing (no ACK, no
HEARTBEAT: it sends one every ``heartbeat_ms``) for ``failover_ms`` is taken for dead, as
a hung or SIGSTOPped one is (the kernel keeps accepting its bytes), and the link is
closed and re-established every ``_RETRY_NS``; so is a connect or a handshake that takes
longer than ``failover_ms`` (the handshake: at least ``_HANDSHAKE_NS``). Every call on the
link is non-blocking; the checks run on every poll (at least every 50 ms when idle). What
the pair does meanwhile (the primary runs alone, or stays fenced) is the supervisor's
(:mod:`exposure.pair.election`); after SIGCONT the backup answers the pending connection
and catches up.

The fault hook for tests and drills: while ``<data dir>/fault-cut-link`` exists, the mirror
closes the link and does not reconnect (a cut replication link, seen from both sides).
"""

from __future__ import annotations

import collections
import errno
import hmac
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import EVENT_WORDS, W_GSEQ, W_RECV_NS
from exposure.net import repl as R
from exposure.net.liveness import Liveness, silent
from exposure.net.sock import flush, send_or_queue
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.control import (
    CTL_EPOCH,
    CTL_HEARD_NS,
    CTL_LINK,
    CTL_PEER_EPOCH,
    CTL_REPL_DUR,
    CTL_REPL_RECV,
    CTL_ROLE,
    CTL_SEQUENCED,
    CTL_VALID_NS,
    ROLE_PRIMARY,
)
from exposure.shm.handle import Handle, bind, members
from exposure.shm.ring import ring_pop
from exposure.shm.session_layout import S_DURABLE
from exposure.store.journal import JournalCursor, JournalError, first_gseq, read_record

__all__ = ["MirrorStage", "FAULT_CUT_LINK"]

FAULT_CUT_LINK = "fault-cut-link"
_MAX_OUT = 4 << 20     # bytes queued on the socket before the mirror stops reading more
_MAX_QUEUE = 4 * _MAX_OUT  # ... and before it takes the backup for one that does not read
_HANDSHAKE_NS = 2_000_000_000  # (at least failover_ms) for the CHALLENGE, then the WELCOME
_RETRY_NS = 100_000_000
_MARKS = 4096          # frames whose (last gseq, receive time) wait for the backup's ACK
_SENT = CN.INDEX["mirror_records_total"]
_FROM_JOURNAL = CN.INDEX["mirror_journal_records_total"]
_REPL_RECV_NS = CN.INDEX["mirror_replicated_recv_ns"]


log = logging.getLogger(__name__)



@njit(cache=True, _nrt=False)
def _pop(h):
    """Pop up to a buffer of records from the mirror ring (the handle's ring and buffer)."""
    ctrl, slots, buf = members(h)
    return ring_pop(ctrl, slots, buf, buf.shape[0])

class MirrorStage(Stage):
    name = "mirror"
    fed_by = "journal"

    def __init__(self, ring, ctl: np.ndarray, sessions: np.ndarray, peer: tuple[str, int],
                 secret: bytes, data_dir: Path, heartbeat_ms: int, failover_ms: int,
                 batch: int = 4096, counters: np.ndarray | None = None):
        self.ring = ring
        self.wake_source = ring
        self.cnt = CN.or_private(counters)
        # (last gseq, its receive time) of each frame sent, oldest first, until the
        # backup's durable ACK covers it: the replication lag in time (bounded: when
        # full, the oldest marks go and the lag reads high, never low)
        self.marks: collections.deque[tuple[int, int]] = collections.deque(maxlen=_MARKS)
        self.ctl = ctl
        self.sessions = sessions
        self.peer = peer
        self.secret = secret
        self.data_dir = Path(data_dir)
        self.heartbeat_ns = heartbeat_ms * 1_000_000
        self.failover_ns = failover_ms * 1_000_000
        self.buf = np.zeros((batch, EVENT_WORDS), np.uint64)
        self.hold = self.buf[:0]      # popped records not sent yet (after a gap)
        self.sock: socket.socket | None = None
        self.state = "down"  # down, connecting, hello, welcome, stream, snapshot, closing
        self.linger_until = 0
        self.next_try = 0
        self.reader = R.ReplReader()
        self.out = bytearray()
        self.nonce = b""
        self.next = 0                 # the gseq to send next
        self.cursor: JournalCursor | None = None
        self.snap_file = None
        self.last_sent = 0
        # heard: the backup's last frame (or the connect); sent: the last HEARTBEAT
        self.live = Liveness(self.failover_ns, self.heartbeat_ns)
        # the fence ends this much before the backup may promote: room for the clocks'
        # rates, a check made just before a pause, and the send it guarded
        self.margin_ns = self.failover_ns // 4
        self.fault_check = 0
        self.cut = False
        self.logged = ""
        self._tail, self._head = ring.ctrl[RL.W_TAIL:], ring.ctrl[RL.W_HEAD:]
        # Bound once (exposure.shm.handle): a pop passes this handle only.
        self.handle = Handle(ring.ctrl, ring.slots, self.buf)
        self._pop = bind(_pop, self.handle)  # compiled (or loaded) now

    # ------------------------------------------------------------------ loop
    def poll(self) -> int:
        now = time.monotonic_ns()
        if now >= self.fault_check:
            self.fault_check = now + 20_000_000
            cut = (self.data_dir / FAULT_CUT_LINK).exists()
            if cut != self.cut:
                log.warning("fault hook: cutting the replication link" if cut else
                            "fault hook: link restored")
                self.cut = cut
                if cut:
                    self._down("")
        if self.ctl[CTL_ROLE] != ROLE_PRIMARY or self.cut:
            self._discard_ring()
            return 0
        if self.sock is None:  # (a send that failed inside a handshake step went down)
            self.state = "down"
        if self.state == "down":
            if now >= self.next_try:
                self._connect(now)
            self._discard_ring()
            return 0
        if self.state == "connecting":
            self._check_connected(now)
            self._discard_ring()
            return 0
        if self.state == "closing":
            self._discard_ring()
            if self.out:
                self._flush()
            if self.sock is not None and (not self.out or now > self.linger_until):
                self._down("")
            return 0
        work = self._receive(now)
        if self.sock is None:
            return work
        if self.state == "stream":
            work += self._stream()
        elif self.state == "snapshot":
            work += self._send_snapshot()
        else:
            self._discard_ring()
        if self.out and self.sock is not None:
            self._flush()
        if self.sock is not None and self.state in ("stream", "snapshot"):
            if self.live.beat_due(now):
                self._beat(now)
            if self.live.silent(now):
                self._down(f"the backup has been silent for "
                           f"{self.live.silent_for(now) / 1e6:.0f} ms")
        elif self.sock is not None and self.state in ("hello", "welcome"):
            # (a peer that accepts but never answers, or a host gone mid-handshake)
            if silent(now, self.live.heard, max(self.failover_ns, _HANDSHAKE_NS)):
                self._down(f"the backup at {self.peer[0]}:{self.peer[1]} did not complete "
                           "the handshake in time", quiet=True)
        return work

    def _beat(self, now: int) -> None:
        """A HEARTBEAT with this node's clock: its echo renews the fence (CTL_VALID_NS).
        Sent every heartbeat_ms while linked, whatever else is sent."""
        self.live.sent = now
        tail = int(self.sessions[0, S_DURABLE])
        self._send(R.frame(R.K_HEARTBEAT, R.BEAT.pack(tail, int(self.ctl[CTL_EPOCH]), now)))

    def _echo(self, echo: int, now: int) -> None:
        """The backup heard our HEARTBEAT of time ``echo``: it cannot promote itself before
        echo + failover_ms (it waits that long after the last thing it heard)."""
        if 0 < echo <= now:
            valid = echo + self.failover_ns - self.margin_ns
            if valid > self.ctl[CTL_VALID_NS]:
                self.ctl[CTL_VALID_NS] = valid

    def _discard_ring(self) -> None:
        """Not streaming: the ring's records will be read from the journal when needed."""
        if self._tail[0] != self._head[0]:
            self._pop(self.handle)
        self.hold = self.buf[:0]

    # ------------------------------------------------------------------ connection
    def _connect(self, now: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(self.peer)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._note(f"cannot reach the backup at {self.peer[0]}:{self.peer[1]}: "
                       f"{os.strerror(err)}")
            self.next_try = now + _RETRY_NS
            return
        self.sock = s
        self.state = "connecting"
        self.live.hear(now)
        self.reader = R.ReplReader()
        self.out = bytearray()

    def _check_connected(self, now: int) -> None:
        import select

        _, w, _ = select.select([], [self.sock], [], 0)
        if not w:
            if self.live.silent(now):
                self._down(f"connecting to the backup at {self.peer[0]}:{self.peer[1]} "
                           "timed out", quiet=True)
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._down(f"cannot reach the backup at {self.peer[0]}:{self.peer[1]}: "
                       f"{os.strerror(err)}", quiet=True)
            return
        self.state = "hello"

    def _note(self, msg: str) -> None:
        """Log a connection problem once (not every retry)."""
        if msg != self.logged:
            log.warning(msg)
            self.logged = msg

    def _down(self, why: str, quiet: bool = False) -> None:
        if why:
            (self._note if quiet else log.warning)(f"{why}; reconnecting")
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None
        if self.snap_file is not None:
            self.snap_file.close()
            self.snap_file = None
        self.state = "down"
        self.out = bytearray()
        self.ctl[CTL_LINK] = 0
        self.next_try = time.monotonic_ns() + _RETRY_NS
        self.hold = self.buf[:0]

    def _send(self, data: bytes) -> None:
        if self.sock is None:  # the link went down earlier in this poll
            return
        self.last_sent = time.monotonic_ns()
        if not send_or_queue(self.sock, self.out, data):
            self._down("the link to the backup failed")
        elif len(self.out) > _MAX_QUEUE:
            self._down(f"the backup does not read ({len(self.out) >> 20} MiB queued)")

    def _flush(self) -> None:
        if not flush(self.sock, self.out):
            self._down("the link to the backup failed")

    def _receive(self, now: int) -> int:
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            self._down("the backup closed the link", quiet=self.state == "hello")
            return 0
        self.live.hear(now)
        self.ctl[CTL_HEARD_NS] = now
        try:
            frames = self.reader.feed(data)
        except R.ReplError as e:
            self._down(f"the backup sent a malformed frame: {e}")
            return 0
        for kind, payload in frames:
            if self.sock is None:
                break
            self._frame(kind, payload)
        return 1

    def _frame(self, kind: int, payload) -> None:
        if kind == R.K_REFUSE:  # (a newer epoch comes in an authenticated WELCOME)
            self._down(f"the backup refused the link: {payload[2:].decode(errors='replace')}")
        elif self.state == "hello" and kind == R.K_CHALLENGE:
            self.nonce = os.urandom(R.NONCE)
            self._send(R.frame(R.K_AUTH, R.AUTH.pack(
                R.mac(self.secret, "primary", payload), self.nonce,
                int(self.ctl[CTL_EPOCH]), self._tail_gseq())))
            self.state = "welcome"
        elif self.state == "welcome" and kind == R.K_WELCOME:
            self._welcome(payload)
        elif self.state in ("stream", "snapshot") and kind == R.K_ACK:
            recv, dur, echo = R.ACK.unpack(payload)
            self._echo(echo, time.monotonic_ns())
            if recv > self.ctl[CTL_REPL_RECV]:
                self.ctl[CTL_REPL_RECV] = recv
            if dur > self.ctl[CTL_REPL_DUR]:
                self.ctl[CTL_REPL_DUR] = dur
            marks = self.marks
            if marks and marks[0][0] <= dur:
                while marks and marks[0][0] <= dur:
                    recv_ns = marks.popleft()[1]
                self.cnt[_REPL_RECV_NS] = recv_ns
        elif self.state in ("stream", "snapshot") and kind == R.K_HEARTBEAT:
            self._echo(R.BEAT.unpack(payload)[2], time.monotonic_ns())
        else:
            self._down(f"unexpected frame kind {kind} from the backup in state {self.state}")

    def _tail_gseq(self) -> int:
        """What a backup must hold to be in sync: everything this node sequenced (what
        it may have acknowledged is a part of it), at least its journal's durable tail."""
        return max(int(self.sessions[0, S_DURABLE]), int(self.ctl[CTL_SEQUENCED]))

    def _welcome(self, payload: bytes) -> None:
        proof, last, known, rec = R.WELCOME.unpack(payload)
        if not hmac.compare_digest(proof, R.mac(self.secret, "backup", self.nonce)):
            self._down("the backup's WELCOME does not verify (a wrong secret?)")
            self.next_try = time.monotonic_ns() + 10 * _RETRY_NS
            return
        epoch = int(self.ctl[CTL_EPOCH])
        if known > epoch:
            self.ctl[CTL_PEER_EPOCH] = max(int(self.ctl[CTL_PEER_EPOCH]), known)
            self._down(f"the backup knows epoch {known}, this node is at {epoch}")
            return
        from exposure.store.snapshot import snapshots

        first = first_gseq(self.data_dir) or 1
        mine = read_record(self.data_dir, last) if last else None
        # A backup rebuilt from one of this node's snapshots holds no record of its own
        # at that gseq (its journal starts after it): it sends zeros.
        from_snapshot = last and rec == bytes(len(rec)) and last in {
            g for g, _ in snapshots(self.data_dir)}
        why = ""
        if last and not from_snapshot:
            if mine is not None and mine.tobytes() != rec:
                why = "its last record differs from this journal's"
            elif mine is None and last + 1 >= first:
                why = "this journal does not hold its last record (the backup is ahead)"
            elif mine is None:
                self._start_snapshot(0)  # older than this journal: replaced by a snapshot
                return
        if why:
            log.warning(f"the backup holds gseq {last} but {why}: RESET")
            self._send(R.frame(R.K_RESET, f"gseq {last}: {why}".encode()))
            self._linger()
            return
        self.logged = ""
        self.ctl[CTL_LINK] = 1
        if last + 1 < first:
            self._start_snapshot(last)
            return
        # What this backup holds now (lower than an earlier link's if it was RESET): the
        # release and the supervisor's "synchronous again" wait for what it really holds.
        self.ctl[CTL_REPL_RECV] = last
        self.ctl[CTL_REPL_DUR] = min(int(self.ctl[CTL_REPL_DUR]), last)
        self.next = last + 1
        self.marks.clear()
        self.cursor = JournalCursor(self.data_dir, self.next)
        self.state = "stream"
        self._beat(time.monotonic_ns())
        log.info(f"streaming to the backup at {self.peer[0]}:{self.peer[1]} from gseq "
                 f"{self.next}")

    def _linger(self) -> None:
        """Close once the queued frames have reached the backup (or after a second): the
        poll loop flushes them, so the journal beside the mirror never waits for it."""
        self.state = "closing"
        self.linger_until = time.monotonic_ns() + 1_000_000_000

    # ------------------------------------------------------------------ streaming
    def _stream(self) -> int:
        if len(self.out) > _MAX_OUT:
            return 0
        if len(self.hold) and int(self.hold[0, W_GSEQ]) < self.next:
            self.hold = self.hold[self.hold[:, W_GSEQ] >= self.next]
        if not len(self.hold) and self._tail[0] != self._head[0]:
            n = self._pop(self.handle)
            self.hold = self.buf[:n]
            self.hold = self.hold[self.hold[:, W_GSEQ] >= self.next]
        if len(self.hold) and int(self.hold[0, W_GSEQ]) == self.next:
            g = self.hold[:, W_GSEQ]
            breaks = np.flatnonzero(np.diff(g) != 1)
            k = int(breaks[0]) + 1 if len(breaks) else len(self.hold)
            self._send_records(self.hold[:k])
            self.hold = self.hold[k:]
            return k
        # A gap before what the ring has (or the ring is empty and the journal is ahead):
        # from the journal files, up to what is durable there.
        upto = int(self.sessions[0, S_DURABLE])
        if len(self.hold):
            upto = min(upto, int(self.hold[0, W_GSEQ]) - 1)
        if self.next > upto:
            return 0
        try:
            words = self.cursor.read(upto)
        except JournalError as e:
            self._down(f"catch-up from the journal failed: {e}")
            return 0
        if words is None:
            return 0
        self._send_records(words)
        self.cnt[_FROM_JOURNAL] += len(words)
        return len(words)

    def _send_records(self, words: np.ndarray) -> None:
        for lo in range(0, len(words), R.MAX_RECORDS):
            part = words[lo:lo + R.MAX_RECORDS]
            self._send(R.frame(R.K_RECORDS, part.tobytes()))
            self.marks.append((int(part[-1, W_GSEQ]), int(part[-1, W_RECV_NS])))
        self.cnt[_SENT] += len(words)
        self.next = int(words[-1, W_GSEQ]) + 1
        if self.cursor is not None and self.cursor.next < self.next:
            self.cursor.next = self.next  # it skips forward from where it is

    # ------------------------------------------------------------------ snapshot
    def _start_snapshot(self, last: int) -> None:
        from exposure.store.snapshot import snapshots

        snaps = [(g, p) for g, p in snapshots(self.data_dir) if g >= last]
        if not snaps:
            self._down(f"the backup needs gseq {last + 1}, which neither this journal nor "
                       "a snapshot holds")
            return
        gseq, path = snaps[-1]
        self.snap_file = open(path, "rb")  # noqa: SIM115  (closed by _down / at the end)
        size = os.fstat(self.snap_file.fileno()).st_size
        log.info(f"the backup needs gseq {last + 1}, before this journal's start: sending "
                 f"snapshot {path.name} ({size / 2**20:.1f} MiB)")
        self._send(R.frame(R.K_SNAP_BEGIN, R.SNAP_BEGIN.pack(gseq, size)))
        self.state = "snapshot"

    def _send_snapshot(self) -> int:
        self._discard_ring()
        if len(self.out) > _MAX_OUT or self.snap_file is None:
            return 0
        chunk = self.snap_file.read(R.SNAP_CHUNK)
        if chunk:
            self._send(R.frame(R.K_SNAP_DATA, chunk))
            return 1
        self.snap_file.close()
        self.snap_file = None
        self._send(R.frame(R.K_SNAP_END))
        self._linger()  # the backup reloads from it and reconnects
        return 1

    def close(self) -> None:
        self._down("")

