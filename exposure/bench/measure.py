"""The perf tool's arithmetic, kept apart from sockets so that it can be tested exactly.

* :func:`seen_times`: when each sent event became visible on multicast. Updates are
  conflated (a row carries the state after the last event that moved it, which includes
  every earlier event of the session), so event *k* of a session is seen at the arrival of
  the first update of that session whose session seq is at or beyond *k*'s.
* Coordinated omission: the sender is open-loop on a fixed schedule, and latency is taken
  from each event's *intended* send time, so a sender (or node) that stalls does not hide
  the events that should have gone out meanwhile: they count with the stall in them.
* :func:`summarize`: percentiles from an HdrHistogram (1 ns .. 1000 s, 3 significant
  digits), in microseconds.
"""

from __future__ import annotations

import numpy as np
from hdrh.histogram import HdrHistogram

from exposure.feed.wire import DG_INCREMENTAL, parse_datagram

__all__ = ["Arrivals", "collect_arrivals", "seen_times", "histogram", "summarize",
           "stage_breakdown", "percentile_curve", "PERCENTILES", "PLOT_PERCENTILES"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Arrivals:
    """The updates of one session, in arrival order, flattened from the datagrams."""

    def __init__(self, t_ns, sseq, send_ns, recv_ns, compute_ns, sent_ns, dgram_seqs):
        self.t_ns = t_ns              # client receipt time of the update's datagram
        self.sseq = sseq              # session seq the update carries
        self.send_ns = send_ns
        self.recv_ns = recv_ns
        self.compute_ns = compute_ns
        self.sent_ns = sent_ns        # the datagram's fan-out send time
        self.dgram_seqs = dgram_seqs  # stream seqs of every datagram received (any session)

    @property
    def stream_gaps(self) -> int:
        """Datagrams missing from the stream between the first and last received."""
        s = np.unique(self.dgram_seqs)
        return int(s[-1] - s[0] + 1 - len(s)) if len(s) else 0


def collect_arrivals(datagrams: list[tuple[int, bytes]], session: int) -> Arrivals:
    """``datagrams``: (receipt ns, bytes) in arrival order; malformed ones are skipped."""
    cols: dict[str, list] = {k: [] for k in ("t", "sseq", "send", "recv", "comp", "sent")}
    seqs = []
    for t, data in datagrams:
        try:
            d = parse_datagram(data)
        except ValueError:
            continue
        if d.type != DG_INCREMENTAL:
            continue  # heartbeats and refreshes carry no event (nor a new seq)
        seqs.append(d.seq)
        u = d.updates[d.updates["session"] == session]
        if not len(u):
            continue
        cols["t"].append(np.full(len(u), t, np.int64))
        cols["sseq"].append(u["sseq"].astype(np.int64))
        cols["send"].append(u["send_ns"])
        cols["recv"].append(u["recv_ns"])
        cols["comp"].append(u["compute_ns"])
        cols["sent"].append(np.full(len(u), d.sent_ns, np.int64))

    def cat(k):
        return np.concatenate(cols[k]) if cols[k] else np.zeros(0, np.int64)

    return Arrivals(cat("t"), cat("sseq"), cat("send"), cat("recv"), cat("comp"), cat("sent"),
                    np.asarray(seqs, np.int64))


def seen_times(arr: Arrivals, sseqs: np.ndarray) -> np.ndarray:
    """Receipt time of the first update covering each session seq (0 = never seen)."""
    out = np.zeros(len(sseqs), np.int64)
    if not len(arr.sseq):
        return out
    reach = np.maximum.accumulate(arr.sseq)
    idx = np.searchsorted(reach, sseqs, side="left")
    ok = idx < len(reach)
    out[ok] = arr.t_ns[idx[ok]]
    return out


def histogram(latency_ns: np.ndarray) -> HdrHistogram:
    h = HdrHistogram(1, 1_000_000_000_000, 3)
    for v in np.maximum(latency_ns, 1).tolist():
        h.record_value(v)
    return h


def summarize(latency_ns: np.ndarray) -> dict:
    """p50/p90/p99/p99.9/max in us (zeros when there is nothing)."""
    if not len(latency_ns):
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "p999_us": 0.0, "max_us": 0.0}
    h = histogram(latency_ns)
    out = {key: h.get_value_at_percentile(q) / 1000
           for key, q in zip(("p50_us", "p90_us", "p99_us", "p999_us"), PERCENTILES,
                             strict=True)}
    out["max_us"] = h.get_max_value() / 1000
    return out


PLOT_PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99)


def percentile_curve(latency_ns: np.ndarray, qs=PLOT_PERCENTILES) -> list[float]:
    """Latency (us) at each percentile of ``qs`` (for a percentile plot)."""
    if not len(latency_ns):
        return [0.0] * len(qs)
    h = histogram(latency_ns)
    return [h.get_value_at_percentile(q) / 1000 for q in qs]


def stage_breakdown(arr: Arrivals, sseqs: np.ndarray) -> dict:
    """Medians (us) of each leg for the updates that carry exactly a measured event:
    client -> ingest, ingest -> compute, compute -> fan-out send, fan-out -> client."""
    tagged = np.isin(arr.sseq, sseqs)
    if not tagged.any():
        return {}
    legs = {"client_to_ingest": arr.recv_ns - arr.send_ns,
            "ingest_to_compute": arr.compute_ns - arr.recv_ns,
            "compute_to_fanout": arr.sent_ns - arr.compute_ns,
            "fanout_to_client": arr.t_ns - arr.sent_ns}
    return {k: {"p50_us": float(np.percentile(v[tagged], 50)) / 1000,
                "p99_us": float(np.percentile(v[tagged], 99)) / 1000}
            for k, v in legs.items()}
