"""Session clients: send records to a node (or a pair) with resends and failover.

    from exposure.client import Producer, send_records
    acked = send_records(records, host="127.0.0.1", port=9400, session=1, secret=b"...")
    with Producer(config="node.toml", session=7) as p:   # held open: docs/client.md
        p.send(record_or_array_or_dict)
    async with await AsyncProducer.open("node.toml", session=8) as p:   # for asyncio
        await p.send(record_or_array_or_dict)

The implementations are :mod:`exposure.net.client` and :mod:`exposure.net.producer`; this
module is what users import.
"""

from exposure.net import producer as _producer
from exposure.net.aio import AsyncProducer as _AsyncProducer
from exposure.net.client import HEARTBEAT_S, SendError, login, send_records
from exposure.net.producer import Ack, AuthError, FlushTimeout, ProducerError, WindowFull

__all__ = ["send_records", "SendError", "login", "HEARTBEAT_S", "Producer", "Ack",
           "ProducerError", "WindowFull", "FlushTimeout", "AuthError", "AsyncProducer"]


class Producer(_producer.Producer):
    """A session held open all day (:class:`exposure.net.producer.Producer`; the guide:
    docs/client.md). ``config`` may also be a node's TOML path, or None for the built-in
    default node on this host (unless ``endpoints`` are given)."""

    def __init__(self, config=None, session: int = 1, **kwargs) -> None:
        from exposure.config.node import NodeConfig, load_config

        if not isinstance(config, NodeConfig) and (config is not None
                                                   or kwargs.get("endpoints") is None):
            config = load_config(config)
        super().__init__(config, session, **kwargs)


class AsyncProducer(_AsyncProducer):
    """The producer for asyncio (:class:`exposure.net.aio.AsyncProducer`): ``p = await
    AsyncProducer.open(config, session, **kwargs)``; ``config`` as for :class:`Producer`."""

    @classmethod
    async def open(cls, config=None, session: int = 1, **kwargs) -> _AsyncProducer:
        kwargs.setdefault("factory", Producer)
        return await super().open(config, session, **kwargs)
