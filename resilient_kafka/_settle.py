"""Settlement: the one place where a record's outcome is applied.

Every path (``run()``'s executor, the drop-in ``poll()``/``consume()`` and ``fail()``, and
admission's own refusals) ends a record here: done, failed, held, a duplicate, or later.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Message

from resilient_kafka._forwarding import Forwarder
from resilient_kafka._outage import BREAKER, DLQ_FLOOD, OutageControl
from resilient_kafka._partitions import PartitionControl
from resilient_kafka._record import Record
from resilient_kafka._routing import Router


class Settlement:
    """Applies outcomes to the barrier, dedup claims, outages, routing and metrics."""

    def __init__(
        self,
        committer: Any,
        claims: Any,
        outage: OutageControl,
        router: Router,
        forwarder: Forwarder,
        control: PartitionControl,
        metrics: Any,
    ) -> None:
        self._committer = committer
        self._done = committer.barrier.done  # bound once: the hot path
        self._barrier = committer.barrier
        self._claims = claims
        self._outage = outage
        self._flood = outage.flood
        self._router = router
        self._forwarder = forwarder
        self._control = control
        self._success = metrics.success
        self._metrics = metrics

    def done(self, record: Record) -> None:
        """Handled: its offset may commit, its claim becomes a done entry, a probe ends the
        outage."""
        self._done(record.progress, record.offset)
        self._success(record.topic)
        if self._flood is not None:
            self._flood.record(False)
        if self._claims is not None:
            self._claims.complete(record)
        if self._outage.current is not None and self._outage.is_probe(record):
            self._outage.end(seek_past=record)

    def done_batch(self, msgs: list[Message], topics: set[str]) -> None:
        """A batch was handled whole, with nothing to settle per record (no dedup claim, no
        outage, no probe): each partition's range moves past at once."""
        barrier = self._barrier
        for (topic, partition), (first, last) in _ranges(msgs, topics).items():
            if not barrier.done_range(topic, partition, first, last):
                track, done = barrier.track, barrier.done
                for msg in msgs:  # records before them are outstanding: one by one
                    if msg.partition() == partition and msg.topic() == topic:
                        offset: int = msg.offset()  # type: ignore[assignment]
                        done(track(topic, partition, offset), offset)
        if len(topics) == 1:
            self._metrics.handled(msgs[0].topic(), len(msgs))
        else:
            for msg in msgs:
                self._metrics.handled(msg.topic(), 1)
        if self._flood is not None:
            self._flood.succeeded(len(msgs))

    def failed(self, record: Record, exc: BaseException) -> None:
        """The handler raised: hold it (an outage: not the record's fault), or route it to its
        next retry tier or the DLQ. Its claim is released (the next attempt claims again)."""
        if record.claim is not None:
            self._claims.release(record)
        outage = self._outage
        if self._committer.wrote_for(record):
            # its output is in the open transaction: abort and replay at the next
            # housekeeping; the record is routed when it comes again, without running the
            # handler (an outage holds it instead)
            tripped = outage.tripped(record, exc)
            self._committer.abort_for(record, None if tripped else exc)
            if not tripped:
                return
        probe = outage.is_probe(record)
        if outage.blame(record, exc):
            outage.hold(record, BREAKER)  # refused, or it tripped a breaker
            return
        if not self.route(record, exc) and probe:
            outage.end(seek_past=record)  # the downstream answered; the record failed alone

    def route(self, record: Record, exc: BaseException, reason: str | None = None) -> bool:
        """Send ``record`` on to a retry tier or the DLQ; True if a DLQ flood holds it instead."""
        forward = self._router.route(record, exc, reason)
        if forward is None:
            self._outage.hold(record, DLQ_FLOOD)
            return True
        self._forwarder.add(forward)
        return False

    def refused(self, record: Record, exc: BaseException, reason: str) -> None:
        """Never handed to the handler (no identity, or undeserializable): to the DLQ."""
        probe = self._outage.is_probe(record)
        if not self.route(record, exc, reason) and probe:
            self._outage.end(seek_past=record)

    def held(self, record: Record, reason: str) -> None:
        """Kept back by an outage of ``reason`` (no attempt counted)."""
        self._outage.hold(record, reason)

    def duplicate(self, record: Record) -> None:
        """Processed before (dedup): done without its handler."""
        self._done(record.progress, record.offset)
        if self._outage.is_probe(record):
            self._outage.end(seek_past=record)  # the store answered

    def later(self, record: Record) -> None:
        """Not now (its dedup identity is claimed elsewhere): delivered again, never done."""
        self._control.rewind(record.key, record.offset)
        if self._outage.is_probe(record):
            self._outage.end(seek_past=None)  # the store answered


_partition_of = Message.partition
_topic_of = Message.topic
_offset_of = Message.offset


def _ranges(msgs: list[Message], topics: set[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (first offset, last offset) of a batch's records (in fetch
    order, so ascending within a partition); mapped in C, not looped in Python."""
    keys: list[Any]
    if len(topics) == 1:
        topic = next(iter(topics))
        keys = list(map(_partition_of, msgs))
        if keys.count(keys[0]) == len(keys):
            return {(topic, keys[0]): (msgs[0].offset(), msgs[-1].offset())}  # type: ignore[dict-item]
    else:
        keys = list(zip(map(_topic_of, msgs), map(_partition_of, msgs), strict=True))
    last = dict(zip(keys, map(_offset_of, msgs), strict=True))
    first = dict(zip(reversed(keys), map(_offset_of, reversed(msgs)), strict=True))
    if len(topics) == 1:
        return {(topic, key): (first[key], offset) for key, offset in last.items()}
    return {key: (first[key], offset) for key, offset in last.items()}
