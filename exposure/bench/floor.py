"""The floor: the least a server can do over the node's transports, in Python.

    python -m exposure.bench.floor --port P --group G --mport MP [--interface I] [--cpu N]

It accepts a session over the same TCP protocol (LOGIN answered with LOGIN_OK 0), and for
every read of EVENTS frames sends one multicast datagram in the fan-out format carrying the
last record's session, session seq and send time: no ring, no kernel, no tallies. It spins
on its socket (epoll with a zero timeout, like the node's default process) on the CPU it is
pinned to, and ACKs the last seq once the session has been quiet for a millisecond. The
perf tool's client measures it exactly as it measures the node, so the node's latency can
be stated as a multiple of what this machine's loopback and Python cost by themselves.
"""

from __future__ import annotations

import argparse
import gc
import os
import select
import signal
import socket
import struct
import sys
import time

from exposure.core.log import setup
from exposure.core.types import EVENT_DTYPE, ROW_FUND, UPDATE_DTYPE
from exposure.feed.wire import DG_INCREMENTAL, DGRAM_HEADER, DGRAM_MAGIC, dgram_word
from exposure.net import wire as W

__all__ = ["serve", "main"]

_SSEQ = EVENT_DTYPE.fields["sseq"][1]
_SEND = EVENT_DTYPE.fields["send_ns"][1]
_U = {k: DGRAM_HEADER.size + UPDATE_DTYPE.fields[k][1]
      for k in ("account", "session", "sseq", "send_ns", "compute_ns", "recv_ns")}


def serve(port: int, group: str, mport: int, interface: str, stop: list) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(8)
    ls.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    out.connect((group, mport))
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, list] = {}  # fd -> [socket, buffer, session, last seq, acked, quiet since]
    dgram = bytearray(DGRAM_HEADER.size + UPDATE_DTYPE.itemsize)
    stream = 0
    rbuf = bytearray(1 << 21)
    gc.collect()
    gc.freeze()
    gc.disable()
    while not stop:
        for fd, _ in ep.poll(0):
            if fd == ls.fileno():
                try:
                    s, _ = ls.accept()
                except BlockingIOError:
                    continue
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[s.fileno()] = [s, bytearray(), 0, 0, 0, 0]
                ep.register(s.fileno(), select.EPOLLIN)
                continue
            c = conns[fd]
            try:
                m = c[0].recv_into(rbuf)
            except BlockingIOError:
                continue
            except OSError:
                m = 0
            if not m:
                ep.unregister(fd)
                c[0].close()
                del conns[fd]
                continue
            b = c[1]
            b += memoryview(rbuf)[:m]
            pos, last = 0, -1
            while len(b) - pos >= W.HEADER.size:
                _, _, kind, length = W.HEADER.unpack_from(b, pos)
                if len(b) - pos - W.HEADER.size < length:
                    break
                if kind == W.K_LOGIN:
                    c[2] = struct.unpack_from("<I", b, pos + W.HEADER.size)[0]
                    c[0].send(W.encode_login_ok(0))
                elif kind == W.K_EVENTS:
                    last = pos + W.HEADER.size + length - EVENT_DTYPE.itemsize
                pos += W.HEADER.size + length
            if last >= 0:
                now = time.time_ns()
                sseq = struct.unpack_from("<Q", b, last + _SSEQ)[0]
                struct.pack_into("<IIQIIq", dgram, 0, DGRAM_MAGIC, 0, stream + 1,
                                 *dgram_word(1, DG_INCREMENTAL), now)
                dgram[DGRAM_HEADER.size] = ROW_FUND
                struct.pack_into("<i", dgram, _U["account"], -1)
                struct.pack_into("<I", dgram, _U["session"], c[2])
                struct.pack_into("<Q", dgram, _U["sseq"], sseq)
                dgram[_U["send_ns"]:_U["send_ns"] + 8] = b[last + _SEND:last + _SEND + 8]
                struct.pack_into("<q", dgram, _U["compute_ns"], now)
                struct.pack_into("<q", dgram, _U["recv_ns"], now)
                out.send(dgram)
                stream += 1
                c[3] = sseq
                c[5] = time.monotonic_ns()
            del b[:pos]
        now = time.monotonic_ns()
        for c in conns.values():
            if c[3] > c[4] and now - c[5] > 1_000_000:
                c[4] = c[3]
                try:
                    c[0].send(W.encode_ack(c[3], [0] * 8))
                except OSError:
                    pass
    for c in conns.values():
        c[0].close()
    ls.close()
    out.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--mport", type=int, required=True)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--cpu", type=int)
    a = p.parse_args(argv)
    setup(label="floor")
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    serve(a.port, a.group, a.mport, a.interface, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
