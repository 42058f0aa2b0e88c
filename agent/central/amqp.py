"""The registry on a RabbitMQ cluster: records from a quorum queue over AMQP 0-9-1.

Stations keep speaking MQTT to the cluster's MQTT listeners; RabbitMQ's MQTT plugin
publishes what they send to `amq.topic` with the topic's `/` turned into `.` (and a `.`
into `/`). The durable quorum queue `madoguchi.records` is bound there with
`{prefix}.*.*.records` (`declare_records_queue`, provisioning/cluster/declare-records-queue),
so it survives the loss of any one node of three, and every registry process of the
fleet consumes from it (each message goes to one of them).

Per batch (docs/cluster.md): `Registry.take` validates, stores and commits, then
publishes one ack per station to `amq.topic` (routing key `{prefix}.{site}.{agent}.ack`,
which the station's MQTT subscription receives) and waits for the broker's publisher
confirm of each; only then the batch is settled with one `basic.ack(multiple=True)`. A
registry killed before that settles nothing: the broker hands the batch to another
consumer and the store keeps each record once (its id is the key). At most `prefetch`
messages are unsettled per consumer.

Photo blobs and the registry's retained status stay on MQTT (a registry on AMQP does
not publish one); the `used_tickets` dataset needs the MQTT transport.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage

from agent._aio import Backoff
from agent.central.registry import Inbound
from agent.contract.topics import DEFAULT_PREFIX

if TYPE_CHECKING:
    from agent.central.registry import Registry

__all__ = [
    "RECORDS_QUEUE",
    "AmqpTransport",
    "declare_records_queue",
    "records_binding",
    "routing_key",
    "topic_of",
]

log = logging.getLogger(__name__)

RECORDS_QUEUE = "madoguchi.records"
EXCHANGE = "amq.topic"
#: what a lost broker connection looks like through aio-pika
#: (an ack or a publish on a channel that has just closed: ChannelInvalidStateError)
LOST = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
    ConnectionError,
)

_SWAP = str.maketrans({"/": ".", ".": "/"})


def routing_key(topic: str) -> str:
    """The routing key of an MQTT topic, as RabbitMQ's MQTT plugin maps it."""
    return topic.translate(_SWAP)


def topic_of(key: str) -> str:
    """The MQTT topic of a routing key (the same swap back)."""
    return key.translate(_SWAP)


def records_binding(prefix: str = DEFAULT_PREFIX) -> str:
    """The binding key of every station's records: `madoguchi.v1.*.*.records`."""
    return routing_key(prefix) + ".*.*.records"


def safe_url(url: str) -> str:
    """host:port of an AMQP URL, for a log line (never its password)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


async def declare_records_queue(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    queue: str = RECORDS_QUEUE,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Declare the durable quorum queue of records and bind it on `amq.topic`
    (idempotent: run it again, nothing changes)."""
    connection = await aio_pika.connect(url, ssl_context=ssl_context)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await q.bind(EXCHANGE, routing_key=records_binding(prefix))


class AmqpTransport:
    """`Registry(transport=AmqpTransport(...))`: consume the records queue over AMQP.

    `urls` are tried in turn (one per cluster node) with the registry's usual backoff.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        queue: str = RECORDS_QUEUE,
        prefetch: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not urls:
            raise ValueError("AmqpTransport needs at least one URL")
        self.urls = list(urls)
        self.queue = queue
        self.prefetch = prefetch
        self.ssl_context = ssl_context
        self.connections = 0
        self.settled = 0

    def describe(self) -> str:
        return f"AMQP queue {self.queue} on " + ", ".join(safe_url(u) for u in self.urls)

    async def run(self, registry: Registry) -> None:
        """Consume until cancelled; a lost connection is retried on the next URL."""
        backoff = Backoff(cap=10.0)
        attempt = 0
        while True:
            url = self.urls[attempt % len(self.urls)]
            try:
                await self._session(registry, url, backoff)
            except LOST as e:
                registry.connected.clear()
                if isinstance(e, aiormq.exceptions.ChannelNotFoundEntity):
                    log.error(
                        "registry: AMQP queue %s does not exist: declare it with "
                        "provisioning/cluster/declare-records-queue",
                        self.queue,
                    )
                attempt += 1
                delay = backoff.next()
                log.warning(
                    "registry: AMQP %s: %s; next %s in %.1f s",
                    safe_url(url),
                    e or type(e).__name__,
                    safe_url(self.urls[attempt % len(self.urls)]),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _session(self, registry: Registry, url: str, backoff: Backoff) -> None:
        connection = await aio_pika.connect(url, ssl_context=self.ssl_context)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.prefetch)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            queue = await channel.get_queue(self.queue, ensure=True)  # passive: must exist
            lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

            def closed(_sender: Any, exc: BaseException | None = None) -> None:
                if not lost.done():
                    lost.set_result(exc)

            channel.close_callbacks.add(closed)
            connection.close_callbacks.add(closed)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

            async def deliver(message: AbstractIncomingMessage) -> None:
                inbox.put_nowait(message)

            async def publish(topic: str, payload: bytes) -> None:
                # mandatory=False: an ack for a station with no subscription now is dropped
                # like MQTT drops it; the station re-sends and gets the next one
                await exchange.publish(
                    aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=routing_key(topic),
                    mandatory=False,
                )

            await queue.consume(deliver)
            self.connections += 1
            backoff.reset()
            registry.connected.set()
            log.info("registry consuming %s on %s", self.queue, safe_url(url))
            while True:
                first = asyncio.ensure_future(inbox.get())
                either: set[asyncio.Future[Any]] = {first, lost}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not first.done():
                    first.cancel()
                    raise ConnectionError(f"connection closed: {lost.result() or 'by the broker'}")
                taken = [first.result()]
                while not inbox.empty() and len(taken) < registry.batch_max_messages:
                    taken.append(inbox.get_nowait())
                await registry.take(
                    publish, [Inbound(topic_of(m.routing_key or ""), m.body) for m in taken]
                )
                # stored, committed, acks confirmed: settle the whole batch at once
                await taken[-1].ack(multiple=True)
                self.settled += len(taken)
