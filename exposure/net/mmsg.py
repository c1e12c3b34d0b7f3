"""Many datagrams in one system call: ``sendmmsg(2)`` over slices of one numpy buffer,
``recvmmsg(2)`` into the slots of one.

The fan-out packs a poll's datagrams back to back into one buffer; sending them one
``send`` each costs a system call per datagram (about 7 us here with a receiver on
loopback, 4 us of it the call itself and Python around it). ``sendmmsg`` hands the kernel
all of them at once. The ``struct iovec`` and ``struct mmsghdr`` arrays are built once, as
numpy arrays (x86-64 / aarch64 Linux layouts: iovec = {void *base, size_t len}, 16 bytes;
mmsghdr = {msghdr (56 bytes: name, namelen, iov, iovlen, control, controllen, flags),
unsigned msg_len}, 64 bytes); each call only writes the bases and lengths.

Sending is jitted (:func:`send_datagrams`: libc's ``send`` and ``sendmmsg`` called from
numba, :mod:`exposure.shm.intrinsics`), so the fan-out's pass packs and sends in one call;
one datagram goes by a plain ``send``. :func:`send_headed` (:class:`HeadedSender`) sends
datagrams that are not packed: each a header from one buffer and a slice of another,
gathered by the kernel (two iovecs a message; the fused pass sends compute's rows so). It
needs Linux. Where libc has no ``recvmmsg``, :class:`BatchReceiver` falls back to one
``recv_into`` per datagram.

A received datagram longer than its slot is truncated by the kernel (``MSG_TRUNC`` in
``msg_flags``); :class:`BatchReceiver` reports its length as the slot's plus one, which no
reader takes for a whole datagram.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.shm.intrinsics import errno, sys_send, sys_sendmmsg

__all__ = ["BatchSender", "HeadedSender", "BatchReceiver", "send_datagrams", "send_headed"]

_IOV_WORDS = 2    # struct iovec: base, len
_MMSG_WORDS = 8   # struct mmsghdr: 64 bytes
_MSG_IOV = 2      # word of msghdr.msg_iov
_MSG_IOVLEN = 3   # word of msghdr.msg_iovlen

_MSG_FLAGS = 6    # word of msghdr.msg_flags (int, low half)
_MSG_LEN = 7      # word of mmsghdr.msg_len (unsigned int, low half)
_MSG_TRUNC = 0x20
_MSG_DONTWAIT = 0x40

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _recvmmsg = _libc.recvmmsg
    _recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                          ctypes.c_void_p]
    _recvmmsg.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover (not Linux)
    _recvmmsg = None

_OK_RECV = struct.calcsize("P") == 8 and _recvmmsg is not None


@njit(cache=True, _nrt=False, inline="always")
def _fill_iov(iov, ends, lo, n, base, heads_at, head):
    """iovecs of datagrams ``lo .. lo + n``: bytes ``ends[k - 1]:ends[k]`` of the buffer at
    address ``base``, after (``head`` > 0) the ``head`` bytes at ``heads_at + k * head``;
    returns n."""
    start = np.uint64(0) if lo == 0 else np.uint64(ends[lo - 1])
    for k in range(n):
        end = np.uint64(ends[lo + k])
        j = 0
        if head > 0:
            iov[k, 0] = heads_at + np.uint64(head * (lo + k))
            iov[k, 1] = np.uint64(head)
            j = 2
        iov[k, j] = base + start
        iov[k, j + 1] = end - start
        start = end
    return n


_EINTR = 4


@njit(cache=True, _nrt=False, inline="always")
def _send_all(fd, iov, msgs_at, ends, d, base, heads_at, head):
    """Datagrams ``0 .. d`` (:func:`_fill_iov`'s) by ``sendmmsg``, at most ``iov``'s rows a
    call: a datagram the socket refuses is counted and skipped, a call interrupted by a
    signal is made again. Returns (datagrams refused, the last refusal's errno)."""
    refused = 0
    err = 0
    most = iov.shape[0]
    lo = 0
    while lo < d:
        n = _fill_iov(iov, ends, lo, min(d - lo, most), base, heads_at, head)
        k = 0
        while k < n:
            sent = sys_sendmmsg(fd, msgs_at + np.uint64(64 * k), n - k, 0)
            if sent > 0:
                k += sent
                continue
            e = errno()
            if sent < 0 and e == _EINTR:
                continue
            err = e  # datagram k was refused: count it, go on with the next
            refused += 1
            k += 1
        lo += n
    return refused, err


@njit(cache=True, _nrt=False)
def send_datagrams(fd, iov, msgs_at, ends, d, base):
    """Send datagrams ``0 .. d`` on the connected socket ``fd``: datagram k is bytes
    ``ends[k - 1]:ends[k]`` (``ends[-1]`` read as 0) of the buffer at address ``base``; one
    ``send`` for one datagram, else ``sendmmsg`` over ``iov`` (u8 ``[m, 2]``) and the
    ``m`` message headers at address ``msgs_at``, at most ``m`` per call. A datagram the
    socket refuses is counted and skipped; a call interrupted by a signal is made again.
    Returns (datagrams refused, the last refusal's errno). Jitted, so that the fan-out's
    one call per pass ends in the system call (``exposure.shm.intrinsics``)."""
    if d == 1:
        while True:
            r = sys_send(fd, base, ends[0], 0)
            if r >= 0:
                return 0, 0
            err = errno()
            if err != _EINTR:
                return 1, err
    return _send_all(fd, iov, msgs_at, ends, d, base, np.uint64(0), 0)


@njit(cache=True, _nrt=False)
def send_headed(fd, iov, msgs_at, heads_at, head, ends, d, base):
    """Send datagrams ``0 .. d`` on the connected socket ``fd``, each gathered from two
    places: datagram k is the ``head`` bytes at ``heads_at + k * head`` (its header), then
    bytes ``ends[k - 1]:ends[k]`` (``ends[-1]`` read as 0) of the buffer at ``base``;
    ``sendmmsg`` over ``iov`` (u8 ``[m, 4]``: two iovecs a message) and the ``m``
    message headers at ``msgs_at`` (:class:`HeadedSender` makes them), at most ``m`` per
    call. What the kernel sends is what :func:`send_datagrams` sends of the same bytes
    packed back to back, without packing them. Returns (datagrams refused, the last
    refusal's errno)."""
    return _send_all(fd, iov, msgs_at, ends, d, base, heads_at, head)


class BatchSender:
    """Sends datagrams that are slices of ``buf`` (a numpy array) on a connected UDP
    socket, at most ``max_msgs`` per system call. ``send(ends, d)``: datagram k is bytes
    ``ends[k - 1]:ends[k]`` of ``buf`` (``ends[-1]`` read as 0). Returns the datagrams the
    socket refused; ``last_error`` holds the last error's text. A jitted caller calls
    :func:`send_datagrams` with :attr:`args` itself (the fan-out's pass does)."""

    def __init__(self, sock: socket.socket, buf: np.ndarray, max_msgs: int = 1024):
        self.sock = sock
        self.buf = buf
        self.max = max(1, max_msgs)
        self.last_error = ""
        self.iov = np.zeros((self.max, _IOV_WORDS), np.uint64)
        self.msgs = np.zeros((self.max, _MMSG_WORDS), np.uint64)
        self.msgs[:, _MSG_IOV] = self.iov.ctypes.data + 16 * np.arange(self.max,
                                                                      dtype=np.uint64)
        self.msgs[:, _MSG_IOVLEN] = 1
        # (fd, iov, message headers' address, buffer's address): send_datagrams' own
        self.args = (sock.fileno(), self.iov, np.uint64(self.msgs.ctypes.data),
                     np.uint64(buf.ctypes.data))
        fd, iov, at, base = self.args
        send_datagrams(fd, iov, at, np.zeros(1, np.int64), 0, base)  # compiled now

    def send(self, ends: np.ndarray, d: int) -> int:
        if d <= 0:
            return 0
        fd, iov, at, base = self.args
        refused, err = send_datagrams(fd, iov, at, ends, d, base)
        if refused:
            self.last_error = os.strerror(err)
        return refused


class HeadedSender:
    """The message headers and iovecs of :func:`send_headed`: up to ``max_msgs`` datagrams
    a system call, each a header (one row of ``heads``, u8 words) and then a slice of
    ``buf``. :attr:`args` are ``send_headed``'s (fd, iov, message headers' address,
    headers' address, header bytes) and the buffer's address, for a jitted caller."""

    def __init__(self, sock: socket.socket, heads: np.ndarray, buf: np.ndarray,
                 max_msgs: int = 1024):
        if heads.ndim != 2 or not heads.flags.c_contiguous:
            raise ValueError(f"heads: a C-contiguous 2-d array, not {heads.shape}")
        self.sock, self.heads, self.buf = sock, heads, buf
        self.max = max(1, max_msgs)
        self.iov = np.zeros((self.max, 2 * _IOV_WORDS), np.uint64)
        self.msgs = np.zeros((self.max, _MMSG_WORDS), np.uint64)
        self.msgs[:, _MSG_IOV] = self.iov.ctypes.data + 32 * np.arange(self.max,
                                                                      dtype=np.uint64)
        self.msgs[:, _MSG_IOVLEN] = 2
        self.args = (sock.fileno(), self.iov, np.uint64(self.msgs.ctypes.data),
                     np.uint64(heads.ctypes.data), heads.shape[1] * heads.itemsize,
                     np.uint64(buf.ctypes.data))
        fd, iov, at, hat, head, base = self.args
        send_headed(fd, iov, at, hat, head, np.zeros(1, np.int64), 0, base)  # compiled now


@njit(cache=True, _nrt=False)
def _lengths(msgs, n, slot, lens):
    """Each received datagram's length (a truncated one: ``slot + 1``)."""
    for k in range(n):
        w = msgs[k, _MSG_LEN] & np.uint64(0xFFFFFFFF)
        if (msgs[k, _MSG_FLAGS] & np.uint64(_MSG_TRUNC)) != 0:
            w = np.uint64(slot + 1)
        lens[k] = np.int64(w)


class BatchReceiver:
    """Takes up to ``slots`` datagrams waiting on a non-blocking UDP socket in one system
    call: datagram k lands at the start of row k of :attr:`buf` (``[slots, slot]`` bytes,
    ``slot`` a multiple of 8; :attr:`words` is the same as uint64), its length in
    :attr:`lens`. ``recv(most)`` returns how many arrived (0: none waiting)."""

    def __init__(self, sock: socket.socket, slots: int = 32, slot: int = 65536):
        if slots < 1 or slot < 8 or slot % 8:
            raise ValueError(f"slots = {slots}, slot = {slot}: slots >= 1, slot a multiple "
                             "of 8")
        self.sock = sock
        self.slots, self.slot = slots, slot
        self.buf = np.zeros((slots, slot), np.uint8)
        self.words = self.buf.view(np.uint64)
        self.lens = np.zeros(slots, np.int64)
        self.batched = _OK_RECV
        if self.batched:
            self.iov = np.zeros((slots, _IOV_WORDS), np.uint64)
            self.iov[:, 0] = self.buf.ctypes.data + slot * np.arange(slots, dtype=np.uint64)
            self.iov[:, 1] = slot
            self.msgs = np.zeros((slots, _MMSG_WORDS), np.uint64)
            self.msgs[:, _MSG_IOV] = self.iov.ctypes.data + 16 * np.arange(slots,
                                                                          dtype=np.uint64)
            self.msgs[:, _MSG_IOVLEN] = 1
            self._msgs_at = self.msgs.ctypes.data
            _lengths(self.msgs, 0, slot, self.lens)  # compiled now
        else:  # pragma: no cover (not Linux)
            self._mv = [memoryview(self.buf[k]) for k in range(slots)]

    def recv(self, most: int | None = None) -> int:
        most = self.slots if most is None else max(0, min(most, self.slots))
        if not most:
            return 0
        if not self.batched:  # pragma: no cover (not Linux)
            return self._one_by_one(most)
        n = _recvmmsg(self.sock.fileno(), self._msgs_at, most, _MSG_DONTWAIT, None)
        if n <= 0:  # EAGAIN (none waiting), or an error reported on the socket
            return 0
        _lengths(self.msgs, n, self.slot, self.lens)
        return n

    def _one_by_one(self, most: int) -> int:  # pragma: no cover (not Linux)
        n = 0
        while n < most:
            try:
                got, _, flags, _ = self.sock.recvmsg_into([self._mv[n]])
            except (BlockingIOError, InterruptedError, OSError):
                break
            self.lens[n] = self.slot + 1 if flags & socket.MSG_TRUNC else got
            n += 1
        return n
