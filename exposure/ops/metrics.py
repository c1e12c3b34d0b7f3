"""``exposure metrics``: a Prometheus exporter of a node's counters, read-only, off the hot path.

It maps nothing writable and runs in its own process (systemd: ``exposure-metrics@.service``):
every scrape of ``/metrics`` reads the node's counters segment, control block, session
table and published counters (each word on its own; see :mod:`exposure.ops.status`) and turns
them into metrics. The hot path never knows it is there.

Metric names (all prefixed ``exposure_``; ``node`` is the config's ``[node] name``):

* every entry of :data:`exposure.shm.counters_layout.COUNTERS` under its own name
  (``exposure_ingest_events_total``, ``exposure_compute_batches_total``, ...), counters as
  counters, gauges as gauges; those the segment keeps in nanoseconds in Prometheus's base
  unit instead (:data:`SECONDS`): ``exposure_journal_fsync_seconds_total``,
  ``exposure_journal_fsync_seconds_max``, and as ``_timestamp_seconds`` the points in time
  (CLOCK_REALTIME): ``exposure_started_timestamp_seconds``,
  ``exposure_compute_recv_timestamp_seconds``,
  ``exposure_journal_durable_recv_timestamp_seconds``,
  ``exposure_mirror_replicated_recv_timestamp_seconds``;
* ``exposure_events_total``: records the kernel applied (accepted, rejected and
  unauthorized);
* ``exposure_accepted_total``, ``exposure_rejected_total{reason}``,
  ``exposure_late_fills_total``, ``exposure_busts_total``, ``exposure_rolls_total``,
  ``exposure_unauthorized_total``;
* ``exposure_role`` (1 primary, 2 backup), ``exposure_epoch``;
* ``exposure_gseq{stage="received|computed|durable|replicated"}``;
* ``exposure_journal_lag_events``, ``exposure_replication_lag_events`` and the same lags
  in ``_seconds`` (ingest receive times: see :func:`exposure.ops.status.lags`);
* ``exposure_session_held{session}``, ``exposure_session_connected{session}``;
* ``exposure_port_{name}_total``: the session port's counters (connections, refusals,
  timeouts, failed logins, ...);
* ``exposure_up``: 1 while the node's segments can be read, else 0 (and nothing else).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from exposure.config.node import NodeConfig
from exposure.core.types import (
    C_ACCEPTED,
    C_BUSTS,
    C_EVENTS,
    C_LATE_FILLS,
    C_REJECTS,
    C_ROLL_DATE,
    C_ROLL_GSEQ,
    C_ROLLS,
    C_UNAUTHORIZED,
    REASONS,
)
from exposure.ops.status import lags, read_control, read_counters
from exposure.shm import counters_layout as CN
from exposure.shm import session_layout as SL
from exposure.shm.control import CTL_EPOCH, CTL_REPL_DUR, CTL_ROLE, CTL_SEQUENCED
from exposure.shm.segment import SharedArray
from exposure.shm.tally_segment import TallySegment

__all__ = ["NodeCollector", "SECONDS", "serve"]

# The counters kept in nanoseconds, by their names in the segment: their metric names (after
# "exposure_", before a counter's "_total") and help, in seconds (promtool check metrics
# refuses an abbreviated unit; Prometheus wants base units, and _timestamp_seconds for a
# point in time).
SECONDS = {
    "compute_recv_ns": ("compute_recv_timestamp_seconds",
                        "ingest's receive time (Unix time) of the last record applied"),
    "journal_fsync_ns_total": ("journal_fsync_seconds", "time spent in fsyncs"),
    "journal_fsync_ns_max": ("journal_fsync_seconds_max", "the longest fsync so far"),
    "journal_durable_recv_ns": ("journal_durable_recv_timestamp_seconds",
                                "ingest's receive time (Unix time) of the last durable record"),
    "started_ns": ("started_timestamp_seconds", "when the node started (Unix time)"),
    "mirror_replicated_recv_ns": ("mirror_replicated_recv_timestamp_seconds",
                                  "ingest's receive time (Unix time) of the last record the "
                                  "backup acknowledged durable"),
}


def _read(cfg: NodeConfig) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
    counters = read_counters(cfg)
    ctl = read_control(cfg)
    seg = SharedArray.attach(cfg.segment("sessions"), SL.session_shape(cfg.max_sessions),
                             np.uint64, readonly=True)
    try:
        sessions = np.array(seg.array)
    finally:
        seg.close()
    with TallySegment.attach(cfg.segment("tally")) as tally:
        ctr = np.array(tally.state.ctrpub[0]["ctr"])  # as of the end of a batch
    return counters, ctl, sessions, ctr


class NodeCollector:
    """A prometheus_client collector: reads the node at every scrape."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cfg = self.cfg
        node = cfg.name
        up = GaugeMetricFamily("exposure_up", "1 while the node's shared memory can be read",
                               labels=["node"])
        try:
            counters, ctl, sessions, ctr = _read(cfg)
        except (FileNotFoundError, ValueError, OSError):
            up.add_metric([node], 0)
            yield up
            return
        up.add_metric([node], 1)
        yield up
        for c in CN.COUNTERS:
            value, doc = counters[c.name], c.help
            if c.name in SECONDS:
                name, doc = SECONDS[c.name]
                name, value = "exposure_" + name, value / 1e9
            else:
                name = "exposure_" + c.name.removesuffix("_total")
            fam = (CounterMetricFamily if c.kind == "counter" else GaugeMetricFamily)(
                name, doc, labels=["node"])
            fam.add_metric([node], value)
            yield fam

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=["node"])
            fam.add_metric([node], value)
            return fam

        yield counter("exposure_events", "records the kernel applied (accepted, rejected "
                      "and unauthorized)", int(ctr[C_EVENTS]))
        yield counter("exposure_accepted", "events accepted", int(ctr[C_ACCEPTED]))
        yield counter("exposure_late_fills", "fills of orders that were not live",
                      int(ctr[C_LATE_FILLS]))
        yield counter("exposure_busts", "trades taken back (SPEC section 6)", int(ctr[C_BUSTS]))
        yield counter("exposure_rolls", "new trading days (SPEC section 6)", int(ctr[C_ROLLS]))
        g = GaugeMetricFamily("exposure_last_roll_date", "the trading day the last dated roll "
                              "closed, as the number YYYYMMDD (0: none)", labels=["node"])
        g.add_metric([node], int(ctr[C_ROLL_DATE]))
        yield g
        g = GaugeMetricFamily("exposure_last_roll_gseq", "the gseq of the last roll (0: none)",
                              labels=["node"])
        g.add_metric([node], int(ctr[C_ROLL_GSEQ]))
        yield g
        yield counter("exposure_unauthorized", "records outside their session's "
                      "entitlements", int(ctr[C_UNAUTHORIZED]))
        rej = CounterMetricFamily("exposure_rejected", "events rejected, by SPEC reason",
                                  labels=["node", "reason"])
        for code, reason in REASONS.items():
            rej.add_metric([node, reason], int(ctr[C_REJECTS + code]))
        yield rej
        g = GaugeMetricFamily("exposure_role", "1 primary, 2 backup", labels=["node"])
        g.add_metric([node], int(ctl[CTL_ROLE]))
        yield g
        g = GaugeMetricFamily("exposure_epoch", "the node's incarnation", labels=["node"])
        g.add_metric([node], int(ctl[CTL_EPOCH]))
        yield g
        received = max(counters["ingest_received_gseq"], int(ctl[CTL_SEQUENCED]))
        computed = counters["compute_gseq"]
        durable = int(sessions[0, SL.S_DURABLE])
        g = GaugeMetricFamily("exposure_gseq", "global seqs by stage", labels=["node", "stage"])
        g.add_metric([node, "received"], received)
        g.add_metric([node, "computed"], computed)
        g.add_metric([node, "durable"], durable)
        if cfg.replicated:
            g.add_metric([node, "replicated"], int(ctl[CTL_REPL_DUR]))
        yield g
        lag = lags(counters, computed, durable,
                   int(ctl[CTL_REPL_DUR]) if cfg.replicated else None)
        for what, where in (("journal", "durable"), ("replication", "durable on the backup")):
            if f"{what}_events" not in lag:
                continue
            g = GaugeMetricFamily(f"exposure_{what}_lag_events", "events computed, not yet "
                                  f"{where}", labels=["node"])
            g.add_metric([node], lag[f"{what}_events"])
            yield g
            g = GaugeMetricFamily(f"exposure_{what}_lag_seconds", "receive time of the last "
                                  f"event computed minus that of the last {where}",
                                  labels=["node"])
            g.add_metric([node], lag[f"{what}_us"] / 1e6)
            yield g
        held = GaugeMetricFamily("exposure_session_held", "the last seq held per session",
                                 labels=["node", "session"])
        conn = GaugeMetricFamily("exposure_session_connected", "1 while the session is "
                                 "connected", labels=["node", "session"])
        for sid in range(1, sessions.shape[0]):
            row = sessions[sid]
            if row[SL.S_HELD] or row[SL.S_LOGINS]:
                held.add_metric([node, str(sid)], int(row[SL.S_HELD]))
                conn.add_metric([node, str(sid)], int(row[SL.S_CONNECTED]))
        yield held
        yield conn
        for k, col in SL.NODE_COUNTERS.items():
            yield counter(f"exposure_port_{k}", f"the session port's {k.replace('_', ' ')}",
                          int(sessions[0, col]))


def serve(cfg: NodeConfig, port: int, host: str = "127.0.0.1", stop: list | None = None,
          ready=None, extra: tuple = ()) -> None:
    """Serve ``/metrics`` for the node ``cfg`` on ``host:port`` until ``stop`` is set
    (``extra``: more collectors, e.g. a FIX gateway's)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(NodeCollector(cfg))
    for c in extra:
        registry.register(c)
    server, thread = start_http_server(port, addr=host, registry=registry)
    if ready is not None:
        ready(server.server_address)
    try:
        while not (stop or []):
            time.sleep(0.2)
    finally:
        server.shutdown()
        thread.join(5)
