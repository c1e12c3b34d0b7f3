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
       9  CTL_PRIMARY_GSEQ ingest (backup)       the primary's journal tail at the handshake
                                                 (the catch-up target)

Every word has one writer. Readers poll with plain loads; the values are monotonic or
flags, and each is meaningful on its own (no multi-word invariant), so no seqlock is needed.
The role only changes from backup to primary in place (a promotion); a primary that must
become a backup is restarted by its supervisor.
"""

from __future__ import annotations

__all__ = ["CONTROL_WORDS", "ROLE_PRIMARY", "ROLE_BACKUP", "ROLE_NAMES", "CTL_ROLE",
           "CTL_EPOCH", "CTL_REPL_RECV", "CTL_REPL_DUR", "CTL_HEARD_NS", "CTL_PEER_EPOCH",
           "CTL_LINK", "CTL_IN_SYNC", "CTL_RELOAD", "CTL_PRIMARY_GSEQ"]

CONTROL_WORDS = 16

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

ROLE_PRIMARY = 1
ROLE_BACKUP = 2
ROLE_NAMES = {ROLE_PRIMARY: "primary", ROLE_BACKUP: "backup"}
