"""A record in the consumer's hands, with everything the consumer knows about it.

The application sees the confluent ``Message``; the consumer keeps this beside it from admission
to settlement, so nothing about a record lives in side tables keyed by ``id(msg)``.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Message


class Record:
    """One admitted record: its coordinates, its partition's progress in the commit barrier,
    what it was handed out with (breaker openings, the producer's count of outputs), and, when
    there are any, its raw bytes, dedup claim and process span."""

    # the rarely set fields live in a per-record dict created on first use (class defaults
    # below), so creating a record costs only the fields every record has
    __slots__ = ("__dict__", "msg", "offset", "opens", "partition", "produced", "progress", "topic")

    raw: tuple[Any, Any] | None = None  # (key, value) as fetched, when deserialized
    claim: str | None = None  # the dedup claim this consumer holds for it
    identity: str | None = None  # its dedup key (run() with concurrency: twins wait in turn)
    writes: list[int] | None = None  # exactly-once with concurrency: what its handler produced
    queued_at = 0.0  # run() with concurrency: when it began to wait behind its key
    span: Any = None  # the process span around its handler, when traced

    def __init__(self, msg: Message, topic: str, partition: int, offset: int) -> None:
        self.msg = msg
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.progress: Any = None  # its partition's progress in the commit barrier
        self.opens = 0  # breaker openings seen when it was handed out
        self.produced = 0  # exactly-once: the producer's output count when it was handed out

    def raw_key_value(self) -> tuple[Any, Any]:
        """Key and value as they came from the broker (what a retry or DLQ copy carries)."""
        raw = self.raw
        if raw is not None:
            return raw
        msg = self.msg
        return msg.key(), msg.value()

    @property
    def key(self) -> tuple[str, int]:
        """(topic, partition): how partition control and outages name its partition."""
        return (self.topic, self.partition)

    @property
    def coordinates(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    def __repr__(self) -> str:
        return f"<Record {self.topic} [{self.partition}] @{self.offset}>"
