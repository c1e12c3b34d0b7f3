"""Layout of a node's control block: the words its supervisor and stages share about its role.

One small shared segment (``/exposure.<name>.control``), u8 words::

    word  name            writer                 meaning
    ----  --------------  ---------------------  ------------------------------------------
       0  CTL_ROLE        supervisor             ROLE_PRIMARY or ROLE_BACKUP
       1  CTL_EPOCH       supervisor             this node's epoch (the multicast header's)
       2  CTL_REPL_RECV   mirror (primary)       highest gseq the backup has received
       3  CTL_REPL_DUR    mirror (primary)       highest gseq the backup has made durable
       4  CTL_HEARD_NS    ingest (backup) /      CLOCK_MONOTONIC ns of the last frame heard
                          mirror (primary)       from the peer
       5  CTL_PEER_EPOCH  ingest / mirror        highest epoch the peer has told us about
       6  CTL_LINK        ingest / mirror        1 while an authenticated link is up
       7  CTL_IN_SYNC     ingest (backup)        1 once the backup has caught up with the
                                                 primary's tail at the handshake
       8  CTL_RELOAD      ingest (backup)        1: the supervisor must rebuild the node from
                                                 its data directory (a snapshot arrived, or
                                                 the old state was moved aside)
       9  CTL_PRIMARY_GSEQ ingest (backup)       what the primary had sequenced at the
                                                 handshake (the catch-up target)
      10  CTL_VALID_NS    mirror (primary)       CLOCK_MONOTONIC ns until which the backup
                                                 cannot have promoted itself: the echo of a
                                                 heartbeat sent at t, plus failover_ms, less
                                                 a margin (the fence; see exposure.pair.election)
      11  CTL_ALONE       supervisor             1 while etcd records this primary as running
                                                 alone: it acknowledges on its own durability
                                                 and needs no fence
      12  CTL_ALONE_SEEN  ingest                 CTL_ALONE + 1 as ingest last acted on it
                                                 (0: not yet): the supervisor's hand-shake
                                                 before it records a backup as synchronous
      13  CTL_SEQUENCED   ingest                 the last gseq ingest sequenced (or received)
      14  CTL_FENCED      ingest                 1 while this primary may not acknowledge nor
                                                 publish (no valid echo and not alone), as
                                                 of the last time it had ACKs to send
      15  CTL_FANOUT_ERRORS fan-out              datagrams the multicast socket refused
                                                 (a full buffer, no route): each one is a
                                                 gap that receivers see
  16..31  CTL_PROGRESS+i  process i of the map   a counter its loop advances (the supervisor
                                                 takes a process whose counter stops for
                                                 stall_ms for dead)

Every word has one writer. Readers poll with plain loads; the values are monotonic or
flags, and each is meaningful on its own (no multi-word invariant), so no seqlock is needed.
The role only changes from backup to primary in place (a promotion); a primary that must
become a backup is restarted by its supervisor.

Who may acknowledge (ingest) and publish (fan-out) in a pair: the primary, while
``CTL_ALONE`` is 1 or ``now < CTL_VALID_NS``. Between a check and the send it guards there
is a window of microseconds (a process stopped inside it sends one batch late); the epoch in
every datagram is the fencing token that lets a receiver drop such a straggler (a session's
ACK carries no epoch yet: the same window could let one late ACK out).
"""

from __future__ import annotations

__all__ = ["CONTROL_WORDS", "ROLE_PRIMARY", "ROLE_BACKUP", "ROLE_NAMES", "CTL_ROLE",
           "CTL_EPOCH", "CTL_REPL_RECV", "CTL_REPL_DUR", "CTL_HEARD_NS", "CTL_PEER_EPOCH",
           "CTL_LINK", "CTL_IN_SYNC", "CTL_RELOAD", "CTL_PRIMARY_GSEQ", "CTL_VALID_NS",
           "CTL_ALONE", "CTL_ALONE_SEEN", "CTL_SEQUENCED", "CTL_FENCED", "CTL_FANOUT_ERRORS",
           "CTL_PROGRESS", "MAX_PROCESSES", "may_act"]

CONTROL_WORDS = 32

CTL_ROLE = 0
CTL_EPOCH = 1
CTL_REPL_RECV = 2
CTL_REPL_DUR = 3
CTL_HEARD_NS = 4
CTL_PEER_EPOCH = 5
CTL_LINK = 6
CTL_IN_SYNC = 7
CTL_RELOAD = 8
CTL_PRIMARY_GSEQ = 9
CTL_VALID_NS = 10
CTL_ALONE = 11
CTL_ALONE_SEEN = 12
CTL_SEQUENCED = 13
CTL_FENCED = 14
CTL_FANOUT_ERRORS = 15
CTL_PROGRESS = 16
MAX_PROCESSES = CONTROL_WORDS - CTL_PROGRESS

ROLE_PRIMARY = 1
ROLE_BACKUP = 2
ROLE_NAMES = {ROLE_PRIMARY: "primary", ROLE_BACKUP: "backup"}


def may_act(ctl, now_ns: int) -> bool:
    """Whether a node of a pair may acknowledge and publish now (see the module
    docstring): it is the primary, and it runs alone or its fence has not expired."""
    return bool(ctl[CTL_ROLE] == ROLE_PRIMARY and (ctl[CTL_ALONE] or now_ns < ctl[CTL_VALID_NS]))
