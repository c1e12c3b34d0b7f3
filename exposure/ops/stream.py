"""``exposure send -`` and ``exposure send --follow FILE``: JSON lines streamed to a
:class:`~exposure.net.producer.Producer` as they arrive.

Lines are read as they come (standard input: whatever the pipe holds; a followed file:
what was appended since the last look, every 20 ms), the complete ones are parsed as
``exposure send FILE`` parses a file (:func:`exposure.engine.parse.parse_events`: each
non-blank line is one record, a line that does not parse is a record with a reject
reason, counted by the node) and handed to the producer at once.

Following (:class:`Follow`) behaves like ``tail -F``: a file that does not exist yet is
waited for; a file renamed away is read to its end, then the new file at the path from
its beginning; a file truncated (shorter than what was read) is read again from its
beginning. An unterminated last line waits for its newline (a rotated file's last line is
taken as it is; at a stop it is left for the next run).

Where a restarted follower goes on: :class:`Position`, a small JSON file (``--position``)
with the file's identity (device, inode), the offset after the last acknowledged line and
that line's session seq, written at most twice a second and at a stop, only for lines the
node acknowledged. A follower started again reads on from there and skips the records the
node (or the producer's spool) already holds beyond that seq: lines map one to one onto
seqs, so nothing is lost or sent twice. A renamed file is looked for in the same
directory by its identity.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from exposure.engine.parse import parse_events
from exposure.net.client import SendError
from exposure.net.producer import Producer
from exposure.net.sender import Watch, put

__all__ = ["Lines", "Stdin", "Follow", "Position", "stream"]

log = logging.getLogger(__name__)

_READ = 1 << 20           # bytes read at a time
_MAX_LINE = 64 << 20      # a longer line is cut (the piece is one record: rejected)
_IDLE = 0.02              # seconds between looks at a followed file with nothing new
_SAVE_S = 0.5             # the position file: at most this often


def _nonblank(lines: list[bytes]) -> list[bytes]:
    return [ln for ln in lines if ln.strip(b" \t\r")]  # (parse_events' blank lines)


class Lines:
    """Complete lines out of chunks of bytes, with a bound on one line's length."""

    def __init__(self) -> None:
        self.buf = b""
        self._cut = False  # dropping the rest of a line that was too long

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._cut:
            k = data.find(b"\n")
            if k < 0:
                return out
            data, self._cut = data[k + 1:], False
        buf = self.buf + data
        k = buf.rfind(b"\n")
        if k >= 0:
            out = buf[:k].split(b"\n")
            buf = buf[k + 1:]
        if len(buf) > _MAX_LINE:
            out.append(buf[:_MAX_LINE])
            buf, self._cut = b"", True
        self.buf = buf
        return _nonblank(out)

    def rest(self) -> list[bytes]:
        """The unterminated last line (the input ended): a line as a file's last one is."""
        buf, self.buf = self.buf, b""
        return _nonblank([buf]) if not self._cut else []


class Stdin:
    """Standard input (or any descriptor), read as it arrives."""

    def __init__(self, fd: int = 0) -> None:
        self.fd, self.lines, self.eof = fd, Lines(), False

    def read(self, timeout: float) -> list[bytes]:
        if self.eof:
            return []
        try:
            ready = select.select([self.fd], [], [], timeout)[0]
        except InterruptedError:
            return []
        if not ready:
            return []
        data = os.read(self.fd, _READ)
        if not data:
            self.eof = True
            return self.lines.rest()
        return self.lines.feed(data)


class Follow:
    """A file followed as ``tail -F`` does (see the module); ``start``: (dev, ino,
    offset) to go on from."""

    eof = False

    def __init__(self, path: str | Path, start: tuple[int, int, int] | None = None) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.ident: tuple[int, int] = (0, 0)
        self.pos = 0                  # bytes of the current file read (into lines)
        self.lines = Lines()
        self._start = start
        self.rotations = self.truncations = 0

    @property
    def offset(self) -> int:
        """The offset after the last complete line read from the current file."""
        return self.pos - len(self.lines.buf)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _open(self) -> bool:
        start, self._start = self._start, None
        if start is not None:
            dev, ino, off = start
            found = self._find(dev, ino)
            if found is None:
                log.warning("the file the position names (device %s, inode %s) is no "
                            "longer in %s: reading %s from its beginning", dev, ino,
                            self.path.parent, self.path)
            else:
                fd = os.open(found, os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_size < off:
                    log.warning("%s is shorter than the position (%s bytes): reading it "
                                "from its beginning", found, off)
                    off = 0
                self.fd, self.ident, self.pos = fd, (dev, ino), off
                return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        self.fd, self.ident, self.pos = fd, (st.st_dev, st.st_ino), 0
        return True

    def _find(self, dev: int, ino: int) -> Path | None:
        """The file of this identity: at the path, else renamed in its directory."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                return self.path
        except FileNotFoundError:
            pass
        try:
            with os.scandir(self.path.parent) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == (dev, ino):
                        return Path(e.path)
        except OSError:
            pass
        return None

    def _at_path(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def read(self, timeout: float) -> list[bytes]:
        if self.fd is None and not self._open():
            time.sleep(timeout)
            return []
        out = self._drain()
        if out:
            return out
        now = self._at_path()
        if now is not None and now != self.ident:  # renamed away, a new file at the path
            out = self._drain() + self.lines.rest()  # (what was written before the switch)
            self.close()
            self.rotations += 1
            log.info("%s was replaced (rotated): reading the new file", self.path)
            self._open()
            return out + self._drain()
        time.sleep(timeout)
        return []

    def _drain(self) -> list[bytes]:
        """What the current file holds beyond ``pos`` (its complete lines)."""
        assert self.fd is not None
        if os.fstat(self.fd).st_size < self.pos:  # truncated: from its beginning
            self.truncations += 1
            log.info("%s was truncated: reading it from its beginning", self.path)
            self.pos, self.lines = 0, Lines()
        out: list[bytes] = []
        for _ in range(16):  # (at most 16 MiB a look)
            data = os.pread(self.fd, _READ, self.pos)
            if not data:
                break
            self.pos += len(data)
            out += self.lines.feed(data)
        return out


class Position:
    """The follower's position file (see the module)."""

    def __init__(self, path: str | Path, session: int) -> None:
        self.path, self.session = Path(path), session
        self._pend: collections.deque = collections.deque()  # (seq, ident, offset)
        self._best: tuple | None = None
        self._saved: tuple | None = None
        self._at = 0.0

    def load(self) -> tuple[int, int, int, int] | None:
        """(seq, dev, ino, offset) of the last run, or None (no file yet)."""
        try:
            d = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as e:
            raise SendError(f"cannot read the position file {self.path}: {e}") from None
        try:
            if int(d["session"]) != self.session:
                raise SendError(f"the position file {self.path} is session "
                                f"{d['session']}'s, not {self.session}'s")
            return int(d["seq"]), int(d["dev"]), int(d["ino"]), int(d["offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise SendError(f"the position file {self.path} is not one: {e}") from None

    def note(self, seq: int, ident: tuple[int, int], offset: int) -> None:
        """Lines up to ``offset`` of file ``ident`` are seqs up to ``seq``."""
        if self._pend and self._pend[-1][0] == seq:
            self._pend[-1] = (seq, ident, offset)
        else:
            self._pend.append((seq, ident, offset))

    def advance(self, acked: int, force: bool = False) -> None:
        while self._pend and self._pend[0][0] <= acked:
            self._best = self._pend.popleft()
        now = time.monotonic()
        if self._best is not None and self._best != self._saved and (
                force or now - self._at >= _SAVE_S):
            seq, (dev, ino), off = self._best
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(orjson.dumps({"session": self.session, "seq": seq, "dev": dev,
                                          "ino": ino, "offset": off}) + b"\n")
            os.replace(tmp, self.path)
            self._saved, self._at = self._best, now


def stream(p: Producer, source, watch: Watch, stop: list,
           progress: Callable[[str], None] | None = None, position: Position | None = None,
           skip: int = 0) -> int:
    """Send ``source``'s lines as they arrive until it ends (standard input's EOF) or
    ``stop`` is not empty (a signal); skip the first ``skip`` records (held already).
    Returns how many records it handed to the producer (the caller flushes)."""
    sent = last_said = 0
    said = time.monotonic()
    while not stop and not source.eof:
        lines = source.read(_IDLE)
        if skip and lines:
            k = min(skip, len(lines))
            lines, skip = lines[k:], skip - k
        if lines:
            recs = parse_events(b"\n".join(lines))
            put(p, recs, watch)
            sent += len(recs)
        if position is not None and not skip and source.fd is not None:
            position.note(p.sent, source.ident, source.offset)  # (not while skipping:
            # the seqs held beyond the lines read so far are not theirs yet)
        watch.check()
        if position is not None:
            position.advance(p.acked)
        now = time.monotonic()
        if progress is not None and now - said >= 2.0 and sent != last_said:
            progress(f"sent {sent:,} events ({(sent - last_said) / (now - said):,.0f}/s), "
                     f"acknowledged up to seq {p.acked}")
            said, last_said = now, sent
        elif now - said >= 2.0:
            said = now
    if skip:
        log.warning("the node holds %s more events of session %s than the input had to "
                    "skip", skip, p.session)
    return sent
