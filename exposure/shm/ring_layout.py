"""Layout of a single-producer ring in shared memory with one or two consumers (like
Agrona's ``RingBufferDescriptor``; the second consumer is a Disruptor gating sequence): the
one place that knows the offsets.

::

    byte 0     +----------------------------------------------+
               | header: magic, version, record size,         |  written once by the creator
               |         capacity (records), creator pid,     |
               |         consumers (1 or 2)                   |
    byte 128   +----------------------------------------------+
               | tail        producer position (records)      |  producer: store_release
    byte 256   +----------------------------------------------+  consumers: load_acquire
               | head cache  producer's last read of the      |  producer only
               |             slowest consumer's head          |
    byte 384   +----------------------------------------------+
               | head        consumer 0 position (records)    |  consumer 0: store_release
    byte 512   +----------------------------------------------+  producer: load_acquire
               | consumer 0 sleeping flag                     |  spin-then-block wake-ups
    byte 640   +----------------------------------------------+
               | producer sleeping flag                       |
    byte 768   +----------------------------------------------+
               | head 2      consumer 1 position (records)    |  consumer 1: store_release
    byte 896   +----------------------------------------------+  producer: load_acquire
               | consumer 1 sleeping flag                     |
    byte 4096  +----------------------------------------------+
               | slots: capacity x record size                |  slot = position & (capacity-1)
               +----------------------------------------------+

Positions only grow (u64 counters of records; they do not wrap in any realistic lifetime).
The producer owns ``tail`` and ``head cache``, each consumer its own head; each word sits
on its own 128-byte block so that neither the words nor the adjacent-line prefetcher make
two cores share a line (Agrona keeps the same 128-byte distance).

With two consumers every record is written once and read by both (the node's compute
stage and its journal): a slot is free only once the slower of the two has passed it, so
the producer's view of the head is the minimum of the two heads. Each consumer reads the
slots and never writes them.
"""

from __future__ import annotations

__all__ = [
    "MAGIC", "VERSION", "HEADER_BYTES", "W_MAGIC", "W_VERSION", "W_RECORD_SIZE", "W_CAPACITY",
    "W_CREATOR", "W_CONSUMERS", "W_TAIL", "W_HEAD_CACHE", "W_HEAD", "W_CONSUMER_SLEEPING",
    "W_PRODUCER_SLEEPING", "W_HEAD2", "W_CONSUMER2_SLEEPING", "HEAD_WORDS", "SLEEP_WORDS",
    "MAX_CONSUMERS", "RingLayoutError", "segment_size", "check_capacity",
    "check_consumers",
]

MAGIC = 0x474E_4952_5058_45  # "EXPRING"
VERSION = 2  # 2: a second consumer (W_CONSUMERS, W_HEAD2, W_CONSUMER2_SLEEPING)
HEADER_BYTES = 4096

# Offsets of the control words, in 8-byte words from the segment start.
W_MAGIC = 0
W_VERSION = 1
W_RECORD_SIZE = 2
W_CAPACITY = 3
W_CREATOR = 4
W_CONSUMERS = 5
W_TAIL = 128 // 8
W_HEAD_CACHE = 256 // 8
W_HEAD = 384 // 8
W_CONSUMER_SLEEPING = 512 // 8
W_PRODUCER_SLEEPING = 640 // 8
W_HEAD2 = 768 // 8
W_CONSUMER2_SLEEPING = 896 // 8
HEAD_WORDS = (W_HEAD, W_HEAD2)               # consumer k's head
SLEEP_WORDS = (W_CONSUMER_SLEEPING, W_CONSUMER2_SLEEPING)  # ... and its sleeping flag
MAX_CONSUMERS = 2
N_WORDS = HEADER_BYTES // 8

MAX_CAPACITY = 2**30
MAX_RECORD_SIZE = 2**16


class RingLayoutError(ValueError):
    """A capacity or record size the layout cannot hold, or a header that does not match."""


def check_capacity(capacity: int, record_size: int) -> None:
    """Raise with the bad value in the message unless both are valid."""
    if not isinstance(capacity, int) or capacity < 2 or capacity > MAX_CAPACITY or (
            capacity & (capacity - 1)):
        raise RingLayoutError(f"ring capacity {capacity!r} must be a power of two in "
                              f"2..{MAX_CAPACITY}")
    if not isinstance(record_size, int) or record_size < 8 or record_size > MAX_RECORD_SIZE or (
            record_size % 8):
        raise RingLayoutError(f"ring record size {record_size!r} must be a multiple of 8 in "
                              f"8..{MAX_RECORD_SIZE}")


def check_consumers(consumers: int) -> None:
    """Raise with the bad value in the message unless it is 1 or 2."""
    if not isinstance(consumers, int) or not 1 <= consumers <= MAX_CONSUMERS:
        raise RingLayoutError(f"ring consumers {consumers!r} must be 1..{MAX_CONSUMERS}")


def segment_size(capacity: int, record_size: int) -> int:
    """Bytes of a ring segment (header + slots)."""
    check_capacity(capacity, record_size)
    return HEADER_BYTES + capacity * record_size
