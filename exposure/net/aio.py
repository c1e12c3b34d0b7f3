"""The producer for asyncio: :class:`AsyncProducer`, the same session on an event loop.

    async with await AsyncProducer.open("node.toml", session=7) as p:
        seq = await p.send({"type": "fill", ...})   # waits (off the loop) only for window room
        await p.flush(timeout=30)
        async for ack in p.results():               # every acknowledgement, in order
            ...

It wraps one :class:`exposure.net.producer.Producer` (its I/O thread does the work). A
``send`` that fits the window is the producer's own call, made on the loop (it never waits
there); one that must wait for room waits in a worker thread, so the loop goes on. Login,
``flush`` and ``close`` wait in worker threads too. Acknowledgements reach the loop through
``call_soon_threadsafe`` into a bounded queue (the oldest dropped beyond ``results_max``,
counted in ``stats['results_dropped']``, as :meth:`Producer.results` does).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

from exposure.net.producer import Ack, Producer

__all__ = ["AsyncProducer"]


class AsyncProducer:
    """A :class:`Producer` for asyncio code; make one with :meth:`open`."""

    def __init__(self, producer: Producer, loop: asyncio.AbstractEventLoop,
                 results_max: int = 65536) -> None:
        self.producer = producer
        self._loop = loop
        self._acks: collections.deque[Ack] = collections.deque()
        self._max = int(results_max)
        self._more = asyncio.Event()

    @classmethod
    async def open(cls, config=None, session: int = 1, *,
                   factory: Callable[..., Producer] = Producer, results_max: int = 65536,
                   **kwargs: Any) -> AsyncProducer:
        """Connect and log in (in a worker thread) and return the producer. ``factory``
        makes the :class:`Producer` (``exposure.client.Producer`` also takes a TOML path);
        other keywords are the producer's (``on_result`` too: it runs on the I/O thread,
        before the acknowledgement reaches the loop)."""
        loop = asyncio.get_running_loop()
        user = kwargs.pop("on_result", None)
        box: list[AsyncProducer] = []

        def on_result(ack: Ack) -> None:
            if user is not None:
                user(ack)
            if box:
                loop.call_soon_threadsafe(box[0]._put, ack)

        p = await asyncio.to_thread(factory, config, session, on_result=on_result, **kwargs)
        ap = cls(p, loop, results_max)
        box.append(ap)
        return ap

    def _put(self, ack: Ack) -> None:
        if len(self._acks) >= self._max:
            self._acks.popleft()
            self.producer.stats["results_dropped"] += 1
        self._acks.append(ack)
        self._more.set()

    async def send(self, event) -> int:
        """:meth:`Producer.send`: the (last) session seq assigned."""
        n = len(event) if isinstance(event, (list, tuple)) or hasattr(event, "shape") else 1
        if self.producer.room >= max(n, 1):
            return self.producer.send(event)
        return await asyncio.to_thread(self.producer.send, event)

    async def flush(self, timeout: float | None = None) -> None:
        """:meth:`Producer.flush`, waited for off the loop."""
        await asyncio.to_thread(self.producer.flush, timeout)

    async def results(self, timeout: float | None = None) -> AsyncIterator[Ack]:
        """The acknowledgements in order, until none comes for ``timeout`` seconds (None:
        until the producer is closed)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            while self._acks:
                yield self._acks.popleft()
                deadline = None if timeout is None else loop.time() + timeout
            if self.closed:
                return
            self._more.clear()
            left = 0.5 if deadline is None else min(0.5, deadline - loop.time())
            if left <= 0:
                return
            try:  # (in slices: a producer that fails says so through ``closed``)
                await asyncio.wait_for(self._more.wait(), left)
            except TimeoutError:
                pass

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has disconnected (or the producer failed)."""
        return self.producer.closed

    @property
    def acked(self) -> int:
        """The highest acknowledged (processed and durable) session seq."""
        return self.producer.acked

    @property
    def sent(self) -> int:
        """The highest session seq assigned by ``send``."""
        return self.producer.sent

    @property
    def stats(self) -> dict[str, Any]:
        return self.producer.stats

    async def close(self, timeout: float = 30.0) -> None:
        """:meth:`Producer.close` (flush, then disconnect), off the loop."""
        try:
            await asyncio.to_thread(self.producer.close, timeout)
        finally:
            self._more.set()  # a results() loop ends

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, et, ev, tb) -> None:
        await self.close()
