"""The SPSC ring: layout checks in-process, and two-process soaks through real shared memory."""

import os
import subprocess
import sys
import uuid

import numpy as np
import orjson
import pytest

from exposure.core.types import EVENT_DTYPE
from exposure.shm import ring_layout as L
from exposure.shm.ring import Ring, RingError


@pytest.fixture
def ring_name():
    name = f"exposure-test-ring-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    Ring.unlink(name)  # also when the test failed
    assert not os.path.exists(f"/dev/shm/{name}")


def test_control_words_sit_128_bytes_apart():
    words = [L.W_TAIL, L.W_HEAD_CACHE, L.W_HEAD, L.W_CONSUMER_SLEEPING, L.W_PRODUCER_SLEEPING,
             L.W_HEAD2, L.W_CONSUMER2_SLEEPING]
    offsets = [w * 8 for w in words]
    assert offsets == [128, 256, 384, 512, 640, 768, 896]
    assert L.HEADER_BYTES % 4096 == 0 and max(offsets) < L.HEADER_BYTES


@pytest.mark.parametrize("cap,rs", [(1000, 128), (1, 128), (1024, 12), (1024, 0), (2**31, 8)])
def test_bad_shapes_are_refused_with_the_value_in_the_message(cap, rs):
    with pytest.raises(L.RingLayoutError, match=str(cap) if cap in (1000, 1, 2**31) else str(rs)):
        L.segment_size(cap, rs)


def test_push_pop_wraps_and_pushes_back_when_full(ring_name):
    with Ring.create(ring_name, 8, 128) as r:
        assert oct(os.stat(f"/dev/shm/{ring_name}").st_mode & 0o777) == "0o600"
        a = np.zeros(20, EVENT_DTYPE)
        a["gseq"] = np.arange(20)
        out = np.zeros(20, EVENT_DTYPE)
        seen = []
        sent = 0
        while sent < 20:
            sent += r.push(a[sent:])
            assert len(r) <= 8
            k = r.pop(out[:3])
            seen += out["gseq"][:k].tolist()
        while k := r.pop(out):
            seen += out["gseq"][:k].tolist()
        assert seen == list(range(20))


def test_two_consumers_each_see_every_record_and_the_slower_one_holds_the_producer(
        ring_name):
    with Ring.create(ring_name, 8, 128, consumers=2) as r:
        fast, slow = r.reader(0), r.reader(1)
        assert fast is r and len(slow) == 0
        with pytest.raises(RingError, match="2 consumer"):
            r.reader(2)
        a = np.zeros(20, EVENT_DTYPE)
        a["gseq"] = np.arange(20)
        out = np.zeros(20, EVENT_DTYPE)
        assert r.push(a) == 8  # full: neither consumer has read anything
        assert fast.pop(out) == 8 and out["gseq"][:8].tolist() == list(range(8))
        assert r.push(a[8:]) == 0  # the journal (consumer 1) still holds every slot
        assert slow.pop(out[:3]) == 3 and out["gseq"][:3].tolist() == [0, 1, 2]
        assert r.push(a[8:]) == 3 and len(r) == 3 and len(slow) == 8
        seen_fast, seen_slow, sent = list(range(8)), [0, 1, 2], 11
        while len(seen_fast) < 20 or len(seen_slow) < 20:
            sent += r.push(a[sent:])
            k = fast.pop(out[:5])
            seen_fast += out["gseq"][:k].tolist()
            k = slow.pop(out[:2])
            seen_slow += out["gseq"][:k].tolist()
        assert seen_fast == seen_slow == list(range(20))
    with pytest.raises(L.RingLayoutError, match="consumers 3"):
        Ring.create(ring_name, 8, 128, consumers=3)


def test_attaching_checks_the_header(ring_name):
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach(ring_name)
    with Ring.create(ring_name, 16, 64):
        with pytest.raises(RingError, match="already exists"):
            Ring.create(ring_name, 16, 64)
        with pytest.raises(RingError, match="record size 64, expected 128"):
            Ring.attach(ring_name, record_size=128)
        with pytest.raises(RingError, match="capacity 16, expected 32"):
            Ring.attach(ring_name, capacity=32)
        Ring.attach(ring_name, 64, 16).close()
    assert not os.path.exists(f"/dev/shm/{ring_name}")


def test_a_foreign_segment_is_refused(ring_name):
    import posix_ipc
    shm = posix_ipc.SharedMemory("/" + ring_name, posix_ipc.O_CREX, size=8192)
    shm.close_fd()
    with pytest.raises(RingError, match="bad magic"):
        Ring.attach(ring_name)


def _soak(ring_name, records, capacity, record_size, wait, consumers=1, pause_every=0):
    """Producer and consumer processes through one ring; with two consumers, consumer 1
    pauses a millisecond every ``pause_every`` pops. Returns (consumer 0's report,
    producer's report[, consumer 1's report])."""
    r = Ring.create(ring_name, capacity, record_size, consumers=consumers)
    procs = []
    try:
        cmd = [sys.executable, "-m", "exposure.harness.ringsoak"]
        for k in range(consumers):
            extra = ["--consumer", str(k)] + (["--pause-every", str(pause_every)]
                                                if k == 1 and pause_every else [])
            procs.append(subprocess.Popen(
                cmd + ["consume", ring_name, str(records), "--wait", wait, *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        procs.append(subprocess.Popen(cmd + ["produce", ring_name, str(records), "--wait", wait],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        # The consumers first: if one fails, the producer would wait on a full ring forever.
        reports = []
        for p in procs[:consumers]:
            c_out, c_err = p.communicate(timeout=240)
            assert p.returncode == 0, (c_out + c_err).decode()[-2000:]
            reports.append(orjson.loads(c_out))
        p_out, p_err = procs[-1].communicate(timeout=60)
        assert procs[-1].returncode == 0, p_err.decode()[-2000:]
        return (reports[0], orjson.loads(p_out), *reports[1:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        r.close()


@pytest.mark.process
@pytest.mark.timeout(300)
def test_ten_million_records_through_a_small_ring_between_two_processes(ring_name):
    consumer, producer = _soak(ring_name, 10_000_000, 1024, 16, "spin")
    print(consumer, producer)
    assert consumer["ok"] and consumer["records"] == 10_000_000
    assert producer["full_ring_retries"] > 0  # back-pressure was exercised
    # 10M records through 1,024 slots wrapped the ring ~10,000 times.


@pytest.mark.process
@pytest.mark.timeout(300)
def test_event_sized_records_with_a_sleeping_consumer(ring_name):
    consumer, producer = _soak(ring_name, 300_000, 256, 128, "spin-then-block")
    print(consumer, producer)
    assert consumer["ok"] and consumer["records"] == 300_000


@pytest.mark.process
@pytest.mark.timeout(300)
def test_two_consumer_processes_each_verify_every_record_behind_a_slow_one(ring_name):
    """The compute ring's shape: one producer, two consumers in their own processes, one
    of them slow (a journal in its fsync); the producer waits for the slower and never
    overwrites a slot it has not read."""
    fast, producer, slow = _soak(ring_name, 300_000, 256, 128, "spin-then-block",
                                 consumers=2, pause_every=50)
    print(fast, producer, slow)
    assert fast["ok"] and slow["ok"] and fast["records"] == slow["records"] == 300_000
    assert producer["full_ring_retries"] > 0
