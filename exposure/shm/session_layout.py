"""Layout of the session table: one shared u8 array ``[max_sessions + 1, SESSION_COLS]``.

Row ``s`` (1..max_sessions) is session ``s``; row 0 is the node's own::

    col        row s >= 1 (session s)                      writer
    ---------  ------------------------------------------  -------------------------
    0  HELD    highest session seq in the compute ring      ingest (replica on a backup)
    1  DONE    highest session seq processed                compute (release store)
    2  DURABLE highest session seq on disk                  journal (release store)
    3..18 REJ  REJ + code: rejects per reason code          compute
               (types.R_*; R_UNAUTHORIZED too)
    19..26     LOGINS, AUTH_FAILS, SEQ_REJECTS, SLOW,       ingest
               IDLE, REPLACED, CONNECTED (0/1), PROTOCOL
    row 0:     DURABLE = the journal's durable global seq; PROCESSED (27) = the last
               global seq compute processed (release store, after the sessions'
               DONE); N_* (32..47): the session port's counters (connections,
               refusals, timeouts ...), ingest

Row 0's DURABLE and PROCESSED move whenever any session's DURABLE or DONE does (each is
stored after them), so ingest reads those two words once per pass and looks at its
sessions' rows only when one has moved.

Counters count since the segment was created (the node started); readers (``exposure
status``) read them without a lock: each is one aligned word with one writer.
"""

from __future__ import annotations

__all__ = ["SESSION_COLS", "S_HELD", "S_DONE", "S_DURABLE", "S_REJ", "N_REJ",
           "S_LOGINS", "S_AUTH_FAILS", "S_SEQ_REJECTS", "S_SLOW", "S_IDLE", "S_REPLACED",
           "S_CONNECTED", "S_PROTOCOL", "N_PROCESSED", "SESSION_COUNTERS", "NODE_COUNTERS",
           "session_shape"]

S_HELD = 0
S_DONE = 1
S_DURABLE = 2
S_REJ = 3
N_REJ = 16          # reason codes 0..15 (0 unused): the ACK's counters
S_LOGINS = 19       # logins accepted
S_AUTH_FAILS = 20   # logins refused: the proof did not verify
S_SEQ_REJECTS = 21  # closed for a record whose seq was not the next one
S_SLOW = 22         # closed: did not read its answers (output queue full)
S_IDLE = 23         # closed: nothing received for the idle timeout
S_REPLACED = 24     # connections replaced by a newer authenticated login
S_CONNECTED = 25    # 1 while a connection is logged in as this session
S_PROTOCOL = 26     # closed for a malformed frame after login
SESSION_COUNTERS = {"logins": S_LOGINS, "auth_failures": S_AUTH_FAILS,
                    "seq_rejects": S_SEQ_REJECTS, "closed_slow": S_SLOW,
                    "closed_idle": S_IDLE, "replaced": S_REPLACED,
                    "protocol_errors": S_PROTOCOL}

# Row 0: the last global seq compute processed (a gauge; see the module's docstring).
N_PROCESSED = 27
# Row 0: the session port's counters.
N_ACCEPTED = 32     # connections accepted
N_OPEN = 33         # connections open now (a gauge)
N_REFUSED = 34      # refused at the connection cap
N_EVICTED = 35      # connections not yet logged in closed to make room at the cap
N_EMFILE = 36       # accepts that hit the process's file-descriptor limit
N_LOGIN_TIMEOUT = 37  # closed: no valid LOGIN within the login deadline
N_PRELOGIN = 38     # closed: sent something other than LOGIN first
N_AUTH_FAILS = 39   # logins refused: proof, unknown session id
N_BAD_SESSION = 40  # logins refused: session id outside 1..max_sessions
N_LOGINS = 41       # logins accepted
N_SEQ_REJECTS = 42  # sessions closed for a seq that is not the next one
N_SLOW = 43         # closed: output queue full
N_IDLE = 44         # closed: idle timeout
N_PROTOCOL = 45     # closed: malformed frame after login
N_REPLACED = 46     # connections replaced by a newer login of their session
N_IPC_LOGINS = 47   # logins on the IPC socket, each given its shared-memory ring
NODE_COUNTERS = {"accepted": N_ACCEPTED, "open": N_OPEN, "refused_at_cap": N_REFUSED,
                 "evicted_before_login": N_EVICTED, "fd_limit": N_EMFILE,
                 "login_timeouts": N_LOGIN_TIMEOUT, "closed_before_login": N_PRELOGIN,
                 "auth_failures": N_AUTH_FAILS, "bad_session_ids": N_BAD_SESSION,
                 "logins": N_LOGINS, "seq_rejects": N_SEQ_REJECTS, "closed_slow": N_SLOW,
                 "closed_idle": N_IDLE, "protocol_errors": N_PROTOCOL,
                 "replaced": N_REPLACED, "ipc_logins": N_IPC_LOGINS}
SESSION_COLS = 48

assert S_REJ + N_REJ == S_LOGINS and S_PROTOCOL < N_PROCESSED < N_ACCEPTED
assert N_IPC_LOGINS < SESSION_COLS


def session_shape(max_sessions: int) -> tuple[int, int]:
    return (max_sessions + 1, SESSION_COLS)
