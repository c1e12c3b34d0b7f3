"""The FIX gateway's batch kernels (docs/fix.md, "The fast path").

One read of a FIX connection holds hundreds of ExecutionReports. Instead of a Python step
per message (framing, a field dict, a session check, a mapping over ``get``), these plain
``@njit`` functions work over the bytes of the whole read and return numpy arrays:

* :func:`frame` (used by :meth:`exposure.fix.codec.FixReader.feed_batch`): the boundaries of
  the clean messages at the front of a buffer (BodyLength, trailer and CheckSum checked
  exactly as :class:`~exposure.fix.codec.FixReader` does; it stops at the first thing that
  is not a whole clean message and the Python reader takes the rest), the MsgType, and the
  value offset and length of the first occurrence of each tag in :data:`TAGS` (the ones the
  session layer and the mapping read).
* :func:`session_flags`: which messages are plain in-order ExecutionReports for one session
  (BeginString, CompIDs, MsgSeqNum, required tags, PossDupFlag's value), so the session
  layer passes runs of them on at once and handles only the others one by one.
* :func:`map_fields`: the field-level part of :meth:`exposure.fix.mapping.Mapper.map`'s
  common path for a batch (ExecType, quantities, prices, sides, account and symbol through
  hash tables of the reference data, whether the order is finished); what does not fit
  goes back to ``Mapper.map``.
* :func:`journal_records`: the journal's ``M`` records of a batch, CRC-32C and all.

Everything here is a pure function of its arrays; the state (orders, ExecIDs, seqs) stays
in the Python objects that own it.
"""

from __future__ import annotations

import numba
import numpy as np

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)

__all__ = ["TAGS", "COL", "FixRun", "RefTables", "frame", "session_flags", "map_fields",
           "journal_records", "crc32c", "new_run_arrays"]

# The tags whose first occurrence the framing kernel locates, and their column.
TAGS = (34, 35, 43, 97, 49, 56, 37, 17, 150, 39, 54, 11, 41, 1, 55, 48, 22, 38, 44, 32, 31,
        151, 20, 19, 15)
COL = {t: k for k, t in enumerate(TAGS)}
NCOL = len(TAGS)
_COL_OF = np.full(1024, -1, np.int64)
for _t, _k in COL.items():
    _COL_OF[_t] = _k

(C34, C35, C43, C97, C49, C56, C37, C17, C150, C39, C54, C11, C41, C1, C55, C48, C22, C38,
 C44, C32, C31, C151, C20, C19, C15) = range(NCOL)


@numba.njit(cache=True, nogil=True)
def _frame(buf, pos, n, limit, col_of, starts, ends, mto, mtl, vo, vl):
    """Frame clean messages from ``pos``: returns (count, where it stopped)."""
    k = 0
    cap = starts.shape[0]
    while pos < n and k < cap:
        start = pos
        if n - start < 5:
            break
        if not (buf[start] == 56 and buf[start + 1] == 61 and buf[start + 2] == 70
                and buf[start + 3] == 73 and buf[start + 4] == 88):  # 8=FIX
            break
        e1 = -1
        lim = min(start + 24, n)
        for q in range(start, lim):
            if buf[q] == 1:
                e1 = q
                break
        if e1 < 0:
            break
        if e1 + 3 > n or buf[e1 + 1] != 57 or buf[e1 + 2] != 61:  # 9=
            break
        e2 = -1
        lim = min(e1 + 14, n)
        for q in range(e1 + 3, lim):
            if buf[q] == 1:
                e2 = q
                break
        if e2 < 0 or e2 == e1 + 3:
            break
        length = 0
        ok = True
        for q in range(e1 + 3, e2):
            c = buf[q]
            if c < 48 or c > 57:
                ok = False
                break
            length = length * 10 + (c - 48)
        if not ok or length > limit:
            break
        body_end = e2 + 1 + length
        end = body_end + 7
        if end > n:
            break
        if not (buf[body_end - 1] == 1 and buf[body_end] == 49 and buf[body_end + 1] == 48
                and buf[body_end + 2] == 61 and buf[end - 1] == 1):
            break
        total = 0
        for q in range(start, body_end):
            total += buf[q]
        total &= 0xFF
        cs = 0
        for q in range(body_end + 3, body_end + 6):
            c = buf[q]
            if c < 48 or c > 57:
                ok = False
                break
            cs = cs * 10 + (c - 48)
        if not ok or cs != total:
            break
        if not (buf[e2 + 1] == 51 and buf[e2 + 2] == 53 and buf[e2 + 3] == 61):  # 35=
            break
        t_end = e2 + 4
        while buf[t_end] != 1:
            t_end += 1
        # the fields: the first occurrence of each tracked tag (tags written canonically)
        for c in range(vo.shape[1]):
            vo[k, c] = -1
            vl[k, c] = -1
        q = start
        while q < end:
            f = q
            while buf[q] != 1:
                q += 1
            # field [f, q)
            eq = -1
            for r in range(f, q):
                if buf[r] == 61:
                    eq = r
                    break
            if eq > f and eq - f <= 4 and buf[f] != 48:
                tag = 0
                good = True
                for r in range(f, eq):
                    c = buf[r]
                    if c < 48 or c > 57:
                        good = False
                        break
                    tag = tag * 10 + (c - 48)
                if good and tag < 1024:
                    col = col_of[tag]
                    if col >= 0 and vo[k, col] < 0:
                        vo[k, col] = eq + 1
                        vl[k, col] = q - eq - 1
            q += 1
        starts[k] = start
        ends[k] = end
        mto[k] = e2 + 4
        mtl[k] = t_end - e2 - 4
        k += 1
        pos = end
    return k, pos


def new_run_arrays(cap: int):
    return (np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64),
            np.empty(cap, np.int64), np.empty((cap, NCOL), np.int32),
            np.empty((cap, NCOL), np.int32))


class FixRun:
    """Clean messages framed by :func:`frame` out of one buffer: message ``i`` is
    ``buf[starts[i]:ends[i]]``; ``vo[i, COL[tag]]``/``vl[i, COL[tag]]`` the offset and
    length of the first value of ``tag`` (-1: absent)."""

    __slots__ = ("buf", "arr", "starts", "ends", "mto", "mtl", "vo", "vl", "n", "flags",
                 "seqs", "make")

    def __init__(self, buf: bytes, arr: np.ndarray, starts, ends, mto, mtl, vo, vl,
                 n: int, make=None) -> None:
        self.make = make  # the message type (the codec's FixMessage: raw, msg_type)
        self.buf, self.arr = buf, arr
        self.starts, self.ends, self.mto, self.mtl = starts, ends, mto, mtl
        self.vo, self.vl, self.n = vo, vl, n
        self.flags = None
        self.seqs = None

    def __len__(self) -> int:
        return self.n

    def raw(self, i: int) -> bytes:
        return self.buf[int(self.starts[i]):int(self.ends[i])]

    def message(self, i: int):
        """Message ``i`` as the codec's FixMessage (``make``, given by
        :meth:`exposure.fix.codec.FixReader.feed_batch`: this module sits below the codec
        and does not import it)."""
        a, b = int(self.mto[i]), int(self.mtl[i])
        return self.make(self.raw(i), self.buf[a:a + b].decode("ascii", "replace"))

    def __repr__(self) -> str:
        return f"FixRun({self.n} messages)"


def frame(buf: bytes, limit: int, make=None):
    """(FixRun or None, where the clean prefix ends) for ``buf``."""
    arr = np.frombuffer(buf, np.uint8)
    n = len(buf)
    cap = n // 24 + 1
    starts, ends, mto, mtl, vo, vl = new_run_arrays(cap)
    k, pos = _frame(arr, 0, n, limit, _COL_OF, starts, ends, mto, mtl, vo, vl)
    if k == 0:
        return None, 0
    return FixRun(buf, arr, starts[:k], ends[:k], mto[:k], mtl[:k], vo[:k], vl[:k], k,
                  make), pos


# ------------------------------------------------------------------------ session checks
F_PLAIN = 1        # an ExecutionReport the session can pass on in a run (if in order)
F_POSS_RESEND = 2  # 97=Y


@numba.njit(cache=True, nogil=True)
def _eq(buf, off, ln, want):
    if off < 0 or ln != want.shape[0]:
        return False
    for q in range(ln):
        if buf[off + q] != want[q]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _session_flags(buf, starts, mto, mtl, vo, vl, bs, sender, target, flags, seqs):
    n = starts.shape[0]
    nb = bs.shape[0]
    for i in range(n):
        f = 0
        s = starts[i]
        seq = -1
        so, sl = vo[i, C34], vl[i, C34]
        if so >= 0 and 0 < sl < 19:
            v = 0
            for q in range(so, so + sl):
                c = buf[q]
                if c < 48 or c > 57:
                    v = -1
                    break
                v = v * 10 + (c - 48)
            seq = v
        seqs[i] = seq
        ok = seq > 0 and mtl[i] == 1 and buf[mto[i]] == 56
        if ok:
            for q in range(nb):
                if buf[s + 2 + q] != bs[q]:
                    ok = False
                    break
            ok = ok and buf[s + 2 + nb] == 1
        ok = ok and _eq(buf, vo[i, C49], vl[i, C49], target) and \
            _eq(buf, vo[i, C56], vl[i, C56], sender)
        ok = ok and vo[i, C37] >= 0 and vo[i, C17] >= 0 and vo[i, C150] >= 0 and \
            vo[i, C39] >= 0 and vo[i, C54] >= 0
        po = vo[i, C43]
        if po >= 0:
            ok = ok and vl[i, C43] == 1 and (buf[po] == 89 or buf[po] == 78)
        if ok:
            f |= F_PLAIN
        ro = vo[i, C97]
        if ro >= 0 and vl[i, C97] == 1 and buf[ro] == 89:
            f |= F_POSS_RESEND
        flags[i] = f


def session_flags(run: FixRun, bs: bytes, sender: bytes, target: bytes):
    """(flags, seqs) of a run's messages for one session (:data:`F_PLAIN`,
    :data:`F_POSS_RESEND`; seq -1 where MsgSeqNum is absent or not a number)."""
    flags = np.empty(run.n, np.uint8)
    seqs = np.empty(run.n, np.int64)
    _session_flags(run.arr, run.starts, run.mto, run.mtl, run.vo, run.vl,
                   np.frombuffer(bs, np.uint8), np.frombuffer(sender, np.uint8),
                   np.frombuffer(target, np.uint8), flags, seqs)
    return flags, seqs


# ------------------------------------------------------------------------ reference data
@numba.njit(cache=True, nogil=True)
def _hash(buf, off, ln):
    h = np.uint64(14695981039346656037)
    for q in range(off, off + ln):
        h = (h ^ np.uint64(buf[q])) * np.uint64(1099511628211)
    return h


@numba.njit(cache=True, nogil=True)
def _build(names, offs, lens, slots):
    mask = slots.shape[0] - 1
    for k in range(offs.shape[0]):
        h = _hash(names, offs[k], lens[k])
        j = np.int64(h & np.uint64(mask))
        while slots[j] >= 0:
            j = (j + 1) & mask
        slots[j] = k


@numba.njit(cache=True, nogil=True)
def _lookup(buf, off, ln, names, offs, lens, ids, slots):
    """The id of the name buf[off:off+ln], -1 when unknown, -2 when not plain ASCII."""
    for q in range(off, off + ln):
        if buf[q] >= 128:
            return -2
    mask = slots.shape[0] - 1
    j = np.int64(_hash(buf, off, ln) & np.uint64(mask))
    while True:
        k = slots[j]
        if k < 0:
            return -1
        if lens[k] == ln:
            same = True
            o = offs[k]
            for q in range(ln):
                if names[o + q] != buf[off + q]:
                    same = False
                    break
            if same:
                return ids[k]
        j = (j + 1) & mask


class RefTables:
    """Hash tables of the reference data's account names and symbols (ASCII names only: a
    value with other bytes goes to the Python path), and each instrument's currency code
    packed as ``c0 | c1 << 8 | c2 << 16`` (``currency``, by instrument id; -1: none), for
    Currency (15)."""

    __slots__ = ("accounts", "symbols", "currency")

    def __init__(self, refdata) -> None:
        self.accounts = self._table(refdata.account_ids)
        self.symbols = self._table(refdata.instrument_ids)
        ins = refdata.instruments
        self.currency = np.full(max((r.instrument for r in ins), default=-1) + 1, -1,
                                np.int64)
        for r in ins:
            code = refdata.currencies.code(r.currency)
            if code is not None and len(code) == 3 and code.isascii():
                b = code.encode()
                self.currency[r.instrument] = b[0] | b[1] << 8 | b[2] << 16

    @staticmethod
    def _table(d: dict) -> tuple:
        items = [(k.encode("ascii"), v) for k, v in d.items() if k.isascii()]
        names = np.frombuffer(b"".join(k for k, _ in items) or b"\0", np.uint8)
        lens = np.array([len(k) for k, _ in items], np.int64)
        offs = np.zeros(len(items), np.int64)
        if len(items) > 1:
            offs[1:] = np.cumsum(lens)[:-1]
        ids = np.array([v for _, v in items], np.int64)
        size = 16
        while size < 2 * len(items) + 1:
            size *= 2
        slots = np.full(size, -1, np.int64)
        _build(names, offs, lens, slots)
        return names, offs, lens, ids, slots


# ------------------------------------------------------------------------ mapping fields
# kinds (as mapping.py's _E_*)
K_NEW, K_REPLACE, K_CANCEL, K_DONE, K_FILL = 0, 1, 2, 3, 4
_ET = np.full(256, -1, np.int64)
for _c, _v in ((b"0", K_NEW), (b"5", K_REPLACE), (b"D", K_REPLACE), (b"4", K_CANCEL),
               (b"C", K_DONE), (b"3", K_DONE), (b"8", K_DONE), (b"F", K_FILL), (b"1", K_FILL),
               (b"2", K_FILL)):
    _ET[_c[0]] = _v
_P10 = np.array([10.0 ** k for k in range(23)])
MAX_QTY = 10**12


@numba.njit(cache=True, nogil=True)
def _qty(buf, off, ln):
    """A plain quantity 1..10^12 (1-13 ASCII digits), else -1."""
    if off < 0 or ln < 1 or ln > 13:
        return -1
    v = 0
    for q in range(off, off + ln):
        c = buf[q]
        if c < 48 or c > 57:
            return -1
        v = v * 10 + (c - 48)
    if v < 1 or v > 1000000000000:
        return -1
    return v


@numba.njit(cache=True, nogil=True)
def _price(buf, off, ln, p10):
    """A plain decimal (digits with at most one '.', 1-30 characters, at most 15
    significant digits: exactly what Python's float() gives), else -1.0."""
    if ln < 1 or ln > 30:
        return -1.0
    m = 0
    digits = 0
    frac = -1
    sig = 0
    for q in range(off, off + ln):
        c = buf[q]
        if c == 46:
            if frac >= 0:
                return -1.0
            frac = 0
            continue
        if c < 48 or c > 57:
            return -1.0
        digits += 1
        if frac >= 0:
            frac += 1
        if m > 0 or c != 48:
            sig += 1
        m = m * 10 + (c - 48)
        if sig > 15:
            return -1.0
    if digits == 0:
        return -1.0
    if frac <= 0:
        return float(m)
    if frac > 22:
        return -1.0
    return float(m) / p10[frac]


@numba.njit(cache=True, nogil=True)
def _finished(buf, vo, vl, i):
    lo, ll = vo[i, C151], vl[i, C151]
    if lo < 0:
        so, sl = vo[i, C39], vl[i, C39]
        if so < 0 or sl != 1:
            return False
        c = buf[so]
        return c == 50 or c == 51 or c == 52 or c == 56 or c == 67  # 2 3 4 8 C
    # LeavesQty: [0-9]{1,20}(\.0*)? with an integer part of zero
    if ll < 1:
        return False
    q = lo
    e = lo + ll
    nd = 0
    while q < e and buf[q] >= 48 and buf[q] <= 57:
        if buf[q] != 48:
            return False
        nd += 1
        q += 1
    if nd < 1 or nd > 20:
        return False
    if q == e:
        return True
    if buf[q] != 46:
        return False
    q += 1
    while q < e:
        if buf[q] != 48:
            return False
        q += 1
    return True


@numba.njit(cache=True, nogil=True)
def _map_fields(buf, vo, vl, i0, i1, fix42, secids, et_of, p10,
                an, ao, al, aid, asl, sn, so_, sl_, sid, ssl, ccy,
                ok, kind, acct, inst, side, qty, price, fin):
    for i in range(i0, i1):
        r = i - i0
        ok[r] = 0
        eo, el = vo[i, C150], vl[i, C150]
        if eo < 0 or el != 1:
            continue
        k = et_of[buf[eo]]
        if k < 0:
            continue
        mo = vo[i, C35]
        if mo >= 0 and not (vl[i, C35] == 1 and buf[mo] == 56):
            continue
        if fix42:
            to = vo[i, C20]
            if to >= 0 and not (vl[i, C20] == 1 and buf[to] == 48):
                continue
        if vo[i, C17] < 0 or vl[i, C17] < 1 or vl[i, C17] > 256:
            continue
        if vl[i, C37] > 256 or vl[i, C11] > 256 or vl[i, C41] > 256:
            continue
        if vl[i, C11] < 1 and vl[i, C37] < 1:
            continue
        a = -1
        ins = -1
        sd = 0
        qv = 0
        pv = 0.0
        if k == K_NEW or k == K_FILL:
            if vo[i, C1] >= 0:
                a = _lookup(buf, vo[i, C1], vl[i, C1], an, ao, al, aid, asl)
                if a < 0:
                    continue
            sym = vo[i, C55]
            if vo[i, C48] >= 0 and (secids or sym < 0):
                continue
            if sym >= 0:
                ins = _lookup(buf, sym, vl[i, C55], sn, so_, sl_, sid, ssl)
                if ins < 0:
                    continue
            co = vo[i, C15]
            if co >= 0:  # Currency (15): the instrument's own, else Mapper.map says why
                if ins < 0 or ins >= ccy.shape[0] or vl[i, C15] != 3:
                    continue
                if (np.int64(buf[co]) | np.int64(buf[co + 1]) << 8
                        | np.int64(buf[co + 2]) << 16) != ccy[ins]:
                    continue
            s = vo[i, C54]
            if s >= 0:
                if vl[i, C54] != 1:
                    continue
                c = buf[s]
                if c == 49 or c == 51:
                    sd = 1
                elif c == 50 or c == 52:
                    sd = 2
                elif c == 53 or c == 54:
                    sd = 3
                else:
                    continue
            qc = C32 if k == K_FILL else C38
            qv = _qty(buf, vo[i, qc], vl[i, qc])
            if qv < 0:
                continue
            pc = C31 if k == K_FILL else C44
            if vo[i, pc] < 0:
                if k == K_FILL:
                    continue
            else:
                pv = _price(buf, vo[i, pc], vl[i, pc], p10)
                if pv < 0 or (k == K_FILL and pv <= 0):
                    continue
        elif k == K_REPLACE:
            qv = _qty(buf, vo[i, C38], vl[i, C38])
            if qv < 0:
                continue
            if vo[i, C44] >= 0:
                pv = _price(buf, vo[i, C44], vl[i, C44], p10)
                if pv < 0:
                    continue
        ok[r] = 1
        kind[r] = k
        acct[r] = a
        inst[r] = ins
        side[r] = sd
        qty[r] = qv
        price[r] = pv + 0.0
        fin[r] = _finished(buf, vo, vl, i)


def map_fields(run: FixRun, i0: int, i1: int, fix42: bool, secids: bool, tables: RefTables):
    """Per message of ``run[i0:i1]``: (ok, kind, account, instrument, side, qty, price,
    finished). ``ok`` 0: the message needs Mapper.map; else its fields are plain (account
    and instrument -1 where the message has none, side 0 where absent: 1 buy, 2 sell,
    3 short)."""
    m = i1 - i0
    ok = np.empty(m, np.uint8)
    kind = np.empty(m, np.int64)
    acct = np.empty(m, np.int64)
    inst = np.empty(m, np.int64)
    side = np.empty(m, np.int64)
    qty = np.empty(m, np.int64)
    price = np.empty(m, np.float64)
    fin = np.empty(m, np.uint8)
    _map_fields(run.arr, run.vo, run.vl, i0, i1, fix42, secids, _ET, _P10,
                *tables.accounts, *tables.symbols, tables.currency, ok, kind, acct, inst,
                side, qty, price, fin)
    return ok, kind, acct, inst, side, qty, price, fin


# ------------------------------------------------------------------------ journal records
def _crc_table() -> np.ndarray:
    """Slicing-by-8 tables of CRC-32C: row 0 the byte-at-a-time table, row k the CRC of
    a byte followed by k zero bytes."""
    t = np.zeros((8, 256), np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            c = int(t[k - 1, i])
            t[k, i] = (c >> 8) ^ int(t[0, c & 0xFF])
    return t


_CRC = _crc_table()


@numba.njit(cache=True, nogil=True)
def _crc32c(table, crc, data, a, b):
    q = a
    while q + 8 <= b:   # eight bytes a step (slicing-by-8)
        lo = crc ^ (np.uint32(data[q]) | (np.uint32(data[q + 1]) << np.uint32(8)) |
                    (np.uint32(data[q + 2]) << np.uint32(16)) |
                    (np.uint32(data[q + 3]) << np.uint32(24)))
        crc = table[7, lo & 0xFF] ^ table[6, (lo >> 8) & 0xFF] ^ \
            table[5, (lo >> 16) & 0xFF] ^ table[4, lo >> 24] ^ table[3, data[q + 4]] ^ \
            table[2, data[q + 5]] ^ table[1, data[q + 6]] ^ table[0, data[q + 7]]
        q += 8
    while q < b:
        crc = table[0, (crc ^ data[q]) & 0xFF] ^ (crc >> 8)
        q += 1
    return crc


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as the ``crc32c`` package computes it."""
    arr = np.frombuffer(data, np.uint8)
    return int(_crc32c(_CRC, np.uint32(0xFFFFFFFF), arr, 0, len(arr)) ^ np.uint32(0xFFFFFFFF))


@numba.njit(cache=True, nogil=True)
def _records(table, buf, starts, ends, seqs, i0, i1, prefix, out):
    p = 0
    np_ = prefix.shape[0]
    for i in range(i0, i1):
        s, e = starts[i], ends[i]
        ln = np_ + 8 + (e - s)
        o = p + 8
        for q in range(np_):
            out[o + q] = prefix[q]
        o += np_
        sq = seqs[i]
        for q in range(8):
            out[o + q] = (sq >> (8 * q)) & 0xFF
        o += 8
        out[o:o + (e - s)] = buf[s:e]
        crc = _crc32c(table, np.uint32(0xFFFFFFFF), out, p + 8, p + 8 + ln) ^ \
            np.uint32(0xFFFFFFFF)
        for q in range(4):
            out[p + q] = (ln >> (8 * q)) & 0xFF
            out[p + 4 + q] = (crc >> np.uint32(8 * q)) & np.uint32(0xFF)
        p += 8 + ln
    return p


def journal_records(run: FixRun, i0: int, i1: int, seqs: np.ndarray, kind: bytes,
                    session: str) -> bytes:
    """The journal records (``[u32 length][u32 crc32c][kind][u8 n][session][u64 seq][raw]``,
    as :func:`exposure.fix.journal.encode_record`) of messages ``i0..i1`` of ``run``."""
    name = session.encode()
    prefix = np.frombuffer(kind + bytes((len(name),)) + name, np.uint8)
    size = int((run.ends[i0:i1] - run.starts[i0:i1]).sum()) + (i1 - i0) * (
        16 + len(prefix))
    out = np.empty(size, np.uint8)
    n = _records(_CRC, run.arr, run.starts, run.ends, seqs, i0, i1, prefix, out)
    return out[:n].tobytes()
