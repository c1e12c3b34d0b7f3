"""The process loop (exposure.node.stages.agent.Runner) knows no particular stage: it polls a
process's stages in order, runs their `after`, idles on the input of the first stage fed
from another process, and closes them."""

import os
import uuid

import pytest

from exposure.node.stages.agent import Runner, Stage
from exposure.shm.ring import Ring
from exposure.shm.wait import WaitStrategy

pytestmark = pytest.mark.timeout(60)


class Step(Stage):
    def __init__(self, name, log, fed_by=None, wake_source=None, work=0):
        self.name, self.log, self.fed_by, self.wake_source = name, log, fed_by, wake_source
        self.work = work
        self.closed = False

    def poll(self):
        self.log.append(self.name)
        return self.work

    def close(self):
        self.closed = True


class Answers(Step):
    def after(self):
        self.log.append(f"after {self.name}")


class Selector(Step):
    def wait_io(self, timeout):
        self.log.append(f"wait_io {self.name} {timeout}")
        return True


@pytest.fixture
def ring():
    name = f"exposure-test-agent-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = Ring.create(name, 8, 128, consumers=2)
    yield r
    r.close()


def test_stages_poll_in_order_then_after_and_the_loop_stops_and_closes(ring):
    log, stop = [], []
    a = Answers("ingest", log)
    b = Step("compute", log, fed_by="ingest", wake_source=ring)
    c = Step("fanout", log, fed_by="compute", wake_source=ring)
    beats = []
    r = Runner([a, b, c], WaitStrategy("spin"), progress=beats.append)

    def stopping():
        if len(log) >= 8:
            stop.append(1)
        return 1

    c.poll = lambda: (log.append("fanout"), stopping())[1]
    r.run(stop)
    assert log[:8] == ["ingest", "compute", "fanout", "after ingest"] * 2
    assert beats[0] == 1
    assert r.wake_source is None  # every input is produced inside this process
    r.close()
    assert a.closed and b.closed and c.closed


def test_an_idle_process_sleeps_on_the_input_fed_from_another_process(ring):
    log = []
    journal = Step("journal", log, fed_by="ingest", wake_source=ring.reader(1))
    mirror = Step("mirror", log, fed_by="journal", wake_source=ring)
    r = Runner([journal, mirror], WaitStrategy("sleep", tick_s=0.0001))
    assert r.wake_source is ring.reader(1)  # not the mirror's: the journal feeds it here
    assert r.io is None


def test_a_blocking_process_with_a_selector_sleeps_in_it(ring):
    log, stop = [], []
    ingest = Selector("ingest", log)
    compute = Step("compute", log, fed_by="ingest", wake_source=ring)
    r = Runner([ingest, compute], WaitStrategy("spin-then-block"))
    assert r.io is ingest
    ingest.wait_io = lambda t: (log.append(f"wait_io {t}"), stop.append(1))
    r.run(stop)
    assert log == ["ingest", "compute", "wait_io 0.001"]
    # a spinning process never sleeps in it
    assert Runner([ingest, compute], WaitStrategy("spin")).io is None


def test_the_sequencer_advances_the_gseq_counts_and_wakes_the_sleeping_consumers(ring):
    import numpy as np

    from exposure.node.stages.sequencer import Sequencer
    from exposure.shm import counters_layout as CN

    cnt = np.zeros(CN.COUNTER_WORDS, np.uint64)
    seq = Sequencer(ring, 41, cnt)
    assert seq.last == 40
    seq.commit(3, compute_asleep=1, journal_asleep=0)
    seq.commit(2, compute_asleep=0, journal_asleep=1)
    assert seq.next_gseq == 46 and seq.last == 45
    assert cnt[CN.INDEX["ingest_events_total"]] == 5
    assert cnt[CN.INDEX["ingest_received_gseq"]] == 45
    assert ring.semaphore.value == 1 and ring.reader(1).semaphore.value == 1
    with pytest.raises(ValueError, match="next_gseq 0"):
        Sequencer(ring, 0)
