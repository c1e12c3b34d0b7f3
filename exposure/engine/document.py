"""The SPEC's JSON tally document (section 4): build it from a state, compare two of them.

:func:`document` reads the kernel's incrementally kept tallies. :func:`document_from_cells`
recomputes every tally from scratch from the cells and the reference data, with numpy; it
shares no arithmetic with the kernel and is what the invariant checks compare against.
"""

from __future__ import annotations

import math

import numpy as np

from exposure.core.types import (
    B_GROSS,
    B_LOSS,
    B_MARGIN,
    B_NET,
    B_WORST,
    C_ACCEPTED,
    C_BUSTS,
    C_CELLS,
    C_LATE_FILLS,
    C_LIVE,
    C_REJECTED,
    C_REJECTS,
    C_ROLLS,
    K_BETA,
    K_LONG,
    K_MARGIN,
    K_NET_LONG,
    K_NET_SHORT,
    K_OPEN_BUY,
    K_OPEN_SELL,
    K_PNL,
    K_SEC_GROSS,
    K_SEC_NET,
    K_SHORT,
    K_WORST,
    L_GROSS,
    L_LOSS,
    L_MARGIN,
    L_NET,
    REASONS,
)
from exposure.shm.tally_layout import State

__all__ = ["document", "document_from_cells", "compare_documents"]

ACCOUNT_KEYS = ["long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
                "worst_gross", "margin", "beta_net", "pnl"]
ACCOUNT_INT_KEYS = ["live_orders", "breach"]
FUND_KEYS = ACCOUNT_KEYS + ["live_orders", "net_long_mv", "net_short_mv", "crossing"]


def _breach(vals: np.ndarray, lim: np.ndarray) -> np.ndarray:
    """Vectorised SPEC breach bits; vals columns as ACCOUNT_KEYS."""
    g, n, m, w, p = vals[:, 2], vals[:, 3], vals[:, 7], vals[:, 6], vals[:, 9]
    lg, ln, lm, ll = lim[:, L_GROSS], lim[:, L_NET], lim[:, L_MARGIN], lim[:, L_LOSS]
    b = np.zeros(len(vals), np.int64)
    b |= np.where((lg > 0) & (g > lg), B_GROSS, 0)
    b |= np.where((ln > 0) & (np.abs(n) > ln), B_NET, 0)
    b |= np.where((lm > 0) & (m > lm), B_MARGIN, 0)
    b |= np.where((lg > 0) & (w > lg), B_WORST, 0)
    b |= np.where((ll > 0) & (p < -ll), B_LOSS, 0)
    return b


def _account_matrix(t: np.ndarray) -> np.ndarray:
    """[n, 8] cell-tally columns (types.K_*) -> [n, 10] in ACCOUNT_KEYS order."""
    lng, sht = t[:, K_LONG], t[:, K_SHORT]
    return np.column_stack([lng, sht, lng + sht, lng - sht, t[:, K_OPEN_BUY], t[:, K_OPEN_SELL],
                            t[:, K_WORST], t[:, K_MARGIN], t[:, K_BETA], t[:, K_PNL]])


def _counts(st: State) -> dict:
    rej = {name: int(st.ctr[C_REJECTS + code]) for code, name in REASONS.items()
           if st.ctr[C_REJECTS + code]}
    return {"accepted": int(st.ctr[C_ACCEPTED]), "rejected": int(st.ctr[C_REJECTED]),
            "late_fills": int(st.ctr[C_LATE_FILLS]), "busts": int(st.ctr[C_BUSTS]),
            "rolls": int(st.ctr[C_ROLLS]), "rejects": rej}


def _rows(ids: np.ndarray, idname: str, cols: dict[str, np.ndarray]) -> list[dict]:
    keys = [idname, *cols]
    columns = [ids.tolist(), *(c.tolist() for c in cols.values())]
    return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]


def _assemble(st: State, acc_t: np.ndarray, fund_t: np.ndarray, nl: float, ns: float,
              sec: np.ndarray, cell_pnl: np.ndarray) -> dict:
    """Common shape of both builders. acc_t [A, 8], fund_t [8], sec [S, 2]."""
    n = int(st.ctr[C_CELLS])
    cells = st.cells[:n]
    inst = st.inst
    # Rows: every account, instrument and sector the day touched, plus any nonzero one.
    acc_ids = np.unique(np.concatenate([cells["account"].astype(np.int64),
                                        np.flatnonzero(st.acc_live)]))
    vals = _account_matrix(acc_t[acc_ids])
    breach = _breach(vals, st.acc_lim[acc_ids])
    accounts = _rows(acc_ids, "account", {
        **{k: vals[:, j] for j, k in enumerate(ACCOUNT_KEYS)},
        "live_orders": st.acc_live[acc_ids], "breach": breach})

    fv = _account_matrix(fund_t[None, :])[0]
    fund = {k: float(fv[j]) for j, k in enumerate(ACCOUNT_KEYS)}
    fund["live_orders"] = int(st.ctr[C_LIVE])
    fund["net_long_mv"] = float(nl)
    fund["net_short_mv"] = float(ns)
    fund["crossing"] = float(fv[2] - (nl + ns))

    inst_ids = np.flatnonzero((inst["head"] >= 0) | (inst["ref_price"] != 0))
    ins = inst[inst_ids]
    instruments = _rows(inst_ids, "instrument", {
        "ref_price": ins["ref_price"], "fund_pos": ins["fund_pos"],
        "open_buy": ins["open_buy"], "open_sell": ins["open_sell"]})

    sec_used = np.zeros(len(sec), bool)
    sec_used[inst["sector"][inst["head"] >= 0]] = True
    sec_ids = np.flatnonzero(sec_used | (sec[:, 0] != 0) | (sec[:, 1] != 0))
    sectors = _rows(sec_ids, "sector", {"net_mv": sec[sec_ids, 0], "gross_mv": sec[sec_ids, 1]})

    order = np.lexsort((cells["instrument"], cells["account"]))
    c = cells[order]
    positions = [
        {"account": a, "instrument": i, "pos": p, "open_buy": ob, "open_sell": os_, "pnl": pl}
        for a, i, p, ob, os_, pl in zip(
            c["account"].tolist(), c["instrument"].tolist(), c["pos"].tolist(),
            c["open_buy"].tolist(), c["open_sell"].tolist(), cell_pnl[order].tolist(),
            strict=True)
    ]
    return {"accounts": accounts, "fund": fund, "instruments": instruments,
            "sectors": sectors, "positions": positions, "counts": _counts(st)}


def _cell_pnl(st: State) -> np.ndarray:
    n = int(st.ctr[C_CELLS])
    c = st.cells[:n]
    ins = st.inst[c["instrument"]]
    rate = st.rate[ins["currency"]]  # SPEC section 7: the day's P&L at the current rate
    return ins["multiplier"] * rate * (c["pos"] * ins["ref_price"]
                                       - c["sod_qty"] * c["sod_price"] - c["flow"])


def document(st: State) -> dict:
    """The SPEC document from the kernel's incrementally kept tallies."""
    acc_t = st.acc[:, :, 0] + st.acc[:, :, 1]
    fund = st.fund[:, 0] + st.fund[:, 1]
    sec = st.sec[:, :, 0] + st.sec[:, :, 1]
    return _assemble(st, acc_t, fund[:8], fund[K_NET_LONG], fund[K_NET_SHORT],
                     sec[:, [K_SEC_NET, K_SEC_GROSS]], _cell_pnl(st))


def _group_fsum(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Exact (math.fsum) sums of ``values`` grouped by integer ``keys`` < size."""
    out = np.zeros(size)
    if len(keys) == 0:
        return out
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    cut = np.flatnonzero(np.diff(k)) + 1
    for lo, hi in zip(np.r_[0, cut].tolist(), np.r_[cut, len(k)].tolist(), strict=True):
        out[k[lo]] = math.fsum(v[lo:hi].tolist())
    return out


def document_from_cells(st: State) -> dict:
    """The SPEC document recomputed from scratch from the cells and reference data.

    Every sum is exact (``math.fsum``), so this is the SPEC's real-number value rounded once:
    the yardstick for the kernel's compensated incremental sums.
    """
    n = int(st.ctr[C_CELLS])
    c = st.cells[:n]
    A, S = st.acc.shape[0], st.sec.shape[0]
    ins = st.inst[c["instrument"]]
    v = ins["ref_price"] * ins["multiplier"] * st.rate[ins["currency"]]  # base currency
    pos = c["pos"].astype(np.float64)
    ob, os_ = c["open_buy"], c["open_sell"]
    worst = np.maximum(np.abs(c["pos"] + ob), np.abs(c["pos"] - os_)).astype(np.float64)
    pnl = _cell_pnl(st)
    terms = np.column_stack([np.maximum(pos, 0) * v, np.maximum(-pos, 0) * v, ob * v, os_ * v,
                             worst * v, np.abs(pos) * v * ins["margin_rate"],
                             pos * v * ins["beta"], pnl])
    acc_keys = c["account"].astype(np.int64)
    acc_t = np.column_stack([_group_fsum(acc_keys, terms[:, k], A) for k in range(8)])
    fund = np.array([math.fsum(terms[:, k].tolist()) for k in range(8)])
    inst = st.inst
    iv = inst["ref_price"] * inst["multiplier"] * st.rate[inst["currency"]]
    fp = np.zeros(len(inst), np.int64)
    ap = np.zeros(len(inst), np.int64)
    np.add.at(fp, c["instrument"], c["pos"])
    np.add.at(ap, c["instrument"], np.abs(c["pos"]))
    nl = math.fsum((np.maximum(fp, 0) * iv).tolist())
    ns = math.fsum((np.maximum(-fp, 0) * iv).tolist())
    sec_keys = inst["sector"].astype(np.int64)
    sec = np.column_stack([_group_fsum(sec_keys, fp * iv, S), _group_fsum(sec_keys, ap * iv, S)])
    return _assemble(st, acc_t, fund, nl, ns, sec, pnl)


# ----------------------------------------------------------------------------- comparison
_LISTS = {"accounts": ("account",), "instruments": ("instrument",), "sectors": ("sector",),
          "positions": ("account", "instrument")}


def _keyed(rows: list[dict], idk: tuple[str, ...]) -> dict:
    return {tuple(r[k] for k in idk): r for r in rows}


def compare_documents(got: dict, want: dict, limit: int = 20, rel: float = 0.0) -> list[str]:
    """Differences between two tally documents under the SPEC's rules (empty = equal).

    Floats compare with a tolerance of 1e-6 plus 1e-9 times the fund's gross (of ``want``),
    integers exactly; a missing row reads as zeros. ``rel`` adds ``rel * |want|`` to the
    tolerance of each value: two correct float implementations can differ by an ulp of a
    value that is large next to the fund's gross (say, open orders of 10**11 shares on a
    flat book), which the SPEC's rule alone does not absorb.
    """
    tol0 = 1e-6 + 1e-9 * abs(float(want.get("fund", {}).get("gross", 0.0)))
    diffs: list[str] = []

    def cmp(where: str, a, b) -> None:
        a = 0 if a is None else a
        b = 0 if b is None else b
        if isinstance(a, float) or isinstance(b, float):
            tol = tol0 + rel * abs(b) if math.isfinite(b) else tol0
            ok = math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol
        else:
            ok = a == b
        if not ok:
            diffs.append(f"{where}: got {a!r}, want {b!r}")

    for section, idk in _LISTS.items():
        g = _keyed(got.get(section, []), idk)
        w = _keyed(want.get(section, []), idk)
        for key in sorted(set(g) | set(w)):
            gr, wr = g.get(key, {}), w.get(key, {})
            for f in sorted((set(gr) | set(wr)) - set(idk)):
                cmp(f"{section}{list(key)}.{f}", gr.get(f), wr.get(f))
    gf, wf = got.get("fund", {}), want.get("fund", {})
    for f in sorted(set(gf) | set(wf)):
        cmp(f"fund.{f}", gf.get(f), wf.get(f))
    gc, wc = got.get("counts", {}), want.get("counts", {})
    for f in ("accepted", "rejected", "late_fills", "busts", "rolls"):  # missing: 0
        cmp(f"counts.{f}", gc.get(f), wc.get(f))
    gr, wr = gc.get("rejects", {}), wc.get("rejects", {})
    for f in sorted(set(gr) | set(wr)):
        cmp(f"counts.rejects.{f}", gr.get(f, 0), wr.get(f, 0))
    return diffs[:limit] if limit else diffs
