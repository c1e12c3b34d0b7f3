"""``exposure status``: a running node's session port and sessions, from its shared memory.

Read-only and lock-free (each counter is one aligned word with one writer: see
:mod:`exposure.shm.session_layout`). What it reports is outside the SPEC document: the
port's counters (connections, refusals, timeouts, failed logins, ...), the datagrams the
fan-out could not send, and per session
whether it is connected, what the node holds, has processed and has on disk, its rejects
per reason (``unauthorized`` included: records outside its entitlements) and its own
counters.
"""

from __future__ import annotations

import numpy as np

from .config import NodeConfig
from .sessions import session_names
from .shm import session_layout as SL
from .shm.control import CONTROL_WORDS, CTL_FANOUT_ERRORS
from .shm.segment import SharedArray
from .shm.tally_segment import TallySegment
from .types import C_LAST_GSEQ, C_UNAUTHORIZED, NODE_REASONS

__all__ = ["node_status"]


def node_status(cfg: NodeConfig) -> dict:
    """The status of the node ``cfg`` names; FileNotFoundError when it is not running."""
    try:
        seg = SharedArray.attach(cfg.segment("sessions"), SL.session_shape(cfg.max_sessions),
                                 np.uint64, readonly=True)
    except Exception as e:  # posix_ipc.ExistentialError, or a shape that does not fit
        raise FileNotFoundError(f"no session table {cfg.segment('sessions')}: is the node "
                                f"running (with this config)? ({e})") from None
    try:
        t = np.array(seg.array)  # one copy: every number below from the same moment
    finally:
        seg.close()
    with TallySegment.attach(cfg.segment("tally")) as tally:
        ctr = np.array(tally.state.ctr)
    try:
        ctl_seg = SharedArray.attach(cfg.segment("control"), (CONTROL_WORDS,), np.uint64,
                                     readonly=True)
        ctl = np.array(ctl_seg.array)
        ctl_seg.close()
    except Exception:  # (posix_ipc.ExistentialError: the node stopped meanwhile)
        ctl = np.zeros(CONTROL_WORDS, np.uint64)
    names = session_names(cfg.sessions_file) if cfg.sessions_file else {}
    sessions = []
    for sid in range(1, t.shape[0]):
        row = t[sid]
        if not (row[SL.S_HELD] or row[SL.S_LOGINS] or row[SL.S_AUTH_FAILS]):
            continue
        rej = {NODE_REASONS.get(k, str(k)): int(row[SL.S_REJ + k])
               for k in range(1, SL.N_REJ) if row[SL.S_REJ + k]}
        sessions.append({
            "session": sid, **({"name": names[sid]} if sid in names else {}),
            "connected": bool(row[SL.S_CONNECTED]), "held": int(row[SL.S_HELD]),
            "processed": int(row[SL.S_DONE]), "durable": int(row[SL.S_DURABLE]),
            "rejects": rej,
            **{k: int(row[c]) for k, c in SL.SESSION_COUNTERS.items()}})
    return {"node": cfg.name,
            "authenticated": cfg.sessions_file is not None,
            "sequenced": int(ctr[C_LAST_GSEQ]), "durable": int(t[0, SL.S_DURABLE]),
            "unauthorized": int(ctr[C_UNAUTHORIZED]),
            "port": {k: int(t[0, c]) for k, c in SL.NODE_COUNTERS.items()},
            "fanout": {"send_errors": int(ctl[CTL_FANOUT_ERRORS])},
            "sessions": sessions}
