"""Layout of the reject log: each session's most recent rejected events, (session seq,
reason), for the REJECTED frames of the session protocol (:mod:`exposure.net.wire`).

One shared u8 array ``[max_sessions + 1, ROW_WORDS]`` (``/exposure.<name>.rejects``); row
``s`` is session ``s`` (row 0 unused). Each row is a ring of the session's last ``RING``
rejects, in session-seq order::

    word         field   meaning                                       writer
    -----------  ------  --------------------------------------------  ----------------------
    0 HEAD       head    rejects ever logged for the session (since    compute (release store,
                         the log was rebuilt: node start, recovery)    after the entry)
    1 BASE       base    every reject of a seq > base was logged; the  recovery (before any
                         rejects of seqs <= base are counts only (the  process starts)
                         session's DONE when the log was rebuilt)
    2..7                 reserved (0)
    8.. ENTRY    ring    entry k (k < head) at ENTRY + k % RING:       compute
                         (session seq << 8) | reason code (types.R_*,
                         R_UNAUTHORIZED; 1..15)

    +------+------+-----------+-----------------------------------------------+
    | head | base | reserved  | entry 0 | entry 1 | ...          | entry 1023 |
    +------+------+-----------+-----------------------------------------------+
    0      1      2           8                                              1032 words

Compute writes an entry, then (release) the head, then (release, later in the same batch)
the session's DONE in the session table: a reader that loads DONE, then the head, finds
every reject of a seq <= DONE logged (:func:`exposure.engine.publish.count_sessions`). An
entry k is valid while ``head - RING <= k``: the reader copies entries, then re-loads the
head, and counts as lost every entry the writer may have overwritten meanwhile. Each entry
is one aligned word: a reader never sees half of one.

Cost: one entry per *rejected* event (nothing per accepted event). A session's seqs start
at 1 and grow by one per event (:mod:`exposure.net.wire`), so 56 bits of seq never run
out; an entry keeps the seq's low 56 bits. Bounds: the table is fixed at start (8,256
bytes per session, pages touched only by sessions that have rejects); a hostile client
cannot grow it, only overwrite its own row's oldest entries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RING", "W_HEAD", "W_BASE", "ENTRY", "ROW_WORDS", "SEQ_MASK", "reject_shape",
           "pack", "unpack", "read_since", "counts_after"]

RING = 1024          # entries kept per session (a power of two)
W_HEAD = 0
W_BASE = 1
ENTRY = 8            # the first entry word (64 bytes into the row)
ROW_WORDS = ENTRY + RING
SEQ_MASK = (1 << 56) - 1

assert RING & (RING - 1) == 0 and W_HEAD < W_BASE < ENTRY and ROW_WORDS % 8 == 0


def reject_shape(max_sessions: int) -> tuple[int, int]:
    return (max_sessions + 1, ROW_WORDS)


def pack(seq: int, code: int) -> int:
    """One entry word: ``(seq << 8) | code``."""
    return ((seq & SEQ_MASK) << 8) | (code & 0xFF)


def unpack(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seqs, codes) of entry words."""
    w = np.asarray(words, np.uint64)
    return w >> np.uint64(8), (w & np.uint64(0xFF)).astype(np.uint8)


def read_since(row: np.ndarray, cur: int, upto: int, done: int, tries: int = 3):
    """What a reader that has every reject of a seq <= ``upto`` (and the entries below
    index ``cur``) learns from the log row ``row`` up to seq ``done`` (> upto, read from
    the session table *before* this call): ``(after, seqs, codes, cur)``: every reject of a
    seq in (after, done] is in ``seqs``/``codes``; ``after`` > ``upto`` when entries were
    overwritten before they were read (their seqs are known only as counts); ``cur`` the
    next index to read from. Entries are copied, then the head is re-read: an entry the
    writer may have overwritten meanwhile is not used (``tries`` times, then everything up
    to ``done`` is lost)."""
    head = int(row[W_HEAD])
    none = np.zeros(0, np.uint64)
    if head == cur:  # nothing logged since: the common case
        return upto, none, none.astype(np.uint8), cur
    for _ in range(tries):
        i = max(cur, head - RING)
        words = row[ENTRY + np.arange(i, head) % RING]
        head2 = int(row[W_HEAD])
        if head2 - RING <= i:
            break
        head = head2
    else:  # overwritten faster than read (a session rejecting at full speed)
        return done, none, none.astype(np.uint8), cur  # (cur stays: next time is lost too)
    seqs, codes = unpack(words)
    after = upto
    if i > cur:  # entries overwritten before they were read: their seqs are lost
        after = max(upto, min(int(seqs[0]) - 1, done))
    lo = int(np.searchsorted(seqs, after, "right"))
    hi = int(np.searchsorted(seqs, done, "right"))
    return after, seqs[lo:hi], codes[lo:hi], i + hi


def counts_after(row: np.ndarray, seq: int, ncodes: int) -> list[int] | None:
    """Per reason code (``ncodes`` of them), how many rejects of a seq above ``seq`` the log
    row ``row`` holds: what to take from the session's counters for an ACK of ``seq``
    while compute has processed beyond it (acknowledgements held back by durability). The
    newest entry is looked at first (at or below ``seq``: nothing, the common case).
    None when the log cannot tell: entries above ``seq`` were overwritten, or overwritten
    while being read."""
    head = int(row[W_HEAD])
    if head == 0 or int(row[ENTRY + (head - 1) % RING]) >> 8 <= seq:
        return [0] * ncodes
    i = max(0, head - RING)
    words = row[ENTRY + np.arange(i, head) % RING]
    if int(row[W_HEAD]) - RING > i:  # overwritten while read
        return None
    seqs, codes = unpack(words)
    if i > 0 and int(seqs[0]) > seq:  # the oldest kept is above seq: some were lost
        return None
    above = codes[seqs > np.uint64(seq)]
    return np.bincount(above, minlength=ncodes)[:ncodes].tolist()
