"""The fan-out stage in-process: a datagram the socket refuses is counted, never fatal."""

import os
import socket
import uuid

import numpy as np
import pytest

from exposure.shm.control import CONTROL_WORDS, CTL_EPOCH, CTL_FANOUT_ERRORS, CTL_ROLE, ROLE_PRIMARY
from exposure.shm.ring import Ring
from exposure.stages.fanout import FanoutStage
from exposure.types import UPDATE_DTYPE

pytestmark = pytest.mark.timeout(120)


def _closed_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: a send there draws ICMP port unreachable
    return port


def test_datagrams_the_socket_refuses_are_counted_and_the_stage_goes_on():
    ring = Ring.create(f"exposure-test-fanout-{os.getpid()}-{uuid.uuid4().hex[:6]}", 64,
                       UPDATE_DTYPE.itemsize)
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    ctl[CTL_ROLE], ctl[CTL_EPOCH] = ROLE_PRIMARY, 1
    # A destination that refuses: the connected UDP socket reports the ICMP error on the
    # next send (ECONNREFUSED), a real send error like a full buffer's ENOBUFS.
    st = FanoutStage(ring, "127.0.0.1", _closed_udp_port(), "127.0.0.1", 1, 1400, 16,
                     epoch=1, ctl=ctl)
    try:
        upd = np.zeros(1, UPDATE_DTYPE)
        for k in range(20):
            upd["account"], upd["gseq"] = k % 4, k + 1
            assert ring.push(upd.view(np.uint64).reshape(1, -1)) == 1
            assert st.poll() == 1  # taken and sent (or lost), never raised
        assert st.seq == 20  # every datagram had its stream seq: receivers see the gaps
        assert st.send_errors >= 1 and int(ctl[CTL_FANOUT_ERRORS]) == st.send_errors
    finally:
        st.close()
        ring.close()
