"""Admission: whether a fetched record may be handed out now.

A retry record waits for its due time (its partition pauses until then), but never longer than
its tier's delay (with jitter) after this consumer first fetched it, whatever its ``rk.due``
header or the writer's clock says; during an outage only
the probe's trial record passes; an aborted transaction's failed record is routed without its
handler; undeserializable records go to the DLQ with their raw bytes; records an earlier owner
of the partition completed (its commit metadata says so) are done without their handler. Every
admitted record is tracked by the commit barrier before anyone sees it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Message
from confluent_kafka.serialization import MessageField, SerializationContext

from resilient_kafka import headers, schemas
from resilient_kafka._outage import SCHEMA_REGISTRY, OutageControl
from resilient_kafka._partitions import RETRY_DUE, PartitionControl
from resilient_kafka._record import Record
from resilient_kafka._settle import Settlement
from resilient_kafka._topics import Topics
from resilient_kafka.errors import DeserializationError

log = logging.getLogger("resilient_kafka.consumer")

# a due time this much beyond the tier's longest delay is still taken as written (clocks of
# consumers on different hosts differ a little)
_CLOCK_SLACK_MS = 1000.0


class Admission:
    """Turns fetched messages into :class:`Record` objects, or keeps them back."""

    def __init__(
        self,
        topics: Topics,
        control: PartitionControl,
        outage: OutageControl,
        committer: Any,
        settle: Settlement,
        metrics: Any,
        retry_delays: tuple[float, ...],
        retry_jitter: float,
        key_deserializer: Any,
        value_deserializer: Any,
    ) -> None:
        self._tiers = topics.tiers
        self._control = control
        self._outage = outage
        self._committer = committer
        self._track = committer.barrier.track  # bound once: the hot path
        self._replays = committer.replays  # exactly-once: records of aborted transactions
        self._settle = settle
        self._metrics = metrics
        self._delays = retry_delays
        self._jitter = retry_jitter
        # retry partition -> (offset, wall-clock ms) of the record not due when first fetched
        self._first_fetched: dict[tuple[str, int], tuple[int, float]] = {}
        self._warned_due: set[tuple[str, int]] = set()
        self._key_deserializer = key_deserializer
        self._value_deserializer = value_deserializer
        self._deserializing = key_deserializer is not None or value_deserializer is not None
        # partition -> (offsets completed by an earlier owner, the highest of them)
        self._completed: dict[tuple[str, int], tuple[frozenset[int], int]] = {}
        self._plain = not self._deserializing and not self._replays  # nothing to check but due

    def skip_completed(self, key: tuple[str, int], offsets: frozenset[int]) -> None:
        """The partition's records at ``offsets`` were completed by its earlier owner (read
        from the commit metadata when it was assigned): done when fetched, not handled."""
        if offsets:
            self._completed[key] = (offsets, max(offsets))
            self._plain = False

    def forget(self, keys: set[tuple[str, int]]) -> None:
        for key in keys:
            self._completed.pop(key, None)
            self._first_fetched.pop(key, None)
            self._warned_due.discard(key)
        self._replan()

    @property
    def deserializing(self) -> bool:
        return self._deserializing

    @property
    def plain(self) -> bool:
        """Nothing to check for a record of a main topic: no deserializer, no transaction
        replays, no records an earlier owner completed."""
        return self._plain

    def _replan(self) -> None:
        self._plain = not self._deserializing and not self._replays and not self._completed

    def admit(self, msg: Message) -> Record | None:
        """A :class:`Record` for ``msg`` to hand out, or None (kept back, or settled here)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        record = Record(msg, topic, partition, offset)  # type: ignore[arg-type]
        outage = self._outage
        if outage.current is None:
            if self._plain and topic not in self._tiers:  # the common case, inline
                record.progress = self._track(topic, partition, offset)
                return record
            return self._checked(record)
        # an outage first: a not-due check below would seek past records refused earlier
        if not outage.admits(record, record.topic in self._tiers):
            return None
        admitted = self._checked(record)
        current = outage.current
        if admitted is None and current is not None and record is current.trial_record:
            outage.abandon_trial()
        return admitted

    def probe(self, record: Record | None) -> Record | None:
        """The held record, to hand out as the probe: deserialized now if it was held before
        (a DLQ flood held its dead letter); None if that fails (it went to the DLQ)."""
        if record is None or not self._deserializing or record.raw is not None:
            return record
        return self._deserialized(record)

    def _checked(self, record: Record) -> Record | None:
        if self._completed and self._done_before(record):
            return None
        if record.topic in self._tiers and not self._due(record):
            return None
        record.progress = self._track(record.topic, record.partition, record.offset)
        if self._replays:
            exc = self._committer.prefailed(record)
            if exc is not None:  # its attempt was aborted with its transaction: route it
                self._settle.route(record, exc)
                return None
        if self._deserializing:
            return self._deserialized(record)
        return record

    def _done_before(self, record: Record) -> bool:
        """Whether an earlier owner completed the record: if so it is done here and now."""
        known = self._completed.get(record.key)
        if known is None:
            return False
        offsets, highest = known
        if record.offset >= highest:  # the last of them, or past them: nothing more to skip
            del self._completed[record.key]
            self._replan()
        if record.offset not in offsets:
            return False
        progress = self._track(record.topic, record.partition, record.offset)
        self._committer.barrier.done(progress, record.offset)
        self._metrics.completed_skipped(record.topic)
        return True

    def _due(self, record: Record) -> bool:
        key = record.key
        if self._control.paused_for(key, RETRY_DUE):
            # fetched behind a record that is not due (in the same batch, or before a pause
            # reached the native consumer): from here on, unless a lower position is set
            self._control.rewind(key, record.offset)
            return False
        due = headers.due(record.msg)
        if due is None:
            return True
        now_ms = time.time() * 1000
        tier = self._tiers[record.topic][1]
        nominal = self._delays[tier - 1] if tier <= len(self._delays) else 0.0
        if due > now_ms:
            longest = nominal * (1 + self._jitter) * 1000 + _CLOCK_SLACK_MS
            first = self._first_fetched.get(key)
            if first is None or first[0] != record.offset:
                first = self._first_fetched[key] = (record.offset, now_ms)
                if due - now_ms > longest:
                    self._absurd_due(record, due - now_ms, nominal)
            limit = first[1] + longest
            if now_ms < limit:
                self._control.pause_until(key, int(min(due, limit)), record.offset)
                return False
        self._first_fetched.pop(key, None)
        self._metrics.retry_delay(record.topic, (now_ms - due) / 1000 + nominal)
        return True

    def _absurd_due(self, record: Record, ahead_ms: float, nominal: float) -> None:
        """``rk.due`` lies further ahead than the tier's delay: a forged or broken header, or
        the writer's clock ahead. Counted, logged (once per partition), waited for no longer
        than the delay."""
        self._metrics.due_clamped(record.topic)
        log_at = logging.DEBUG if record.key in self._warned_due else logging.WARNING
        self._warned_due.add(record.key)
        log.log(
            log_at,
            "retry record %s [%d] @%d is due %.0fs from now, more than its tier's delay "
            "(%.1fs): waiting only the delay (a bad rk.due header or the writer's clock ahead; "
            "logged once per partition)",
            record.topic,
            record.partition,
            record.offset,
            ahead_ms / 1000,
            nominal,
        )

    def _deserialized(self, record: Record) -> Record | None:
        msg = record.msg
        raw = (msg.key(), msg.value())
        field = "key"
        try:
            if self._key_deserializer is not None:
                ctx = SerializationContext(record.topic, MessageField.KEY, msg.headers())
                msg.set_key(self._key_deserializer(raw[0], ctx))
            field = "value"
            if self._value_deserializer is not None:
                ctx = SerializationContext(record.topic, MessageField.VALUE, msg.headers())
                msg.set_value(self._value_deserializer(raw[1], ctx))
        except Exception as exc:
            msg.set_key(raw[0])
            msg.set_value(raw[1])
            if schemas.registry_unavailable(exc):  # not the record's fault: hold it, pause
                log.warning(
                    "record %s [%d] @%d not deserialized, the schema registry did not answer: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                self._settle.held(record, SCHEMA_REGISTRY)
                return None
            schema = schemas.reference(raw[0] if field == "key" else raw[1], msg.headers(), field)
            error = DeserializationError(
                f"cannot deserialize the record's {field}"
                + (f" (schema {schema})" if schema is not None else "")
                + f": {type(exc).__name__}: {exc}",
                field=field,
                schema=schema,
            )
            error.__cause__ = exc
            log.warning(
                "record %s [%d] @%d cannot be deserialized; sending it to the DLQ: %s",
                record.topic,
                record.partition,
                record.offset,
                error,
            )
            current = self._outage.current
            if current is not None and record is current.trial_record:
                self._outage.abandon_trial()  # no probe: the downstream was not called
            self._settle.refused(record, error, headers.DESERIALIZATION)
            return None
        record.raw = raw
        return record
