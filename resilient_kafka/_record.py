"""A record in the consumer's hands, with everything the consumer knows about it.

The application sees the confluent ``Message``; the consumer keeps this beside it from admission
to settlement, so nothing about a record lives in side tables keyed by ``id(msg)``.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Message


class Record:
    """One admitted record: its coordinates, raw bytes, dedup claim and what it was handed out
    with (breaker openings, the producer's count of outputs, the process span)."""

    __slots__ = (
        "claim",
        "msg",
        "offset",
        "opens",
        "partition",
        "produced",
        "progress",
        "raw",
        "span",
        "topic",
    )

    def __init__(self, msg: Message, topic: str, partition: int, offset: int) -> None:
        self.msg = msg
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.raw: tuple[Any, Any] | None = None  # (key, value) as fetched, when deserialized
        self.claim: str | None = None  # the dedup claim this consumer holds for it
        self.opens = 0  # breaker openings seen when it was handed out
        self.produced = 0  # exactly-once: the producer's output count when it was handed out
        self.span: Any = None  # the process span around its handler, when traced
        self.progress: Any = None  # its partition's progress in the commit barrier

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
