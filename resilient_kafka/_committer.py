"""The offset committer: offsets are stored and committed only past records that are done.

"Done" is the commit barrier's word (``_barrier``): handled, or its retry/DLQ copy acknowledged.
With ``enable.auto.commit`` librdkafka commits what is stored here; explicit ``commit()`` calls
are clamped to the barrier. Exactly-once mode commits through ``_transaction`` instead.

With concurrent handlers (:meth:`OffsetCommitter.keep_completed`) every stored and committed
offset carries the offsets done above it in its metadata (``_offset_metadata``). librdkafka's
auto-commit commits only an offset that moved, so a change of those alone (a slow record at
the front, records done behind it) is committed here, once per ``auto.commit.interval.ms``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from resilient_kafka import _offset_metadata
from resilient_kafka._barrier import CommitBarrier
from resilient_kafka._record import Record

log = logging.getLogger("resilient_kafka.consumer")

STORE_INTERVAL = 0.05  # seconds between offset-store calls: batches the per-record work
# with completed offsets in the metadata each store encodes them (linear in how many are done
# above a slow record): less often
SPARSE_STORE_INTERVAL = 0.5


class OffsetCommitter:
    """Tracks records through the barrier; stores and commits what it lets through."""

    replays = False  # (exactly-once only) aborted transactions are replayed
    abort_pending = False  # (exactly-once only) the open transaction must be aborted
    generation = 0  # (exactly-once only) bumped by every replay

    def __init__(
        self, native: Consumer, auto_commit: bool, metrics: Any, commit_interval: float = 5.0
    ) -> None:
        self._native = native
        self._auto_commit = auto_commit
        self._metrics = metrics
        self.barrier = CommitBarrier()
        self._last_store = 0.0
        self._sparse = False
        self._commit_interval = commit_interval
        self._last_commit = time.monotonic()
        self._unsent: dict[tuple[str, int], TopicPartition] = {}  # stored, not committed yet
        self._overflowing: set[tuple[str, int]] = set()  # partitions whose done do not all fit
        self._store_interval = STORE_INTERVAL

    def keep_completed(self) -> None:
        """From now on commits carry the offsets completed above them (``run()`` with
        concurrency: records complete out of order)."""
        self._sparse = True
        self._store_interval = SPARSE_STORE_INTERVAL

    def wrote_for(self, record: Record) -> bool:
        return False

    def prefailed(self, record: Record) -> BaseException | None:
        return None

    def maintain(self, now: float) -> float:
        """Store what became safe (auto-commit); returns the longest wait it allows."""
        if self._auto_commit and now - self._last_store >= self._store_interval:
            self._last_store = now
            self._store()
            if self._unsent and now - self._last_commit >= self._commit_interval:
                self._last_commit = now
                self._commit_unsent()
        return 1.0

    def _store(self) -> None:
        if self._sparse:
            offsets = self._with_completed(changed_only=True)
            self._unsent.update(((tp.topic, tp.partition), tp) for tp in offsets)
        else:
            offsets = [TopicPartition(t, p, o) for t, p, o in self.barrier.advanced()]
        if not offsets:
            return
        try:
            Consumer.store_offsets(self._native, offsets=offsets)
        except KafkaException as exc:  # a partition revoked in the meantime
            log.debug("store_offsets skipped: %s", exc)

    def _with_completed(
        self, changed_only: bool, keys: set[tuple[str, int]] | None = None
    ) -> list[TopicPartition]:
        """Offsets to commit, each with the offsets done above it in its metadata."""
        offsets = []
        overflowing = self._overflowing
        for topic, partition, base, done in self.barrier.completed(changed_only, keys):
            metadata, complete = _offset_metadata.encode(base, done)
            key = (topic, partition)
            if complete:
                overflowing.discard(key)
            elif key not in overflowing:  # the rest is handled again after a crash: counted
                overflowing.add(key)  # once until they fit again
                self._metrics.completed_overflow()
            offsets.append(TopicPartition(topic, partition, base, metadata=metadata))
        return offsets

    def _commit_unsent(self) -> None:
        """Commit what was stored since the last time (librdkafka would skip an offset that did
        not move, whatever its metadata says)."""
        offsets = list(self._unsent.values())
        self._unsent.clear()
        try:
            Consumer.commit(self._native, offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.debug("commit of completed offsets skipped: %s", exc)

    def sync_store(self) -> None:
        """Store every safe offset now: librdkafka's own auto-commit (periodic, on revoke and
        on close) commits the stored offsets, and must not commit an older position after an
        explicit commit of a newer one."""
        if self._auto_commit:
            self._store()

    def commit(
        self,
        message: Message | None,
        offsets: list[TopicPartition] | None,
        asynchronous: bool,
    ) -> list[TopicPartition] | None:
        """``Consumer.commit``, never past a record that is not done, whatever is passed.

        A partition's offset is lowered to its first record not done, or to the end of what
        was handed out; partitions this consumer has not handed records of go through as
        given; metadata is kept. What librdkafka refuses (nothing to commit: ``_NO_OFFSET``) it
        refuses as it would."""
        self.sync_store()
        if message is not None:
            offset = message.offset()
            requested = (
                [
                    TopicPartition(message.topic(), message.partition(), offset + 1)  # type: ignore[arg-type]
                ]
                if offset is not None and offset >= 0
                else []
            )
        elif offsets is not None:
            requested = offsets
        else:
            requested = [TopicPartition(t, p, o) for t, p, o in self.barrier.committable()]
        ceiling = self.barrier.ceiling
        clamped = []
        for tp in requested:
            limit = ceiling(tp.topic, tp.partition)
            if limit is not None and tp.offset > limit:
                tp = _lowered(tp, limit)
            clamped.append(tp)
        started = time.monotonic()
        try:
            result: list[TopicPartition] | None = Consumer.commit(  # type: ignore[call-overload]
                self._native, offsets=clamped, asynchronous=asynchronous
            )
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            name = error.name() if isinstance(error, KafkaError) else type(exc).__name__
            self._metrics.commit(time.monotonic() - started, name)
            raise
        if not asynchronous:
            self._metrics.commit(time.monotonic() - started)
        return result

    def _commit_safe(self, keys: set[tuple[str, int]] | None, when: str) -> None:
        self.sync_store()
        if self._sparse:
            safe = self._with_completed(changed_only=False, keys=keys)
            for tp in safe:
                self._unsent.pop((tp.topic, tp.partition), None)
        else:
            safe = [
                TopicPartition(t, p, o)
                for t, p, o in self.barrier.committable()
                if keys is None or (t, p) in keys
            ]
        if not safe:
            return
        try:
            Consumer.commit(self._native, offsets=safe, asynchronous=False)
        except KafkaException as exc:
            log.warning("%s failed (records will be redelivered): %s", when, exc)

    def revoke(self, keys: set[tuple[str, int]]) -> None:
        """Partitions are being revoked (forwards drained): commit theirs while still owned."""
        self._commit_safe(keys, "commit on revoke")

    def lost(self, keys: set[tuple[str, int]]) -> None:
        """Partitions were lost: nothing of theirs can commit now."""

    def forget(self, keys: set[tuple[str, int]]) -> None:
        for key in keys:
            self.barrier.forget(*key)
            self._unsent.pop(key, None)
            self._overflowing.discard(key)

    def close(self, wrote: bool) -> None:
        """The consumer closes (forwards drained): commit what is safe."""
        self._commit_safe(None, "final commit")


def _lowered(tp: TopicPartition, offset: int) -> TopicPartition:
    """``tp`` at ``offset``, its metadata and leader epoch kept."""
    extra: dict[str, Any] = {}
    if tp.metadata is not None:
        extra["metadata"] = tp.metadata
    if tp.leader_epoch is not None:
        extra["leader_epoch"] = tp.leader_epoch
    return TopicPartition(tp.topic, tp.partition, offset, **extra)
