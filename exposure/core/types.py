"""Record dtypes, type codes, side codes, reject reasons and flag bits.

Everything that crosses a boundary (the wire, the rings, the journal) is an array of
:data:`EVENT_DTYPE` records. Every structure of the tally state is described here too, so
that one module answers "what is at offset N".

The event record (128 bytes, little-endian, two cache lines)
==============================================================

::

    off  size  type  field       meaning
    ---  ----  ----  ----------  ------------------------------------------------------
      0     8  u8    gseq        global sequence number, assigned by the node (replay: line no.)
      8     8  u8    sseq        the sending session's sequence number
     16     8  i8    send_ns     client send timestamp, CLOCK_REALTIME nanoseconds
     24     8  i8    recv_ns     node receive timestamp, CLOCK_REALTIME nanoseconds
     32     4  u4    session     sending session id
     36     4  u4    source      order-id namespace (SPEC: source)
     40     4  u4    account
     44     4  u4    instrument
     48     8  u8    order_id
     56     8  i8    qty         order / fill quantity; position: signed quantity;
                                 instrument, fx: the currency (SPEC section 7; 0 = base)
     64     8  f8    price       fx: the rate (base-currency value of one unit)
     72     8  f8    x0          instrument: multiplier   | limit: gross
     80     8  f8    x1          instrument: margin_rate  | limit: net
     88     8  f8    x2          instrument: beta         | limit: margin
     96     8  f8    x3                                   | limit: loss
    104     4  u4    sector      instrument: sector
    108     1  u1    type        T_* below (10 bust, 11 roll: SPEC section 6; 12 fx: 7)
    109     1  u1    side        SIDE_* below
    110     1  u1    reject      a reason found before the kernel (JSON kind errors), else 0
    111     1  u1    flags       F_* below
    112     4  u4    epoch       primary's epoch when sequenced (failover)
    116     4  u4    crc         checksum slot for transports that fill it, else 0
    120     8  i8    reserved    0

Why 128 and not 64 bytes: with full-width fields an order event needs order_id, qty and
price (24 bytes), account, instrument and source (12), type and side (2), and the five
bookkeeping fields the pipeline needs (global seq, session seq, two timestamps and the
session id: 36) - 74 bytes; a ``limit`` event needs four doubles. Fitting 64 would mean a
32-bit session sequence, 16-bit accounts and truncated timestamps, each a limit that a fund
would hit or a bug in wait. 128 is the next cache-line multiple: records never straddle a
line, ring slots stay power-of-two, and the spare room holds the epoch and a checksum.

Unused fields of an event type are ignored (kept as sent). Unknown type codes are
rejected by the kernel as ``bad_type``; the kernel validates every field itself, so a
record from any client is safe to apply.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EVENT_DTYPE",
    "EVENT_SIZE",
    "TYPE_NAMES",
    "TYPE_CODES",
    "SIDE_NAMES",
    "SIDE_CODES",
    "REASONS",
    "REASON_CODES",
    "NODE_REASONS",
    "CELL_DTYPE",
    "CELLIDX_DTYPE",
    "ORDER_DTYPE",
    "INSTRUMENT_DTYPE",
    "PUBROW_DTYPE",
    "UPDATE_DTYPE",
    "INSTPUB_DTYPE",
    "SECPUB_DTYPE",
    "POSPUB_DTYPE",
    "CTRPUB_DTYPE",
    "ACCOUNT_ROW_DTYPE",
    "INSTRUMENT_ROW_DTYPE",
    "SECTOR_ROW_DTYPE",
    "POSITION_ROW_DTYPE",
    "LIMITS_ROW_DTYPE",
    "ROW_DTYPES",
    "ROW_KINDS",
    "ACCOUNT_TALLIES",
    "FUND_TALLIES",
    "N_CURRENCIES",
]

# --------------------------------------------------------------------------- event record
EVENT_DTYPE = np.dtype(
    {
        "names": [
            "gseq", "sseq", "send_ns", "recv_ns", "session", "source", "account",
            "instrument", "order_id", "qty", "price", "x0", "x1", "x2", "x3", "sector",
            "type", "side", "reject", "flags", "epoch", "crc", "reserved",
        ],
        "formats": [
            "<u8", "<u8", "<i8", "<i8", "<u4", "<u4", "<u4",
            "<u4", "<u8", "<i8", "<f8", "<f8", "<f8", "<f8", "<f8", "<u4",
            "u1", "u1", "u1", "u1", "<u4", "<u4", "<i8",
        ],
        "offsets": [
            0, 8, 16, 24, 32, 36, 40,
            44, 48, 56, 64, 72, 80, 88, 96, 104,
            108, 109, 110, 111, 112, 116, 120,
        ],
        "itemsize": 128,
    },
    align=True,
)
EVENT_SIZE = EVENT_DTYPE.itemsize
EVENT_WORDS = EVENT_SIZE // 8
# Word indices of the record seen as EVENT_WORDS little-endian u64 words: the hot paths that
# only stamp or route records (ingest) work on words, never on the 23-field structured
# dtype (numpy copies and indexes structured arrays field by field: microseconds each).
W_GSEQ = EVENT_DTYPE.fields["gseq"][1] // 8
W_SSEQ = EVENT_DTYPE.fields["sseq"][1] // 8
W_SEND_NS = EVENT_DTYPE.fields["send_ns"][1] // 8
W_RECV_NS = EVENT_DTYPE.fields["recv_ns"][1] // 8
W_ORDER_ID = EVENT_DTYPE.fields["order_id"][1] // 8
W_SESSION = EVENT_DTYPE.fields["session"][1] // 8   # low half; source is the high half
W_EPOCH = EVENT_DTYPE.fields["epoch"][1] // 8       # low half; crc is the high half
W_ACCOUNT = EVENT_DTYPE.fields["account"][1] // 8   # low half; instrument is the high half
W_TYPE = EVENT_DTYPE.fields["type"][1] // 8         # the word of sector, type, side, reject
TYPE_SHIFT = 8 * (EVENT_DTYPE.fields["type"][1] % 8)      # bit offsets in that word
REJECT_SHIFT = 8 * (EVENT_DTYPE.fields["reject"][1] % 8)
assert EVENT_DTYPE.fields["source"][1] == 8 * W_SESSION + 4
assert W_TYPE == EVENT_DTYPE.fields["reject"][1] // 8

# Event type codes (record field ``type``). 0 is never a valid event.
T_INSTRUMENT = 1
T_LIMIT = 2
T_POSITION = 3
T_MARK = 4
T_NEW = 5
T_REPLACE = 6
T_CANCEL = 7
T_DONE = 8
T_FILL = 9
T_BUST = 10   # SPEC section 6: a trade taken back (fields of the trade, as a fill's)
T_ROLL = 11   # SPEC section 6: the start of a new trading day (no fields)
T_FX = 12     # SPEC section 7: a currency's rate (currency in ``qty``, rate in ``price``)
T_MAX = 12

TYPE_NAMES = {
    T_INSTRUMENT: "instrument", T_LIMIT: "limit", T_POSITION: "position", T_MARK: "mark",
    T_NEW: "new", T_REPLACE: "replace", T_CANCEL: "cancel", T_DONE: "done", T_FILL: "fill",
    T_BUST: "bust", T_ROLL: "roll", T_FX: "fx",
}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}

# Side codes (record field ``side``). buy counts +1, sell and short count -1.
SIDE_BUY = 1
SIDE_SELL = 2
SIDE_SHORT = 3
SIDE_NAMES = {SIDE_BUY: "buy", SIDE_SELL: "sell", SIDE_SHORT: "short"}
SIDE_CODES = {v: k for k, v in SIDE_NAMES.items()}

# Flag bits (record field ``flags``).
F_HAS_PRICE = 1  # position: a price was given (else the SOD price is the reference price)

# Reject reasons, in the SPEC's precedence. Code 0 means accepted.
R_BAD_TYPE = 1
R_BAD_FIELD = 2
R_OUT_OF_RANGE = 3
R_DUPLICATE_ORDER = 4
R_UNKNOWN_ORDER = 5
R_FILL_MISMATCH = 6
R_CAPACITY = 7
# A cluster's reason (SPEC section 5): an event that its partition does not own. Ingest
# marks it in the record's ``reject`` byte (exposure.core.partition); the kernel reports it
# after rules 1-3 (out_of_range) and before rule 4, so its code is not its precedence.
R_WRONG_PARTITION = 8
N_REASONS = 9  # array size for per-reason counters (index 0 unused)
REASONS = {
    R_BAD_TYPE: "bad_type", R_BAD_FIELD: "bad_field", R_OUT_OF_RANGE: "out_of_range",
    R_DUPLICATE_ORDER: "duplicate_order", R_UNKNOWN_ORDER: "unknown_order",
    R_FILL_MISMATCH: "fill_mismatch", R_CAPACITY: "capacity",
    R_WRONG_PARTITION: "wrong_partition",
}
REASON_CODES = {v: k for k, v in REASONS.items()}
# A node's own reason, outside the SPEC (replay has no sessions): a record of a known type
# that its session is not entitled to send (exposure.net.sessions). Ingest marks it in the
# record's ``reject`` byte; the kernel applies nothing and counts it only in
# ``C_UNAUTHORIZED`` and the session's counters, never in the document's counts.
R_UNAUTHORIZED = 9
NODE_REASONS = {**REASONS, R_UNAUTHORIZED: "unauthorized"}

# Per-event status written by the kernel: 0 accepted, 1..7 a reject reason, or the
# accepted-late-fill bit.
S_ACCEPTED = 0
S_LATE_FILL = 0x80

# Domain limits from the SPEC.
MAX_QTY = 10**12
MAX_ORDER_ID = 2**63  # exclusive
# SPEC section 7: currency ids 0..255, 0 the base currency (a fixed capacity).
N_CURRENCIES = 256

# --------------------------------------------------------------------------- tally state
# A position cell: one (account, instrument) pair, one cache line. ``dirty`` is not 0 while
# the cell is listed in the batch's ``cchanged`` (published to desks after the batch): 1 when
# only revalued (a mark, an fx, an instrument change: no feed row), 2 when its quantities or
# P&L terms moved (the feed's position row goes out).
CELL_DTYPE = np.dtype(
    {
        "names": ["pos", "open_buy", "open_sell", "sod_qty", "sod_price", "flow",
                  "account", "instrument", "next", "dirty"],
        "formats": ["<i8", "<i8", "<i8", "<i8", "<f8", "<f8", "<i4", "<i4", "<i4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 52, 56, 60],
        "itemsize": 64,
    },
    align=True,
)

# A live-order slot of the open-addressing table; ``cell`` < 0 marks an empty slot.
ORDER_DTYPE = np.dtype(
    {
        "names": ["order_id", "open", "filled", "cell", "source", "side", "_pad"],
        "formats": ["<u8", "<i8", "<i8", "<i4", "<u2", "u1", "u1"],
        "offsets": [0, 8, 16, 24, 28, 30, 31],
        "itemsize": 32,
    },
    align=True,
)

# An entry of the cell index (open addressing): key = account * instruments + instrument,
# -1 when empty; id = the cell's row in the cell table. Key and id share a line.
CELLIDX_DTYPE = np.dtype(
    {
        "names": ["key", "id", "_pad"],
        "formats": ["<i8", "<i4", "<i4"],
        "offsets": [0, 8, 12],
        "itemsize": 16,
    },
    align=True,
)

# Reference data and fund aggregates of one instrument. ``dirty`` is 1 while the instrument
# is listed in the batch's ``ichanged`` (the kernel clears it at the next batch); ``gseq`` is
# the event that last moved the instrument's row (a feed row's tag). ``currency`` (SPEC
# section 7; 0 = base) is the currency its prices are quoted in: the instrument's value is
# ref_price x multiplier x the state's ``rate[currency]``. ``cnext`` links the instruments
# of one currency other than the base (heads: the state's ``cur_head``, the links back:
# its ``cprev``, so that an instrument leaves a chain in O(1); -1 ends a chain),
# which an ``fx`` event walks.
INSTRUMENT_DTYPE = np.dtype(
    {
        "names": ["ref_price", "multiplier", "margin_rate", "beta", "fund_pos", "abs_pos",
                  "open_buy", "open_sell", "head", "sector", "marked", "dirty", "gseq",
                  "currency", "cnext"],
        "formats": ["<f8", "<f8", "<f8", "<f8", "<i8", "<i8", "<i8", "<i8",
                    "<i4", "<i4", "<i4", "<i4", "<u8", "<i4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 68, 72, 76, 80, 88, 92],
        "itemsize": 96,
    },
    align=True,
)

# A published row (one per account, plus the fund's at index ``accounts``): what desks
# and the fan-out read. Written by the compute stage after each batch under the row's own
# version (odd while it is written). Two cache lines.
PUBROW_DTYPE = np.dtype(
    {
        "names": ["ver", "gseq", "long_mv", "short_mv", "gross", "net", "open_buy_mv",
                  "open_sell_mv", "worst_gross", "margin", "beta_net", "pnl", "live_orders",
                  "breach", "net_long_mv", "net_short_mv"],
        "formats": ["<u8", "<u8"] + ["<f8"] * 10 + ["<i8", "<i8", "<f8", "<f8"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120],
        "itemsize": 128,
    },
    align=True,
)

# ----------------------------------------------------------------------------- published rows
# What desks read without waiting (row seqlocks: ``ver`` odd while the row is written).
# Instrument rows: reference data and the fund's aggregates of one instrument; ``currency``
# (SPEC section 7) and ``rate``, its rate when the row was published (net_mv and gross_mv
# are in the base currency, ref_price in the instrument's own).
INSTPUB_DTYPE = np.dtype(
    {
        "names": ["ver", "gseq", "fund_pos", "ref_price", "open_buy", "open_sell", "net_mv",
                  "gross_mv", "multiplier", "margin_rate", "beta", "sector", "marked", "rate",
                  "currency", "_pad"],
        "formats": ["<u8", "<u8", "<i8", "<f8", "<i8", "<i8", "<f8", "<f8", "<f8", "<f8",
                    "<f8", "<i4", "<i4", "<f8", "<i4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 92, 96, 104, 108],
        "itemsize": 112,
    },
    align=True,
)
# Sector rows.
SECPUB_DTYPE = np.dtype(
    {"names": ["ver", "gseq", "net_mv", "gross_mv"],
     "formats": ["<u8", "<u8", "<f8", "<f8"], "offsets": [0, 8, 16, 24], "itemsize": 32},
    align=True,
)
# Position rows, one per cell (same index as the cell table); ``gseq`` is the last event of
# the batch that published the row. ``pnl`` and ``mv`` (the cell's pos x ref_price x
# multiplier x rate, base currency) move with every mark; ``sod_qty``, ``sod_price`` and
# ``flow`` (the cell's own, the price-independent terms of its P&L) are what the feed's
# position row carries instead (tally layout 5: the row grew from 64 to 96 bytes).
POSPUB_DTYPE = np.dtype(
    {
        "names": ["ver", "gseq", "account", "instrument", "pos", "open_buy", "open_sell",
                  "pnl", "mv", "sod_qty", "sod_price", "flow", "_pad"],
        "formats": ["<u8", "<u8", "<i4", "<i4", "<i8", "<i8", "<i8", "<f8", "<f8", "<i8",
                    "<f8", "<f8", "<u8"],
        "offsets": [0, 8, 16, 20, 24, 32, 40, 48, 56, 64, 72, 80, 88],
        "itemsize": 96,
    },
    align=True,
)
# The counters row: a copy of ``ctr`` as of the end of a batch (the document's counts).
CTRPUB_DTYPE = np.dtype(
    {"names": ["ver", "gseq", "ctr"], "formats": ["<u8", "<u8", ("<i8", 32)],
     "offsets": [0, 8, 16], "itemsize": 272},
    align=True,
)

# ----------------------------------------------------------------------------- feed rows
# A row of the multicast feed (and of the fan-out ring and of a recovery snapshot): 160
# bytes, a 56-byte head common to every kind, then the kind's body. docs/feed.md is the
# normative table (a test decodes datagrams from it). Every row is the state of one account,
# the fund, one instrument or one sector after the batch that last moved it, tagged with
# that event (gseq, session, sseq and its client send time ``send_ns``), ingest's receive
# time (``recv_ns``) and compute's time (``compute_ns``), all CLOCK_REALTIME ns. Rows of a
# refresh or a snapshot carry no event tag (session 0xFFFFFFFF, sseq and times 0).
ROW_ACCOUNT = 1
ROW_FUND = 2
ROW_INSTRUMENT = 3
ROW_SECTOR = 4
ROW_POSITION = 5  # feed version 4: one per position cell (id = the cell's index)
ROW_LIMITS = 6    # feed version 4: an account's limits (id = the account)
ROW_KINDS = {ROW_ACCOUNT: "account", ROW_FUND: "fund", ROW_INSTRUMENT: "instrument",
             ROW_SECTOR: "sector", ROW_POSITION: "position", ROW_LIMITS: "limits"}
ROW_SIZE = 160
# The largest feed datagram (``[fanout] max_datagram``; under UDP's 65,507 bytes on IPv4).
MAX_DATAGRAM = 65000
NO_SESSION = 0xFFFFFFFF
_HEAD_NAMES = ["kind", "breach", "breach_prev", "flags", "id", "epoch", "session", "gseq",
               "sseq", "send_ns", "recv_ns", "compute_ns"]
_HEAD_FORMATS = ["u1", "u1", "u1", "u1", "<i4", "<u4", "<u4", "<u8", "<u8", "<i8", "<i8",
                 "<i8"]
_HEAD_OFFSETS = [0, 1, 2, 3, 4, 8, 12, 16, 24, 32, 40, 48]


def _row(idname: str, body: list[tuple[str, str, int]]) -> np.dtype:
    names = [idname if n == "id" else n for n in _HEAD_NAMES] + [b[0] for b in body]
    return np.dtype({"names": names, "formats": _HEAD_FORMATS + [b[1] for b in body],
                     "offsets": _HEAD_OFFSETS + [b[2] for b in body], "itemsize": ROW_SIZE},
                    align=True)


# Account rows (kind 1) and the fund row (kind 2, account -1; the only one with net_long_mv
# and net_short_mv). ``breach`` is the SPEC's bits now, ``breach_prev`` those of the
# account's previous published state: a breach that starts or ends shows as a difference.
UPDATE_DTYPE = _row("account", [
    ("live_orders", "<i8", 56), ("long_mv", "<f8", 64), ("short_mv", "<f8", 72),
    ("gross", "<f8", 80), ("net", "<f8", 88), ("open_buy_mv", "<f8", 96),
    ("open_sell_mv", "<f8", 104), ("worst_gross", "<f8", 112), ("margin", "<f8", 120),
    ("beta_net", "<f8", 128), ("pnl", "<f8", 136), ("net_long_mv", "<f8", 144),
    ("net_short_mv", "<f8", 152)])
ACCOUNT_ROW_DTYPE = UPDATE_DTYPE
# Instrument rows (kind 3): net_mv = fund_pos x v; gross_mv = the sum over accounts of
# abs(pos) x v, where v = ref_price x multiplier x rate (SPEC section 7: in the base
# currency); ``currency`` is the instrument's and ``rate`` that currency's rate.
INSTRUMENT_ROW_DTYPE = _row("instrument", [
    ("fund_pos", "<i8", 56), ("ref_price", "<f8", 64), ("open_buy", "<i8", 72),
    ("open_sell", "<i8", 80), ("net_mv", "<f8", 88), ("gross_mv", "<f8", 96),
    ("multiplier", "<f8", 104), ("margin_rate", "<f8", 112), ("beta", "<f8", 120),
    ("sector", "<i4", 128), ("marked", "<i4", 132), ("rate", "<f8", 136),
    ("currency", "<i8", 144)])  # (a whole word: the subscriber's merge compares words)
# Sector rows (kind 4).
SECTOR_ROW_DTYPE = _row("sector", [("net_mv", "<f8", 64), ("gross_mv", "<f8", 72)])
# Position rows (kind 5, feed version 4): one per position cell of the node, ``cell`` its
# index in the node's cell table (a roll compacts the table: every id it moves or frees is
# sent again, a freed one with account -1). Only what does not move with prices (a mark
# sends no position rows): the quantities and the cell's price-independent P&L terms; a
# receiver derives pnl and mv from the instrument row (publish.position_values).
POSITION_ROW_DTYPE = _row("cell", [
    ("account", "<i4", 56), ("instrument", "<i4", 60), ("pos", "<i8", 64),
    ("open_buy", "<i8", 72), ("open_sell", "<i8", 80), ("sod_qty", "<i8", 88),
    ("sod_price", "<f8", 96), ("flow", "<f8", 104)])
# Limits rows (kind 6, feed version 4): an account's four limits (0 = off; base currency).
LIMITS_ROW_DTYPE = _row("account", [
    ("gross_limit", "<f8", 56), ("net_limit", "<f8", 64), ("margin_limit", "<f8", 72),
    ("loss_limit", "<f8", 80)])
ROW_DTYPES = {ROW_ACCOUNT: UPDATE_DTYPE, ROW_FUND: UPDATE_DTYPE,
              ROW_INSTRUMENT: INSTRUMENT_ROW_DTYPE, ROW_SECTOR: SECTOR_ROW_DTYPE,
              ROW_POSITION: POSITION_ROW_DTYPE, ROW_LIMITS: LIMITS_ROW_DTYPE}

# Columns of the per-account tally array (each kept as a compensated sum: value + error).
K_LONG = 0
K_SHORT = 1
K_OPEN_BUY = 2
K_OPEN_SELL = 3
K_WORST = 4
K_MARGIN = 5
K_BETA = 6
K_PNL = 7
N_CELL_TALLIES = 8
# The fund keeps the same eight plus two instrument-level sums.
K_NET_LONG = 8
K_NET_SHORT = 9
N_FUND_TALLIES = 10
# Sector columns.
K_SEC_NET = 0
K_SEC_GROSS = 1

ACCOUNT_TALLIES = ("long_mv", "short_mv", "open_buy_mv", "open_sell_mv", "worst_gross",
                   "margin", "beta_net", "pnl")
FUND_TALLIES = ACCOUNT_TALLIES + ("net_long_mv", "net_short_mv")

# Limit columns and breach bits.
L_GROSS = 0
L_NET = 1
L_MARGIN = 2
L_LOSS = 3
B_GROSS = 1
B_NET = 2
B_MARGIN = 4
B_WORST = 8
B_LOSS = 16

# Counter slots of the state's ``ctr`` array.
C_ACCEPTED = 0
C_REJECTED = 1
C_LATE_FILLS = 2
C_LIVE = 3            # live orders, fund-wide
C_CELLS = 4           # position cells in use
C_LAST_GSEQ = 5       # gseq of the last event applied
C_EVENTS = 6          # records applied (accepted, rejected and unauthorized)
C_STAMP = 7           # batch stamp (incremented per batch; marks changed accounts)
C_NCHANGED = 8        # accounts in ``changed`` after the last batch
C_MAX_ORDERS = 9      # capacity: live orders (set by the layout)
C_MAX_SOURCES = 10    # capacity: sources (set by the layout)
C_UNAUTHORIZED = 11   # records a session was not entitled to send (types.R_UNAUTHORIZED)
C_NICHANGED = 12      # instruments in ``ichanged`` after the last batch
C_NSCHANGED = 13      # sectors in ``schanged`` after the last batch
C_NCCHANGED = 14      # cells in ``cchanged`` after the last batch
C_REJECTS = 16        # C_REJECTS + reason code: per-reason reject counts (16..24)
# Events every partition of a cluster sees (mark, instrument, fx), which the cluster counts
# once (SPEC section 5): accepted, and rejected as bad_field or out_of_range (the only
# reasons such an event can have). They are also in the counts above.
C_BCAST_ACCEPTED = 25
C_BCAST_BAD_FIELD = 26
C_BCAST_OUT_OF_RANGE = 27
# SPEC section 6: accepted busts and rolls (also in C_ACCEPTED; a roll is a broadcast event
# too, in C_BCAST_*: a cluster counts it once).
C_BUSTS = 28
C_ROLLS = 29
# The last accepted roll: its trading date (YYYYMMDD, the record's ``qty``; set only by a
# dated roll) and its gseq. The node's own record of which day it has closed (the
# scheduled roll reads it: exposure.node.stages.scheduler); not in the document.
C_ROLL_DATE = 30
C_ROLL_GSEQ = 31
N_COUNTERS = 32
