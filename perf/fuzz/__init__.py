"""A fuzzer against a live node's session port (issue 12: hostile and broken input).

    python -m perf.fuzz --frames 1000000 [--connections N] [--workers P] [--seed S]
                        [--out report.json] [--login-timeout-ms MS] [--rss-limit-mb MB]
                        [--keep]

It starts a real node (``exposure run``, :class:`exposure.harness.localnode.LocalNode`) with a
sessions
file it generates (six sessions with different entitlements, on 127.0.0.1) and throws at
it, from ``--connections`` concurrent client lanes in ``--workers`` processes (each an
asyncio loop multiplexing non-blocking sockets), ``--frames`` random and mutated frames:

* authenticated sessions (one lane each): EVENTS frames of the session's own content
  (1..300 records a frame, on a big run sometimes 8,191 or 8,192; up to 1,024 frames
  per write), heartbeat floods, mixed bursts, identical resends and resends of garbage
  (seqs at or below what the node holds, and 0), and an end to every connection: a clean
  close, a half-close, an RST mid-frame, a truncated frame, a replacing login from a
  second connection, or one hostile frame (seq gaps, poison seqs 2**63 and 2**64-1, valid
  headers with random payloads, huge and wrong lengths, random and client-forbidden kinds,
  bad magic and version, a second LOGIN, garbage bytes); logins replayed from another
  connection or proving another session's id; once per lane a slow reader that stops
  reading and floods 40,000 heartbeats (counted apart: ``slow_reader_heartbeats``);
* chaos lanes (never logged in): pre-login frames of every kind, heartbeat floods and
  garbage before login, truncated and dripped logins, wrong-secret logins, replayed logins
  (a proof captured from another connection), logins of unconfigured and out-of-range
  session ids, connection floods, connections that never log in (the login deadline).

A session's content is a deterministic function of (seed, session, sseq) (chunks of
:data:`CHUNK` records, :func:`content_chunk`): its own realistic flow (exposure.bench.flowgen)
on its
own sources, accounts and instruments; events it is not entitled to (other sources and
accounts, instrument / mark / limit without the flag); records of random edge values; and
records of random bytes (every field) with the correct next ``sseq``. Whatever the node
closed, a reconnect learns what it holds (LOGIN_OK) and goes on from there, resending
identical content for a given sseq.

Checks (the report's ``checks``; ``pass`` is all of them):

* ``alive``: the node's processes (``LocalNode.pids()``) are the same at the end, the
  supervisor is alive, its log never says "restart";
* ``memory``: the sum of VmRSS of its processes after the run is within ``--rss-limit-mb``
  of the sum before (both reported, with the peak sampled during the run);
* ``journal``: per session the journal holds exactly sseqs 1..held (held from a fresh
  LOGIN_OK, equal to the session table's), each once, in order, with the content sent
  (ignoring the node's stamps: gseq, recv_ns, session, epoch and the reject byte); gseqs
  are 1..N without a gap; no record of any other session;
* ``reject_byte``: the reject byte the node stamped equals the fuzzer's own entitlement
  model (unauthorized: 9; a client's own 9 on an entitled record: bad_field);
* ``document``: the node's ``exposure dump`` equals an offline replay
  (:class:`exposure.engine.replay.Engine` with the node's capacities) of the content in journal
  order minus what the fuzzer's own model (:func:`model_authorized`, independent of
  :mod:`exposure.net.sessions`) finds unauthorized, full document with its counts
  (:func:`exposure.engine.document.compare_documents`);
* ``unauthorized``: the kernel's ``C_UNAUTHORIZED`` and every session's unauthorized
  counter equal the model's counts, and every session's per-reason reject counters equal
  the replay's;
* ``protocol``: what the node answered matched the protocol (CHALLENGE first; nothing but
  a close before login; E_AUTH / E_SESSION for bad logins; E_PROTOCOL / E_SESSION / E_SEQ
  with the expected seq for hostile frames; E_REPLACED for a replaced connection; every
  heartbeat answered; what a session holds after a REJECT, a truncated frame or a
  half-close exactly what was sent before it (after a half-close: every complete frame
  sent, however many control frames wait before it, and then the node closes the
  connection); never a timeout).

The report (JSON on stdout, and in ``--out``) gives the frames by category, connections,
seconds, frames/s, RSS before/after/peak (and sampled during the run), the node's port
counters (session table row 0, ``exposure.shm.session_layout.NODE_COUNTERS``) and
per-session counters, the CPU shares of the machine meanwhile (steal included), each
check's details, the anomalies seen. Exit status 0 pass, 1 fail, 2 error.

The modules, by job: :mod:`~perf.fuzz.content` (the sessions, their sessions file, the
entitlement model, the content and its frames), :mod:`~perf.fuzz.client` (a connection, a
lane's base, a blocking session), :mod:`~perf.fuzz.lanes` (the session and chaos lanes),
:mod:`~perf.fuzz.traffic` (the worker processes), :mod:`~perf.fuzz.verify` (the checks),
:mod:`~perf.fuzz.run` (:func:`run_fuzz`), :mod:`perf.fuzz.__main__` (the command line).
"""

from __future__ import annotations

from perf.fuzz.content import SPECS, content_chunk, model_authorized
from perf.fuzz.run import run_fuzz

__all__ = ["run_fuzz", "content_chunk", "model_authorized", "SPECS", "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (:mod:`perf.fuzz.__main__`)."""
    from perf.fuzz.__main__ import main as cli

    return cli(argv)
