"""The perf tool's arithmetic, kept apart from sockets so that it can be tested exactly.

* When each sent event became visible on multicast is the recorder's
  (:mod:`exposure.bench.recorder`), folded in as datagrams arrive.
* Coordinated omission: the sender is open-loop on a fixed schedule, and latency is taken
  from each event's *intended* send time, so a sender (or node) that stalls does not hide
  the events that should have gone out meanwhile: they count with the stall in them.
* :func:`summarize`: percentiles from an HdrHistogram (1 ns .. 1000 s, 3 significant
  digits), in microseconds.
"""

from __future__ import annotations

import numpy as np
from hdrh.histogram import HdrHistogram

__all__ = ["histogram", "summarize", "percentile_curve", "PERCENTILES", "PLOT_PERCENTILES"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


_SUB_BUCKET_BITS = 11  # an HdrHistogram of 3 significant digits: 2,048 sub-buckets


def histogram(latency_ns: np.ndarray) -> HdrHistogram:
    """The HdrHistogram of ``latency_ns`` (values below 1 count as 1). Each value is first
    moved to the lowest value of its bucket and each bucket recorded once with its count:
    the same histogram as a record per value, without a Python call per value (a 16 M-event
    trial's took about a minute)."""
    h = HdrHistogram(1, 1_000_000_000_000, 3)
    v = np.maximum(np.asarray(latency_ns, np.int64), 1)
    bits = np.frexp(v.astype(np.float64))[1]  # the bit length (exact below 2**53)
    shift = np.maximum(bits - _SUB_BUCKET_BITS, 0)
    vals, counts = np.unique((v >> shift) << shift, return_counts=True)
    for x, c in zip(vals.tolist(), counts.tolist(), strict=True):
        h.record_value(x, c)
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
