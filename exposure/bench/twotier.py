"""The "two-tier" baseline: a stateless compute service whose state lives in ``redis-server``.

    python -m exposure.bench.twotier --port P --group G --mport MP --redis-port RP
                           [--config NODE.toml] [--cpu N] [--max-batch 64]
                           [--wait spin|block] [--timing]

This is the fund's previous design, rebuilt as a fair, competent baseline for the perf tool
(``exposure perf compare``): the same TCP sessions, wire protocol, dedup and ACKs as the
node (:class:`exposure.node.stages.ingest.IngestStage`, unchanged), the same numba kernel
(:func:`exposure.engine.kernel.apply_batch`) and the same multicast datagrams
(:mod:`exposure.node.stages.fanout`'s format), so its tallies are bit for bit the node's. The one
difference is where the state lives: not in this process's memory but in Redis, one key per
row of the kernel's flat state (raw little-endian bytes, exactly the row's layout):

    ctr          the counters (types.C_*)               i8[32]     256 B
    fund         the fund's compensated sums            f8[10, 2]  160 B
    a:{a}        acc[a] + acc_lim[a] + acc_live[a] + acc_gseq[a]   176 B
    s:{s}        sec[s]                                 f8[2, 2]    32 B
    i:{i}        inst[i]                                INSTRUMENT  96 B
    c:{c}        cells[c]                               CELL        64 B
    x:{slot}     cidx[slot], absent = empty             CELLIDX     16 B
    o:{slot}     orders[slot], absent = empty           ORDER       32 B

A row whose value is the empty state's (an order slot with ``cell < 0``, any other row equal
to its initial bytes) is deleted, so an absent key always reads as the initial row.

Per batch (up to ``--max-batch`` records from ingest's ring):

1. **fetch, one round trip**: one ``EVALSHA`` of a Lua script (:data:`FETCH_LUA`) that gathers,
   inside Redis, every row the kernel can read or write for this batch and returns them as
   one binary string. Lua 5.1 cannot compute the kernel's 64-bit hashes, so this process
   computes each record's home slots with the kernel's own ``order_home`` / ``cell_home``
   and sends them with the record's keys as a *plan* (one 48-byte row per record). The
   script then, per record:

   * order events (new, replace, cancel, done, fill): walks the order table's probe run from
     the home slot to the first empty slot, loading every slot. Empty slots that an earlier
     ``new`` of the batch may fill are counted as occupied for the later walks (an
     "overlay"), so every slot the kernel probes, inserts into, or shifts through during its
     backward-shift deletion (Knuth's Algorithm R reads to the end of the cluster) is loaded.
     The order with the record's (source, order id) is found by comparing raw bytes (8-byte
     ids cannot be Lua numbers, which are doubles); its cell (``struct.unpack`` of the i4 at
     offset 24), the cell's account (48) and instrument (52) are loaded;
   * new, fill and position: walks the cell index from the home of ``account * instruments +
     instrument`` to the key or to an empty slot (insert-only, so no overlay subtleties
     beyond marking the slot a new cell may take) and loads the matched cell;
   * the record's account (new, fill, position, limit) and instrument, with the instrument's
     sector row (i4 at 68); an ``instrument`` event also loads its new sector;
   * mark and instrument events revalue every cell of the instrument, and new, fill and
     replace do so on an instrument not marked yet (``marked``, i4 at 72: the order price
     becomes the reference price), so for those the whole chain is loaded: ``head`` (i4 at
     64), each cell's ``next`` (i4 at 56) and each cell's account (a replace's instrument is
     its order's: known from the matched order, or loaded by the batch's new of that order);
   * always ``ctr`` and ``fund``.

   Ids read from the records are checked against the capacities first (the kernel rejects a
   record with an out-of-range id: nothing to load, and nothing to crash the script).
2. The rows are copied into a private, full-capacity scratch state (allocated once), and
   ``apply_batch`` runs on it: the kernel itself, unchanged, so every rule and every rounding
   is the node's.
3. **write-back, one round trip**: every fetched row that changed, every new row (new cells
   are numbered from ``ctr[C_CELLS]``; new index and order entries land in the empty slots
   the walks fetched) and the deletion of emptied slots, as one ``EVALSHA`` of a second
   script (:data:`STORE_LUA`: ``MSET`` + ``DEL``, executed atomically by Redis).
4. Tally updates are built by the node's own ``_after_batch`` (which also advances the
   session table, so ingest ACKs exactly as in the node) and sent as multicast datagrams in
   the fan-out's format, after the write-back: nothing is published or acknowledged before
   Redis holds it.
5. Every scratch row the batch fetched or created is put back to its initial bytes, so
   nothing carries from one batch to the next except what Redis holds.

Steps 2, 4 (building the updates), 3 (building the write-back) and 5 are one jitted call
(:func:`_batch`), and the plan another; the hot path has no per-record Python.

Why it is a fair baseline: it does the minimum a stateless service must do (one read and one
write round trip per batch, never one per record or per row: the gathering, including the
pointer chasing through orders, cells and instrument chains, runs server side), batches
like the node, and uses the node's ingest, kernel and datagram code, so the difference the
perf tool measures is the cost of keeping the state in another process: two loopback round
trips, the Lua work, and the (de)serialisation of the rows. It is also single-writer, as the
node is: a second instance would need optimistic locking (``WATCH``) or a lock, which would
cost more round trips; that cost is not charged here.

The process: ingest exactly as in the node, into a private ring
(``/exposure.twotier.<pid>.ring``, removed on exit); one loop, pinned with ``--cpu``, that
spins on ``ingest.poll(0)`` (``--wait block`` sleeps up to 1 ms in epoll when idle instead,
for tests on small machines), pops up to ``--max-batch`` records and runs the steps above,
then sends the due ACKs. Capacities, the session limit, the ACK interval and the fan-out
settings come from ``--config`` (the node's TOML; ``--port``/``--group``/``--mport``
override it). Every numba function is compiled (or loaded) before the sessions' port
listens, so a connection means ready. The updates' ``compute_ns`` is the time the batch was
taken from the ring (the node stamps it before applying), each datagram's ``sent_ns`` the
time just before its send. Redis is reached over one plain TCP connection of redis-py
(held for the process's life; each ``EVALSHA`` packed by hiredis into one buffer, so one
send and one segment). A ``meta`` key records the capacities the Redis state was made
with; a service with other capacities refuses to start.

On SIGTERM or SIGINT it prints one JSON line to stdout: ``events`` (records applied),
``batches``, ``redis_round_trips`` (made on batches' critical paths), ``round_trips_per_batch``
(the most any batch made: 2) and ``max_batch`` (the largest batch); ``--timing`` adds a line
on stderr with the mean time per batch in the fetch, the apply (load, kernel, updates,
write-back entries, reset) and the store. The round trips are counted, not assumed: the
perf tool multiplies a link delay by the crossings on each event's critical path, 2 (client
to service, service to client) + 2 x ``round_trips_per_batch``.

Also here: :class:`RedisServer` (a private ``redis-server`` for tests and the perf tool) and
:func:`load_state` (every row from Redis into a fresh state, so :func:`exposure.engine.document.
document` gives the SPEC document of what the service holds).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from exposure.config.node import ConfigError, load_config
from exposure.core import jit as _jit
from exposure.core.capacity import Capacities
from exposure.core.log import setup
from exposure.core.types import (
    C_CELLS,
    C_LAST_GSEQ,
    C_LIVE,
    C_NCCHANGED,
    C_NCHANGED,
    C_NICHANGED,
    C_NSCHANGED,
    EVENT_DTYPE,
    EVENT_SIZE,
    MAX_ORDER_ID,
    ROW_ACCOUNT,
    ROW_FUND,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    UPDATE_DTYPE,
)
from exposure.engine.kernel import account_values, apply_batch, cell_home, order_home
from exposure.engine.publish import count_sessions, set_values
from exposure.feed.wire import (
    DG_INCREMENTAL,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    datagram_size,
    dgram_word,
    open_sender,
    rows_per_datagram,
)
from exposure.node.stages.ingest import IngestStage
from exposure.shm import ring_layout as RL
from exposure.shm.ring import Ring, ring_pop
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import State, TallyLayout, allocate

__all__ = ["RedisServer", "TwoTier", "load_state", "main", "FETCH_LUA", "STORE_LUA"]

# ----------------------------------------------------------------------------- tables
# Table codes (the same in Lua, 0-based here, 1-based there), key prefixes and row sizes.
T_CTR, T_FUND, T_ACC, T_SEC, T_INST, T_CELL, T_CIDX, T_ORD = range(8)
N_TABLES = 8
PREFIXES = ("ctr", "fund", "a:", "s:", "i:", "c:", "x:", "o:")
_MAX_PARTS = 4  # an account row is four arrays of the state side by side


# Per table: the state arrays its Redis row is made of, side by side, in row order.
_TABLE_ARRAYS = (("ctr",), ("fund",), ("acc", "acc_lim", "acc_live", "acc_gseq"), ("sec",),
                 ("inst",), ("cells",), ("cidx",), ("orders",))


ROW_SIZES = np.array([256, 160, 176, 32, 96, 64, 16, 32], np.int64)


class _Geometry:
    """Where every table's rows sit in the flat state buffer, and their initial bytes
    (read from ``buf``/``st``, a freshly initialised state of ``caps``)."""

    def __init__(self, caps: Capacities, buf: np.ndarray, st: State):
        self.caps = caps
        self.layout = lay = TallyLayout(caps)
        # parts[t, q] = (byte offset of the array in the buffer, bytes per row of the array
        # (0: a one-row table), offset in the Redis row, bytes)
        self.parts = np.zeros((N_TABLES, _MAX_PARTS, 4), np.int64)
        for t, names in enumerate(_TABLE_ARRAYS):
            off = 0
            for q, name in enumerate(names):
                arr = getattr(st, name)
                if name in ("ctr", "fund"):
                    stride, width = 0, arr.nbytes
                else:
                    stride = width = arr.nbytes // arr.shape[0]
                self.parts[t, q] = (lay.offsets[name], stride, off, width)
                off += width
            if off != ROW_SIZES[t]:
                raise AssertionError(f"table {PREFIXES[t]}: rows of {off} bytes, "
                                     f"expected {ROW_SIZES[t]}")
        # The empty state's row of every table (all rows of a table start equal).
        self.pristine = np.zeros((N_TABLES, int(ROW_SIZES.max())), np.uint8)
        gather_rows(buf, self.parts, self.pristine)
        if (self.parts % 8).any() or (ROW_SIZES % 8).any():
            raise AssertionError("table offsets and row sizes must be multiples of 8 bytes")
        self.parts_w = self.parts // 8  # the same in 8-byte words (what the jitted code uses)
        self.rowsz_w = ROW_SIZES // 8
        self.pristine_w = self.pristine.view(np.uint64)
        self.limits = np.array([1, 1, caps.accounts, caps.sectors, caps.instruments,
                                caps.cells, caps.cell_slots, caps.order_slots], np.int64)


def gather_rows(buf: np.ndarray, parts: np.ndarray, out: np.ndarray, ident: int = 0) -> None:
    """Row ``ident`` of every table of ``buf``, in Redis-row layout, into ``out[t]``."""
    for t in range(N_TABLES):
        for q in range(_MAX_PARTS):
            base, stride, off, w = (int(x) for x in parts[t, q])
            if w:
                s = base + ident * stride
                out[t, off:off + w] = buf[s:s + w]


# ----------------------------------------------------------------------------- Lua
# The plan: one row per record (48 bytes, little-endian).
PLAN_DTYPE = np.dtype({
    "names": ["order_id", "key", "flags", "account", "instrument", "sector", "ohome", "xhome",
              "source", "_pad"],
    "formats": ["<u8", "<i8", "<i4", "<i4", "<i4", "<i4", "<i4", "<i4", "<u2", "<u2"],
    "offsets": [0, 8, 16, 20, 24, 28, 32, 36, 40, 42],
    "itemsize": 48,
}, align=True)
F_ORDER = 1         # walk the order table from ohome, match (source, order_id)
F_INSERT = 2        # a new: the walk's empty slot may be taken by this batch
F_CELL = 4          # walk the cell index from xhome for key (may insert)
F_ACCOUNT = 8       # load the record's account
F_INST = 16         # load the record's instrument (and its sector)
F_CHAIN = 32        # ... and every cell of its chain with their accounts
F_CHAIN_UNMARKED = 64  # ... the same, for an instrument not marked yet (also the order's)
F_SECTOR = 128      # load the record's sector (an instrument event may move there)

# Shared by both scripts: key prefixes and row sizes by table (1-based in Lua), the plan's
# flag bits; written from the Python constants so the two sides cannot drift apart.
_LUA_COMMON = (
    "local P = {" + ", ".join(f"'{x}'" for x in PREFIXES) + "}\n"
    + "local RS = {" + ", ".join(str(int(x)) for x in ROW_SIZES) + "}\n"
    + "".join(f"local {name} = {value}\n" for name, value in (
        ("F_ORDER", F_ORDER), ("F_INSERT", F_INSERT), ("F_CELL", F_CELL),
        ("F_ACCOUNT", F_ACCOUNT), ("F_INST", F_INST), ("F_CHAIN", F_CHAIN),
        ("F_CHAIN_UNMARKED", F_CHAIN_UNMARKED), ("F_SECTOR", F_SECTOR)))
    + """local function keyof(t, id)
  if t <= 2 then return P[t] end
  return P[t] .. string.format('%d', id)
end
""")

FETCH_LUA = _LUA_COMMON + """
-- ARGV: plan, records, accounts, instruments, sectors, cells, cell slots, order slots
local plan = ARGV[1]
local n = tonumber(ARGV[2])
local NA, NI, NS = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local NC, XS, OS = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local unpack_, pack, sub, band = struct.unpack, struct.pack, string.sub, bit.band
local seen = {{}, {}, {}, {}, {}, {}, {}, {}}
local out = {}
-- Every row once: its (table, id, present) header and its bytes go to the reply.
local function get(t, id)
  local v = seen[t][id]
  if v == nil then
    v = redis.call('GET', keyof(t, id))
    seen[t][id] = v
    if v then
      if #v ~= RS[t] then
        error('twotier: ' .. keyof(t, id) .. ' has ' .. #v .. ' bytes, not ' .. RS[t])
      end
      out[#out + 1] = pack('<i4i4i4i4', t - 1, id, 1, 0)
      out[#out + 1] = v
    else
      out[#out + 1] = pack('<i4i4i4i4', t - 1, id, 0, 0)
    end
  end
  return v
end
local function account(a)
  if a >= 0 and a < NA then get(3, a) end
end
local chained = {}
-- chain: 0 the row and its sector, 1 also the chain if the instrument is unmarked, 2 always
local function instrument(i, chain)
  if i < 0 or i >= NI then return end
  local v = get(5, i)
  local head, sector, marked = -1, 0, 0
  if v then head, sector, marked = unpack_('<i4i4i4', v, 65) end
  if sector >= 0 and sector < NS then get(4, sector) end
  if (chain == 2 or (chain == 1 and marked == 0)) and not chained[i] then
    chained[i] = true
    local c, steps = head, 0
    while c >= 0 and c < NC and steps < NC do
      local cv = get(6, c)
      if not cv then break end
      local a, _, nxt = unpack_('<i4i4i4', cv, 49)
      account(a)
      c = nxt
      steps = steps + 1
    end
  end
end
-- Order table: from the home slot through the first slot that is empty in the overlay
-- (fetched empty, not taken by an earlier new of this batch). Returns the matched row.
local omark = {}
local function owalk(h, oid, src, insert)
  local match = false
  for _ = 1, OS do
    local v = get(8, h)
    if v then
      if not match and sub(v, 1, 8) == oid and sub(v, 29, 30) == src then match = v end
    elseif not omark[h] then
      if insert then omark[h] = true end
      return match
    end
    h = (h + 1) % OS
  end
  return match
end
-- Cell index (insert-only): from the home slot to the key or the first overlay-empty slot.
local xmark = {}
local function xwalk(h, key)
  for _ = 1, XS do
    local v = get(7, h)
    if v then
      if sub(v, 1, 8) == key then return (unpack_('<i4', v, 9)) end
    elseif not xmark[h] then
      xmark[h] = true
      return -1
    end
    h = (h + 1) % XS
  end
  return -1
end
get(1, 0)
get(2, 0)
for k = 0, n - 1 do
  local p = k * 48 + 1
  local flags, a, i, s, oh, xh = unpack_('<i4i4i4i4i4i4', plan, p + 16)
  local cmode = 0
  if band(flags, F_CHAIN_UNMARKED) ~= 0 then cmode = 1 end
  if band(flags, F_ORDER) ~= 0 then
    local m = owalk(oh, sub(plan, p, p + 7), sub(plan, p + 40, p + 41),
                    band(flags, F_INSERT) ~= 0)
    if m then
      local c = unpack_('<i4', m, 25)
      if c >= 0 and c < NC then
        local cv = get(6, c)
        if cv then
          local ca, ci = unpack_('<i4i4', cv, 49)
          account(ca)
          instrument(ci, cmode)
        end
      end
    end
  end
  if band(flags, F_CELL) ~= 0 then
    local c = xwalk(xh, sub(plan, p + 8, p + 15))
    if c >= 0 and c < NC then get(6, c) end
  end
  if band(flags, F_ACCOUNT) ~= 0 then account(a) end
  if band(flags, F_INST) ~= 0 then
    if band(flags, F_CHAIN) ~= 0 then cmode = 2 end
    instrument(i, cmode)
  end
  if band(flags, F_SECTOR) ~= 0 and s >= 0 and s < NS then get(4, s) end
end
return table.concat(out)
"""

STORE_LUA = _LUA_COMMON + """
-- ARGV[1]: entries (table i4, id i4, op i4: 1 set + the row's bytes, 0 delete; i4 0)
local blob = ARGV[1]
local unpack_, sub = struct.unpack, string.sub
local sets, dels = {}, {}
local pos, len = 1, #blob
while pos <= len do
  local t, id, op = unpack_('<i4i4i4', blob, pos)
  pos = pos + 16
  local key = keyof(t + 1, id)
  if op == 1 then
    local rs = RS[t + 1]
    sets[#sets + 1] = key
    sets[#sets + 1] = sub(blob, pos, pos + rs - 1)
    pos = pos + rs
  else
    dels[#dels + 1] = key
  end
end
for lo = 1, #sets, 1000 do
  redis.call('MSET', unpack(sets, lo, math.min(lo + 999, #sets)))
end
for lo = 1, #dels, 1000 do
  redis.call('DEL', unpack(dels, lo, math.min(lo + 999, #dels)))
end
return #sets / 2
"""


# ----------------------------------------------------------------------------- jitted
_MAX_OID = np.uint64(MAX_ORDER_ID)


@njit(cache=True, _nrt=False)
def _plan(st, recs, n, plan, max_sources):
    """One plan row per record: what the fetch script must load for it (see the module
    docstring). Ids the kernel would reject as out of range load nothing."""
    na = st.acc.shape[0]
    ni = st.inst.shape[0]
    ns = st.sec.shape[0]
    omask = st.orders.shape[0] - 1
    for k in range(n):
        r = recs[k]
        p = plan[k]
        t = np.int64(r.type)
        flags = 0
        a_ok = r.account < na
        i_ok = r.instrument < ni
        o_ok = r.source < max_sources and r.order_id < _MAX_OID
        p.order_id = r.order_id
        p.source = np.uint16(r.source & np.uint32(0xFFFF))
        p.account = np.int32(r.account) if a_ok else np.int32(-1)
        p.instrument = np.int32(r.instrument) if i_ok else np.int32(-1)
        p.sector = np.int32(r.sector) if r.sector < ns else np.int32(-1)
        p.ohome = 0
        p.xhome = 0
        p.key = -1
        if r.reject == 0:
            if t == T_INSTRUMENT and i_ok and r.sector < ns:
                flags = F_INST | F_CHAIN | F_SECTOR
            elif t == T_LIMIT and a_ok:
                flags = F_ACCOUNT
            elif t == T_MARK and i_ok:
                flags = F_INST | F_CHAIN
            elif t == T_POSITION and a_ok and i_ok:
                flags = F_CELL | F_ACCOUNT | F_INST
            elif (t == T_NEW or t == T_FILL) and a_ok and i_ok and o_ok:
                flags = F_ORDER | F_CELL | F_ACCOUNT | F_INST | F_CHAIN_UNMARKED
                if t == T_NEW:
                    flags |= F_INSERT
            elif t == T_REPLACE and o_ok:
                flags = F_ORDER | F_CHAIN_UNMARKED
            elif (t == T_CANCEL or t == T_DONE) and o_ok:
                flags = F_ORDER
        if flags & F_ORDER:
            p.ohome = np.int32(order_home(r.source, r.order_id, omask))
        if flags & F_CELL:
            key = np.int64(r.account) * ni + np.int64(r.instrument)
            p.key = key
            p.xhome = np.int32(cell_home(st.cidx, key))
        p.flags = np.int32(flags)


_LOW = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@njit(cache=True, _nrt=False)
def _scrub(st):
    """Put the batch's instrument, sector and cell change lists (and their dirty flags and
    the sectors' gseqs, which this baseline does not keep) back to their initial values."""
    for j in range(st.ctr[C_NSCHANGED]):
        st.sec_gseq[st.schanged[j]] = 0
        st.schanged[j] = 0
    for j in range(st.ctr[C_NICHANGED]):
        st.inst[st.ichanged[j]].dirty = 0
        st.ichanged[j] = 0
    for j in range(st.ctr[C_NCCHANGED]):
        st.cells[st.cchanged[j]].dirty = 0
        st.cchanged[j] = 0
    st.sec_dirty[:] = 0
    st.ctr[C_NICHANGED] = 0
    st.ctr[C_NSCHANGED] = 0
    st.ctr[C_NCCHANGED] = 0


@njit(cache=True)
def _updates(st, recs, n, upd, now_ns):
    """The batch's account and fund rows of the feed (the node's format; this baseline
    sends no instrument or sector rows), each tagged with the event that last moved it."""
    g0 = np.int64(recs[0].gseq)
    vals = np.empty(8)
    m = 0
    for j in range(st.ctr[C_NCHANGED] + 1):
        u = upd[m]
        if j < st.ctr[C_NCHANGED]:
            a = np.int64(st.changed[j])
            u.breach = account_values(st.acc, st.acc_lim, a, vals)
            u.breach_prev = u.breach
            u.live_orders = st.acc_live[a]
            u.account = a
            u.kind = ROW_ACCOUNT
            k = np.int64(st.acc_gseq[a]) - g0
        else:  # the fund row, triggered by the batch's last event
            for t in range(8):
                vals[t] = st.fund[t, 0] + st.fund[t, 1]
            u.breach = 0
            u.breach_prev = 0
            u.live_orders = st.ctr[C_LIVE]
            u.account = -1
            u.kind = ROW_FUND
            k = n - 1
        if k < 0 or k >= n:
            k = n - 1
        r = recs[k]
        u.session = r.session
        u.gseq = r.gseq
        u.sseq = r.sseq
        u.send_ns = r.send_ns
        u.recv_ns = r.recv_ns
        set_values(u, vals)
        u.compute_ns = now_ns
        m += 1
    return m


@njit(cache=True)
def _batch(buf, st, recs, status, n, inw, nin, parts, rowsz, pristine, cand, outw,
           sess_flat, ncols, upd, now_ns):
    """Load the fetched rows into the scratch state, apply the batch with the kernel, build
    its tally updates (into ``upd``), build the write-back entries into ``outw`` and put
    every touched row back to its initial bytes. Returns (updates, words of ``outw``, rows
    touched). ``cand`` and ``outw`` must be large enough (:func:`_count_entries`).

    Everything is in 8-byte words: ``buf`` is the state buffer as u8 words, ``inw`` the fetch
    reply (entries of a 16-byte header (table, id, present, 0 as i4) and the row if present),
    ``outw`` the write-back (entries of (table, id, 1 = set / 0 = delete, 0) and the row of a
    set), ``parts`` and ``rowsz`` in words (every table and row offset is a multiple of 8)."""
    # ---- 1. the fetched rows into the scratch state; remember every row fetched
    nc = 0
    pos = 0
    while pos < nin:
        h = inw[pos]
        t = np.int64(h & _LOW)
        ident = np.int64(h >> _S32)
        present = (inw[pos + 1] & _LOW) != 0
        pos += 2
        cand[nc, 0] = t
        cand[nc, 1] = ident
        cand[nc, 2] = pos if present else -1
        nc += 1
        if present:
            for q in range(parts.shape[1]):
                w = parts[t, q, 3]
                if w == 0:
                    break
                dst = parts[t, q, 0] + ident * parts[t, q, 1]
                src = pos + parts[t, q, 2]
                for b in range(w):
                    buf[dst + b] = inw[src + b]
            pos += rowsz[t]
    # ---- 2. the kernel
    c0 = st.ctr[C_CELLS]
    r = recs[:n]
    s = status[:n]
    apply_batch(st, r, s)
    c1 = st.ctr[C_CELLS]
    for c in range(c0, c1):  # new cells: rows Redis does not have yet
        cand[nc, 0] = T_CELL
        cand[nc, 1] = c
        cand[nc, 2] = -1
        nc += 1
    # ---- 3. the batch's updates (and the session table, for ingest's ACKs)
    count_sessions(r, s, n, sess_flat, ncols, sess_flat[:0])  # (no reject log)
    m = _updates(st, r, n, upd, now_ns) if n else 0
    _scrub(st)  # the instruments', sectors' and cells' change lists: not state
    for j in range(st.ctr[C_NCHANGED]):  # batch scratch back to its initial values
        a = st.changed[j]
        st.acc_stamp[a] = 0
        st.changed[j] = -1
    # ---- 4. write-back entries: changed and new rows, deleted slots; then reset the row
    w_at = 0
    for k in range(nc):
        t = cand[k, 0]
        ident = cand[k, 1]
        old = cand[k, 2]
        empty = True
        differs = old < 0
        for q in range(parts.shape[1]):
            w = parts[t, q, 3]
            if w == 0:
                break
            at = parts[t, q, 0] + ident * parts[t, q, 1]
            off = parts[t, q, 2]
            for b in range(w):
                nw = buf[at + b]
                if nw != pristine[t, off + b]:
                    empty = False
                if old >= 0 and nw != inw[old + off + b]:
                    differs = True
        if t == T_ORD:  # an order slot is empty when its cell (i4, bytes 24..27) is < 0
            cellw = buf[parts[t, 0, 0] + ident * parts[t, 0, 1] + 3]
            empty = ((cellw >> np.uint64(31)) & np.uint64(1)) != 0
        if empty:
            if old >= 0:
                outw[w_at] = np.uint64(t) | (np.uint64(ident) << _S32)
                outw[w_at + 1] = 0
                w_at += 2
        elif differs:
            outw[w_at] = np.uint64(t) | (np.uint64(ident) << _S32)
            outw[w_at + 1] = 1
            w_at += 2
            for q in range(parts.shape[1]):
                w = parts[t, q, 3]
                if w == 0:
                    break
                at = parts[t, q, 0] + ident * parts[t, q, 1]
                off = parts[t, q, 2]
                for b in range(w):
                    outw[w_at + off + b] = buf[at + b]
            w_at += rowsz[t]
        for q in range(parts.shape[1]):  # the row back to its initial bytes
            w = parts[t, q, 3]
            if w == 0:
                break
            at = parts[t, q, 0] + ident * parts[t, q, 1]
            off = parts[t, q, 2]
            for b in range(w):
                buf[at + b] = pristine[t, off + b]
    return m, w_at, nc


@njit(cache=True, _nrt=False)
def _count_entries(inw, nin, rowsz):
    """Entries in a fetch reply (to size the work arrays before a batch is applied)."""
    k = 0
    pos = 0
    while pos < nin:
        t = np.int64(inw[pos] & _LOW)
        present = (inw[pos + 1] & _LOW) != 0
        pos += 2
        if present:
            pos += rowsz[t]
        k += 1
    return k


# ----------------------------------------------------------------------------- service
class TwoTier:
    """The compute side: plan, fetch, apply, write back, publish; one batch at a time.

    Usable without ingest (tests): fill ``recs[:n]`` and call :meth:`run_batch`."""

    def __init__(self, client, caps: Capacities, max_batch: int = 64,
                 max_sessions: int = 256, sessions: np.ndarray | None = None):
        self.client = client
        self.caps = caps
        self.max_batch = max_batch
        self.buf, self.st = allocate(caps)  # the scratch state, initial: rows read from it
        self.geo = _Geometry(caps, self.buf, self.st)
        self.recs = np.zeros(max_batch, EVENT_DTYPE)
        self.words = self.recs.view(np.uint64).reshape(max_batch, -1)
        self.status = np.zeros(max_batch, np.uint8)
        self.plan = np.zeros(max_batch, PLAN_DTYPE)
        self.plan_bytes = memoryview(self.plan.view(np.uint8))
        self.sessions = (sessions if sessions is not None
                         else np.zeros((max_sessions + 1, SESSION_COLS), np.uint64))
        self.sess_flat = self.sessions.reshape(-1)
        self.upd = np.zeros(caps.accounts + 1, UPDATE_DTYPE)
        self.bufw = self.buf.view(np.uint64)
        self.inw = np.zeros(1 << 13, np.uint64)    # the fetch reply, as words
        self.cand = np.zeros((1 << 12, 3), np.int64)
        self.outw = np.zeros(1 << 15, np.uint64)   # the write-back, as words
        self.caps_args = (caps.accounts, caps.instruments, caps.sectors, caps.cells,
                          caps.cell_slots, caps.order_slots)
        # statistics
        self.events = 0
        self.batches = 0
        self.round_trips = 0
        self.max_rt = 0
        self.max_n = 0
        self.t_fetch = 0
        self.t_apply = 0
        self.t_store = 0
        self._check_caps()
        self.fetch_sha = client.script_load(FETCH_LUA)
        self.store_sha = client.script_load(STORE_LUA)
        self.conn = client.connection_pool.get_connection()
        self._pack = _packer(self.conn)
        self._warm()

    def _check_caps(self) -> None:
        """The Redis state must have been made with these capacities (a "meta" key)."""
        want = json.dumps(self.caps.as_dict(), sort_keys=True).encode()
        got = self.client.get("meta")
        if got is None:
            self.client.set("meta", want)
        elif got != want:
            raise RuntimeError(f"the Redis state was made with capacities {got.decode()}, "
                               f"not {want.decode()}")

    def _entries(self) -> tuple:
        g = self.geo
        return (self.bufw, self.st, self.recs, self.status, 0, self.inw, 0, g.parts_w,
                g.rowsz_w, g.pristine_w, self.cand, self.outw, self.sess_flat,
                self.sessions.shape[1], self.upd, 0)

    def _warm(self) -> None:
        """Compile (or load) every jitted function now, with the exact argument types of
        the hot path, and leave the scratch state as it was."""
        self._plan = _jit.entry(_plan, self.st, self.recs, 0, self.plan, 0)
        self._batch = _jit.entry(_batch, *self._entries())
        self._count = _jit.entry(_count_entries, self.inw, 0, self.geo.rowsz_w)
        ctr = self.st.ctr.copy()
        self._plan(self.st, self.recs, 0, self.plan, 0)
        # An empty batch through the whole jitted step: only the counters move (the kernel
        # bumps its batch stamp).
        self._batch(*self._entries())
        self.st.ctr[:] = ctr

    def last_gseq(self) -> int:
        v = self.client.get("ctr")
        return 0 if v is None else int(np.frombuffer(v, np.int64)[C_LAST_GSEQ])

    def _call(self, sha: str, *args):
        """One EVALSHA, one round trip: packed into one buffer (one send, one TCP segment
        on loopback) and sent on a connection of the pool held for the service's life."""
        self.conn.send_packed_command([self._pack(("EVALSHA", sha, 0, *args))],
                                      check_health=False)
        return self.conn.read_response()

    def run_batch(self, n: int, now_ns: int | None = None) -> int:
        """Apply ``recs[:n]``: fetch, kernel, write back; returns the tally updates built
        (in ``upd[:m]``, to publish)."""
        if n <= 0:
            return 0
        t0 = time.perf_counter_ns()
        now = time.time_ns() if now_ns is None else now_ns
        self._plan(self.st, self.recs, n, self.plan, self.caps.sources)
        reply = self._call(self.fetch_sha, self.plan_bytes[:n * PLAN_DTYPE.itemsize].tobytes(), n,
                           *self.caps_args)
        rts = 1
        t1 = time.perf_counter_ns()
        g = self.geo
        nin = len(reply) // 8
        if nin > len(self.inw):
            self.inw = np.zeros(max(nin, 2 * len(self.inw)), np.uint64)
        self.inw[:nin] = np.frombuffer(reply, np.uint64)
        entries = self._count(self.inw, nin, g.rowsz_w) + n
        if entries > len(self.cand):
            self.cand = np.zeros((max(entries, 2 * len(self.cand)), 3), np.int64)
        need = entries * (2 + int(g.rowsz_w.max()))
        if need > len(self.outw):
            self.outw = np.zeros(max(need, 2 * len(self.outw)), np.uint64)
        m, nout, _ = self._batch(self.bufw, self.st, self.recs, self.status, n, self.inw, nin,
                                 g.parts_w, g.rowsz_w, g.pristine_w, self.cand, self.outw,
                                 self.sess_flat, self.sessions.shape[1], self.upd, now)
        t2 = time.perf_counter_ns()
        if nout:
            self._call(self.store_sha, self.outw[:nout].tobytes())
            rts += 1
        t3 = time.perf_counter_ns()
        self.round_trips += rts
        self.max_rt = max(self.max_rt, rts)
        self.events += n
        self.batches += 1
        self.max_n = max(self.max_n, n)
        self.t_fetch += t1 - t0
        self.t_apply += t2 - t1
        self.t_store += t3 - t2
        return m

    def stats(self) -> dict:
        return {"events": self.events, "batches": self.batches,
                "redis_round_trips": self.round_trips, "round_trips_per_batch": self.max_rt,
                "max_batch": self.max_n}

    def timing(self) -> dict:
        b = max(1, self.batches)
        return {"fetch_us_per_batch": self.t_fetch / b / 1e3,
                "apply_us_per_batch": self.t_apply / b / 1e3,
                "store_us_per_batch": self.t_store / b / 1e3}

    def scratch_is_pristine(self) -> bool:
        """Whether the scratch state is back to the empty state (a test's check that no
        batch wrote a row it had not fetched)."""
        lay = TallyLayout(self.caps)
        ref = np.zeros(lay.size, np.uint8)
        lay.init(ref)
        return bool(np.array_equal(ref, self.buf))

    def close(self) -> None:
        self.client.connection_pool.release(self.conn)


def _packer(conn):
    """hiredis's command packer (one bytes object), else redis-py's own."""
    try:
        import hiredis

        return hiredis.pack_command
    except ImportError:  # pragma: no cover (hiredis is a dependency of the perf tool)
        return lambda args: b"".join(bytes(x) for x in conn.pack_command(*args))


class Publisher:
    """Tally updates as multicast datagrams in exactly the fan-out's format."""

    def __init__(self, group: str, port: int, interface: str, ttl: int, max_datagram: int):
        self.sock = open_sender(group, port, interface, ttl)
        # (0: the interface's MTU, as the node's fan-out)
        self.per = rows_per_datagram(datagram_size(self.sock, max_datagram))
        self.seq = 0

    def send(self, upd: np.ndarray) -> None:
        mv = memoryview(upd.view(np.uint8))
        sz = UPDATE_DTYPE.itemsize
        for lo in range(0, len(upd), self.per):
            cnt = min(self.per, len(upd) - lo)
            self.seq += 1
            hdr = DGRAM_HEADER.pack(DGRAM_MAGIC, 0, self.seq, *dgram_word(cnt, DG_INCREMENTAL),
                                    time.time_ns())
            try:
                self.sock.send(hdr + mv[lo * sz:(lo + cnt) * sz])
            except OSError:
                pass  # a full socket buffer loses this datagram; receivers see the gap

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- Redis
class RedisServer:
    """A private ``redis-server`` (no persistence) on 127.0.0.1; stopped by :meth:`stop`
    or on leaving the ``with`` block."""

    def __init__(self, directory: str | Path, port: int | None = None, cpu: int | None = None,
                 timeout: float = 20.0):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian/Ubuntu: apt-get install "
                               "redis-server)")
        if port is None:
            from exposure.harness.localnode import free_port
            port = free_port()
        self.port = port
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / f"redis-{port}.log"
        cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", str(self.directory), "--protected-mode", "yes"]
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        with open(self.log, "wb") as log:  # the server's own log (stdout and stderr)
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=pre)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with status {self.proc.returncode}: "
                                   f"{log}")
            try:
                c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
                try:
                    if c.ping():
                        return
                finally:
                    c.close()
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING "
                                   f"within {timeout:.0f} s")
            time.sleep(0.05)

    def client(self):
        """A redis-py client of this server (raw bytes)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def load_state(client, caps: Capacities) -> State:
    """Every row Redis holds into a fresh state of ``caps`` (tests, checks, documents)."""
    buf, st = allocate(caps)
    geo = _Geometry(caps, buf, st)
    prefixes = {p.rstrip(":").encode(): t for t, p in enumerate(PREFIXES)}
    keys = [k for k in client.scan_iter(count=10_000) if k != b"meta"]
    for lo in range(0, len(keys), 10_000):
        chunk = keys[lo:lo + 10_000]
        pipe = client.pipeline(transaction=False)
        pipe.mget(chunk)
        (vals,) = pipe.execute()
        for key, val in zip(chunk, vals, strict=True):
            if val is None:
                continue
            head, _, ident = key.partition(b":")
            t = prefixes.get(head)
            if t is None:
                raise ValueError(f"unexpected key {key!r} in the two-tier state")
            i = int(ident) if ident else 0
            if not 0 <= i < geo.limits[t] or len(val) != ROW_SIZES[t]:
                raise ValueError(f"key {key!r}: id out of range or {len(val)} bytes")
            row = np.frombuffer(val, np.uint8)
            for q in range(_MAX_PARTS):
                base, stride, off, w = (int(x) for x in geo.parts[t, q])
                if w:
                    s = base + i * stride
                    buf[s:s + w] = row[off:off + w]
    return st


# ----------------------------------------------------------------------------- process
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exposure.bench.twotier", description=__doc__.split(
        "\n")[0])
    p.add_argument("--port", type=int, help="TCP port of the sessions (default: the config's)")
    p.add_argument("--group", help="multicast group (default: the config's)")
    p.add_argument("--mport", type=int, help="multicast port (default: the config's)")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--config", help="a node config (capacities, sessions, fan-out settings)")
    p.add_argument("--cpu", type=int, help="pin this process to one CPU")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--wait", choices=("spin", "block"), default="spin",
                   help="idle: spin on the sockets (like the node) or sleep in epoll")
    p.add_argument("--timing", action="store_true",
                   help="on exit also print per-batch time in fetch/apply/store to stderr")
    a = p.parse_args(argv)
    setup(label="twotier")
    if a.max_batch < 1:
        p.error("--max-batch must be at least 1")
    import redis

    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    ring = ingest = pub = svc = None
    rc = 0
    try:
        cfg = load_config(a.config)
        port = a.port or cfg.ingest_port
        group = a.group or cfg.group
        mport = a.mport or cfg.fanout_port
        if a.cpu is not None:
            os.sched_setaffinity(0, {a.cpu})
        client = redis.Redis(host="127.0.0.1", port=a.redis_port)
        svc = TwoTier(client, cfg.caps, a.max_batch, cfg.max_sessions)
        ring = Ring.create(f"/exposure.twotier.{os.getpid()}.ring", 65536, EVENT_SIZE)
        pub = Publisher(group, mport, cfg.interface, cfg.ttl, cfg.max_datagram)
        pop = _jit.entry(ring_pop, ring.ctrl, ring.slots, svc.words, a.max_batch)
        # Ingest's frame scanner compiles (or loads) in its constructor, after it listens: a
        # throwaway one on an ephemeral port does that now, before the real port opens.
        IngestStage(cfg.ingest_host, 0, svc.sessions, ring, 1, cfg.max_sessions).close()
        next_gseq = svc.last_gseq() + 1
        gc.collect()
        gc.freeze()
        gc.disable()
        # Last: the listening socket (readiness for the perf tool) once everything is ready.
        ingest = IngestStage(cfg.ingest_host, port, svc.sessions, ring, next_gseq,
                             cfg.max_sessions, cfg.ack_interval_us)
        tail, head = ring.ctrl[RL.W_TAIL:], ring.ctrl[RL.W_HEAD:]
        block = a.wait == "block"
        while not stop:
            work = ingest.poll()
            if tail[0] != head[0]:
                n = pop(ring.ctrl, ring.slots, svc.words, a.max_batch)
                if n:
                    m = svc.run_batch(n)
                    if m:
                        pub.send(svc.upd[:m])
                    work += n
            ingest.after()
            if not work and block:
                ingest.wait_io(0.001)
    except (redis.exceptions.ConnectionError, ConfigError, OSError) as e:
        print(f"twotier: {e}", file=sys.stderr)
        rc = 2
    except Exception:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        gc.enable()
        for o in (ingest, pub):
            if o is not None:
                o.close()
        if ring is not None:
            ring.close()
        if svc is not None:
            svc.close()
            print(json.dumps(svc.stats()), flush=True)
            if a.timing:
                print(json.dumps(svc.timing()), file=sys.stderr, flush=True)
        else:
            print(json.dumps({"events": 0, "batches": 0, "redis_round_trips": 0,
                              "round_trips_per_batch": 0, "max_batch": 0}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
