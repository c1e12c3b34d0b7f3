"""The perf client's receiver side: reduce each datagram, as it arrives, to what the
figures need, in memory sized by the run and touched before it starts.

A datagram is received into one reused buffer and one compiled call folds it in:

* **seen**: per event of the run, the receipt time of the first update that covers it.
  Updates are conflated (a row carries the state after the last event that moved it, which
  includes every earlier event of the session), so a row of session seq *s* covers every
  event up to *s*: a row that raises the highest seq seen so far stamps the events between
  with its datagram's receipt time.
* **legs**: for the rows of measured events, histograms of the four legs of the path
  (client to ingest, ingest to compute, compute to the fan-out's send, the fan-out to the
  client), for the stage breakdown.
* **seqs**: the stream seq of every incremental datagram, for gaps.

Nothing is allocated per datagram and nothing grows with the rows, so a run of 16 M events
at 2 M events/s (230 MB/s of rows on multicast) costs the client one ``recv_into`` and one
compiled call a datagram, and 8 bytes an event. (Keeping the rows instead cost it more than
the rest of its loop: on this VM, zeroing fresh pages for them was 70% of its samples.)

Which datagrams count is :func:`exposure.feed.wire.parse_datagram`'s rule: one that does not
parse is skipped; heartbeats and refreshes carry no event.

Datagram words read here (little-endian u8 words of the feed's datagram, feed/wire.py)::

    word 0  magic | epoch << 32        word 2  count | type << 16 | version << 24
    word 1  seq                                | row_size << 32
    word 3  sent_ns                    word 4 + 20 r   row r (types.UPDATE_DTYPE head:
                                                       kind in byte 0, session in the high
                                                       half of word 1, sseq, send_ns,
                                                       recv_ns, compute_ns in words 3-6)

Leg histograms: log-linear buckets (HdrHistogram's layout) of 2**10 sub-buckets per power of
two, so a reported value is within 0.1% of the true one; values from 0 to 2**41 ns (36
minutes), a negative leg (clocks of two processes) counts as 0 and a longer one as the top.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit
from exposure.core.types import MAX_DATAGRAM, ROW_ACCOUNT, ROW_LIMITS, ROW_SIZE, UPDATE_DTYPE
from exposure.feed.wire import DG_INCREMENTAL, DGRAM_HEADER, DGRAM_MAGIC, FEED_VERSION

__all__ = ["ArrivalRecorder", "LEGS"]

# The stage breakdown's legs, in the order of the recorder's histograms.
LEGS = ("client_to_ingest", "ingest_to_compute", "compute_to_fanout", "fanout_to_client")

_HEAD_BYTES = DGRAM_HEADER.size
_HEAD_WORDS = _HEAD_BYTES // 8
_ROW_WORDS = ROW_SIZE // 8
_W_SESSION, _W_SSEQ, _W_SEND, _W_RECV, _W_COMP = 1, 3, 4, 5, 6  # words of a row

# The row words above are the types module's fields: a change there must show here.
assert _HEAD_BYTES % 8 == 0 and ROW_SIZE % 8 == 0
for _name, _word, _shift in (("session", _W_SESSION, 4), ("sseq", _W_SSEQ, 0),
                             ("send_ns", _W_SEND, 0), ("recv_ns", _W_RECV, 0),
                             ("compute_ns", _W_COMP, 0)):
    assert UPDATE_DTYPE.fields[_name][1] == 8 * _word + _shift, (_name, UPDATE_DTYPE.fields)

# The receive buffer holds any UDP payload (65,507 bytes): a longer datagram than the feed
# sends (MAX_DATAGRAM) arrives whole, and is then skipped as not a datagram.
_RECV_BYTES = 65536
assert MAX_DATAGRAM <= _RECV_BYTES

_SUB_BITS = 10                       # sub-buckets per power of two: 2**10
_SUB = 1 << _SUB_BITS
_TOP_BIT = 40                        # the highest bit of a value: up to 2**41 - 1 ns
_BUCKETS = (_TOP_BIT - _SUB_BITS + 2) * _SUB

# state words
_S_TOP, _S_SEQS, _S_DGRAMS = 0, 1, 2  # highest session seq seen, seqs kept, datagrams taken

_TAKEN, _SKIPPED = 0, 1


@njit(cache=True, nogil=True, inline="always")
def _bucket(v):
    """The histogram bucket of ``v`` ns (see the module's note)."""
    if v <= 0:
        return 0
    if v >= np.int64(1) << (_TOP_BIT + 1):
        return _BUCKETS - 1
    if v < _SUB:
        return v
    m = 63
    while (v >> m) == 0:  # the highest set bit (v < 2**40: a few dozen steps at most)
        m -= 1
    return (m - _SUB_BITS + 1) * _SUB + ((v >> (m - _SUB_BITS)) - _SUB)


def _bucket_value(idx: np.ndarray) -> np.ndarray:
    """The middle of each bucket of ``idx``, in ns (float)."""
    idx = np.asarray(idx, np.int64)
    low = idx < _SUB
    m = np.where(low, 0, idx // _SUB + _SUB_BITS - 1)
    shift = np.maximum(m - _SUB_BITS, 0)
    base = np.where(low, idx, (_SUB + idx % _SUB) << shift)
    width = np.where(low, 1, 1 << shift)
    return base + (width - 1) / 2


@njit(cache=True, nogil=True)
def _take(w, nbytes, t_ns, session, first, seen, measured_from, legs, seqs, st):
    """Fold the datagram of ``nbytes`` in ``w`` (its u8 words), received at ``t_ns``, into
    ``seen`` (per event from session seq ``first``), ``legs`` (4 histograms, rows of seqs
    from ``measured_from``), ``seqs`` and the state words ``st``. Returns _TAKEN, or
    _SKIPPED for what is not a valid incremental datagram (nothing changes)."""
    if nbytes < _HEAD_BYTES:
        return _SKIPPED
    h0, h2 = w[0], w[2]
    count = h2 & 0xFFFF
    if (h0 & 0xFFFFFFFF) != DGRAM_MAGIC or (h2 >> 24) & 0xFF != FEED_VERSION:
        return _SKIPPED
    if (h2 >> 32) & 0xFFFF != ROW_SIZE or nbytes != _HEAD_BYTES + count * ROW_SIZE:
        return _SKIPPED
    for r in range(count):
        kind = w[_HEAD_WORDS + r * _ROW_WORDS] & 0xFF
        if kind < ROW_ACCOUNT or kind > ROW_LIMITS:
            return _SKIPPED  # parse_datagram refuses the whole datagram
    if (h2 >> 16) & 0xFF != DG_INCREMENTAL:
        return _SKIPPED  # a refresh or a heartbeat: no event, no new seq
    st[_S_DGRAMS] += 1
    if st[_S_SEQS] < seqs.shape[0]:
        seqs[st[_S_SEQS]] = np.int64(w[1])
        st[_S_SEQS] += 1
    sent = np.int64(w[3])
    n = seen.shape[0]
    last = first + n - 1
    for r in range(count):
        b = _HEAD_WORDS + r * _ROW_WORDS
        if w[b + _W_SESSION] >> 32 != session:
            continue
        s = np.int64(w[b + _W_SSEQ])
        if s > st[_S_TOP]:
            for e in range(max(st[_S_TOP] + 1, first), min(s, last) + 1):
                seen[e - first] = t_ns
            st[_S_TOP] = s
        if measured_from <= s <= last:
            send, recv, comp = np.int64(w[b + _W_SEND]), np.int64(w[b + _W_RECV]), \
                np.int64(w[b + _W_COMP])
            legs[0, _bucket(recv - send)] += 1
            legs[1, _bucket(comp - recv)] += 1
            legs[2, _bucket(sent - comp)] += 1
            legs[3, _bucket(t_ns - sent)] += 1
    return _TAKEN


class ArrivalRecorder:
    """What one run of ``n_events`` events of ``session`` (session seqs from ``first``) saw
    on multicast, folded in as datagrams arrive.

    ``buffer`` is where the caller receives each datagram (``sock.recv_into(rec.buffer)``);
    :meth:`take` then folds it in. ``measured_from`` is the first session seq whose rows the
    leg histograms count (after the warm-up). At most ``max_datagrams`` stream seqs are kept
    for the gap count (one a datagram; the rest are counted, not kept)."""

    def __init__(self, session: int, first: int, n_events: int,
                 measured_from: int | None = None, max_datagrams: int = 1 << 20):
        if not 0 <= session <= 0xFFFFFFFF:
            raise ValueError(f"session {session} is not a u4")
        if first < 1 or n_events < 0 or max_datagrams < 1:
            raise ValueError(f"first={first}, n_events={n_events}, "
                             f"max_datagrams={max_datagrams}: first and max_datagrams must "
                             "be positive, n_events not negative")
        self.session, self.first, self.n_events = session, first, n_events
        self.measured_from = first if measured_from is None else measured_from
        self._words = np.zeros(_RECV_BYTES // 8, np.uint64)
        self.buffer = memoryview(self._words.view(np.uint8))
        # Touched now, so that the run does not pay for fresh pages (module note).
        self._seen = np.empty(n_events, np.int64)
        self._seen.fill(0)
        self._legs = np.zeros((len(LEGS), _BUCKETS), np.int64)
        self._seqs = np.empty(max_datagrams, np.int64)
        self._st = np.zeros(3, np.int64)
        self._st[_S_TOP] = first - 1
        self._call = _jit.entry(_take, self._words, 0, 0, session, first, self._seen,
                                self.measured_from, self._legs, self._seqs, self._st)

    def take(self, t_ns: int, nbytes: int) -> None:
        """Fold in the datagram of ``nbytes`` now in :attr:`buffer`, received at ``t_ns``."""
        self._call(self._words, nbytes, t_ns, self.session, self.first, self._seen,
                   self.measured_from, self._legs, self._seqs, self._st)

    def add(self, t_ns: int, data) -> None:
        """Fold in ``data`` (a datagram's bytes) received at ``t_ns``; more than any UDP
        payload is not a datagram (skipped)."""
        n = len(data)
        if n > len(self.buffer):
            return
        self.buffer[:n] = data
        self.take(t_ns, n)

    @property
    def seen(self) -> np.ndarray:
        """Per event: the receipt time (ns) of the first update covering it; 0: never."""
        return self._seen

    @property
    def datagrams(self) -> int:
        """Incremental datagrams taken."""
        return int(self._st[_S_DGRAMS])

    @property
    def stream_gaps(self) -> int:
        """Datagrams missing from the stream between the first and last kept seq."""
        s = np.unique(self._seqs[:int(self._st[_S_SEQS])])
        return int(s[-1] - s[0] + 1 - len(s)) if len(s) else 0

    def legs(self) -> dict[str, dict[str, float]]:
        """The legs' p50 and p99 (us) over the measured rows; {} when there were none."""
        out: dict[str, dict[str, float]] = {}
        for name, h in zip(LEGS, self._legs, strict=True):
            total = int(h.sum())
            if not total:
                return {}
            cum = np.cumsum(h)
            idx = np.searchsorted(cum, [np.ceil(q / 100 * total) for q in (50, 99)])
            p50, p99 = _bucket_value(idx) / 1000
            out[name] = {"p50_us": float(p50), "p99_us": float(p99)}
        return out
