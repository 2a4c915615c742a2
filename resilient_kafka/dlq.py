"""Dead-letter queue operations: read, filter, summarise and replay DLQ records.

Reads the headers resilient-kafka writes (``rk.*``) and those of Java systems — Spring
(``kafka_dlt-*``, binary ints and longs), Kafka Connect (``__connect.errors.*``) and Kafka Streams
(``__streams.errors.*``) — so a Python team can work with any DLQ. Replays go to the failing
group's first retry tier by default (only that group sees them, and the retry consumer paces
them), record their progress in a consumer group, and never delete from the DLQ.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from resilient_kafka import headers as rk
from resilient_kafka.errors import ConfigurationError, ResilientKafkaError

REPLAY_COUNT = "rk.replay.count"
REPLAY_AT = "rk.replay.at"

_SPRING = "kafka_dlt-"
_CONNECT = "__connect.errors."
_STREAMS = "__streams.errors."


class DLQError(ResilientKafkaError):
    """A DLQ operation cannot proceed (unknown topic, bad selection, unknown target...)."""


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ record, decoded whichever system wrote it."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    family: str  # resilient-kafka | spring | connect | streams | unknown
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    original_timestamp: int | None = None
    attempt: int | None = None
    reason: str | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    stacktrace: str | None = None
    consumer_group: str | None = None
    replay_count: int = 0
    schema: str | None = None  # the Schema Registry schema a refused key/value names
    problems: tuple[str, ...] = ()  # headers that were present but could not be decoded

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-safe data: text where it is UTF-8, else ``{"hex": ...}``."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "key": _json_bytes(self.key),
            "family": self.family,
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "original_timestamp": self.original_timestamp,
            "attempt": self.attempt,
            "reason": self.reason,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "consumer_group": self.consumer_group,
            "replay_count": self.replay_count,
            "schema": self.schema,
            "problems": list(self.problems),
        }


def _json_bytes(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": data.hex()}


def text(data: bytes | None) -> str:
    """Bytes for display: UTF-8 text, or a hex dump marker when it is not UTF-8."""
    if data is None:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes, not UTF-8: {data[:32].hex()}{'…' if len(data) > 32 else ''}>"


def render_value(data: bytes | None) -> tuple[str, str]:
    """``(kind, rendering)`` of a value: pretty JSON, plain text, or a hex dump."""
    if data is None:
        return "null", ""
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        lines = [
            f"{i:08x}  {data[i : i + 16].hex(' '):<47}  "
            + "".join(chr(b) if 32 <= b < 127 else "." for b in data[i : i + 16])
            for i in range(0, min(len(data), 4096), 16)
        ]
        return "hex", "\n".join(lines)
    try:
        return "json", json.dumps(json.loads(decoded), indent=2, ensure_ascii=False)
    except ValueError:
        return "text", decoded


# -- decoding -----------------------------------------------------------------------------


class _Decoder:
    """Header lookups that note what could not be decoded instead of failing."""

    def __init__(self, hdrs: Mapping[str, bytes]) -> None:
        self.hdrs = hdrs
        self.problems: list[str] = []

    def text(self, name: str) -> str | None:
        value = self.hdrs.get(name)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            self.problems.append(f"{name}: not UTF-8")
            return value.decode("utf-8", "replace")

    def decimal(self, name: str) -> int | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            self.problems.append(f"{name}: not an integer: {value[:40]!r}")
            return None

    def binary(self, name: str) -> int | None:
        """Spring's big-endian int (4 bytes) or long (8 bytes); tolerate decimal text."""
        value = self.hdrs.get(name)
        if value is None:
            return None
        if len(value) == 4:
            return int(struct.unpack(">i", value)[0])
        if len(value) == 8:
            return int(struct.unpack(">q", value)[0])
        try:
            return int(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            self.problems.append(f"{name}: expected a 4- or 8-byte integer, got {len(value)} bytes")
            return None


def _schema(d: _Decoder) -> str | None:
    """``value schema id 5`` (or ``key schema guid ...``) from the rk.schema.* headers."""
    schema_id, guid = d.decimal(rk.SCHEMA_ID), d.text(rk.SCHEMA_GUID)
    if schema_id is None and guid is None:
        return None
    named = f"id {schema_id}" if schema_id is not None else f"guid {guid}"
    return f"{d.text(rk.SCHEMA_FIELD) or 'value'} schema {named}"


def decode(msg: Any) -> DeadLetter:
    """Decode a consumed DLQ message into a :class:`DeadLetter`."""
    raw_headers = tuple((k, v if v is not None else b"") for k, v in (msg.headers() or ()))
    hdrs = dict(raw_headers)
    d = _Decoder(hdrs)
    kind, ts = msg.timestamp()
    fields: dict[str, Any] = {}
    if any(k.startswith(rk.PREFIX) and k != REPLAY_COUNT for k in hdrs):
        fields = {
            "family": "resilient-kafka",
            "original_topic": d.text(rk.ORIGINAL_TOPIC),
            "original_partition": d.decimal(rk.ORIGINAL_PARTITION),
            "original_offset": d.decimal(rk.ORIGINAL_OFFSET),
            "original_timestamp": d.decimal(rk.ORIGINAL_TIMESTAMP),
            "attempt": d.decimal(rk.ATTEMPT),
            "reason": d.text(rk.REASON),
            "exception_type": d.text(rk.EXCEPTION_TYPE),
            "exception_message": d.text(rk.EXCEPTION_MESSAGE),
            "stacktrace": d.text(rk.EXCEPTION_STACKTRACE),
            "consumer_group": d.text(rk.CONSUMER_GROUP),
            "schema": _schema(d),
        }
    elif any(k.startswith(_SPRING) for k in hdrs):
        fields = {
            "family": "spring",
            "original_topic": d.text(_SPRING + "original-topic"),
            "original_partition": d.binary(_SPRING + "original-partition"),
            "original_offset": d.binary(_SPRING + "original-offset"),
            "original_timestamp": d.binary(_SPRING + "original-timestamp"),
            "attempt": d.binary("retry_topic-attempts"),
            "exception_type": d.text(_SPRING + "exception-fqcn"),
            "exception_message": d.text(_SPRING + "exception-message"),
            "stacktrace": d.text(_SPRING + "exception-stacktrace"),
            "consumer_group": d.text(_SPRING + "original-consumer-group"),
        }
    elif any(k.startswith(_CONNECT) for k in hdrs):
        fields = {
            "family": "connect",
            "original_topic": d.text(_CONNECT + "topic"),
            "original_partition": d.decimal(_CONNECT + "partition"),
            "original_offset": d.decimal(_CONNECT + "offset"),
            "exception_type": d.text(_CONNECT + "exception.class.name"),
            "exception_message": d.text(_CONNECT + "exception.message"),
            "stacktrace": d.text(_CONNECT + "exception.stacktrace"),
            "consumer_group": d.text(_CONNECT + "connector.name"),
            "reason": d.text(_CONNECT + "stage"),
        }
    elif any(k.startswith(_STREAMS) for k in hdrs):
        fields = {
            "family": "streams",
            "original_topic": d.text(_STREAMS + "topic"),
            "original_partition": d.decimal(_STREAMS + "partition"),
            "original_offset": d.decimal(_STREAMS + "offset"),
            "exception_type": d.text(_STREAMS + "exception"),
            "exception_message": d.text(_STREAMS + "exception.message"),
            "stacktrace": d.text(_STREAMS + "exception.stacktrace"),
        }
    else:
        fields = {"family": "unknown"}
    replays = d.decimal(REPLAY_COUNT) or 0
    return DeadLetter(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        timestamp=ts if kind else None,
        key=msg.key(),
        value=msg.value(),
        headers=raw_headers,
        replay_count=replays,
        problems=tuple(d.problems),
        **fields,
    )


# -- selecting ----------------------------------------------------------------------------


def parse_time(value: str) -> int:
    """Epoch ms from ISO-8601 (``2026-11-25T08:00``, UTC unless it says otherwise), epoch
    seconds/ms, or a relative ``-15m`` / ``-2h`` / ``-1d``."""
    value = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value.startswith("-") and value[-1:] in units and value[1:-1].replace(".", "").isdigit():
        return int((time.time() - float(value[1:-1]) * units[value[-1]]) * 1000)
    if value.isdigit():
        number = int(value)
        return number if number > 10**11 else number * 1000
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"cannot read time {value!r}: use ISO-8601 (2026-11-25T08:00), epoch seconds or "
            "milliseconds, or a relative -15m / -2h / -1d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


@dataclass(frozen=True)
class Selection:
    """Which DLQ records an operation applies to; every given criterion must match."""

    since: int | None = None  # epoch ms, inclusive
    until: int | None = None  # epoch ms, exclusive
    exception: str | None = None  # substring of the exception type (case-insensitive)
    reason: str | None = None
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> exact UTF-8 value

    def matches(self, record: DeadLetter) -> bool:
        ts = record.timestamp
        if self.since is not None and (ts is None or ts < self.since):
            return False
        if self.until is not None and (ts is None or ts >= self.until):
            return False
        if (
            self.exception is not None
            and self.exception.lower() not in (record.exception_type or "").lower()
        ):
            return False
        if self.reason is not None and record.reason != self.reason:
            return False
        if self.key is not None and record.key != self.key.encode():
            return False
        hdrs = dict(record.headers)
        return all(hdrs.get(name) == value.encode() for name, value in self.headers.items())


# -- reading ------------------------------------------------------------------------------


def _consumer(config: Mapping[str, Any], **extra: Any) -> Any:
    from confluent_kafka import Consumer

    conf = {
        "group.id": f"rk-dlq-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        **config,
        **extra,
    }
    return Consumer(conf)


def _partitions(consumer: Any, topic: str, where: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=15)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise DLQError(f"topic {topic!r} does not exist on {where}")
    return sorted(info.partitions)


def scan(
    config: Mapping[str, Any],
    topic: str,
    *,
    idle_timeout: float = 3.0,
    timeout: float = 120.0,
) -> Iterator[DeadLetter]:
    """Every record of ``topic`` from the beginning, decoded; ends at the end of every partition.

    The end is where each partition reports EOF; a partition that stays silent for
    ``idle_timeout`` seconds is taken to be at its end too.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    where = str(config.get("bootstrap.servers", "?"))
    consumer = _consumer(config)
    try:
        partitions = _partitions(consumer, topic, where)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = set(partitions)
        deadline = time.monotonic() + timeout
        last_seen = time.monotonic()
        while remaining and time.monotonic() < deadline:
            batch = consumer.consume(500, timeout=0.2)
            if not batch:
                if time.monotonic() - last_seen >= idle_timeout:
                    break
                continue
            last_seen = time.monotonic()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                    continue
                yield decode(msg)
    finally:
        consumer.close()


def read(
    config: Mapping[str, Any], topic: str, selection: Selection | None = None
) -> list[DeadLetter]:
    """The records of ``topic`` that ``selection`` matches, in partition/offset order."""
    chosen = [r for r in scan(config, topic) if selection is None or selection.matches(r)]
    return sorted(chosen, key=lambda r: (r.partition, r.offset))


def fetch(
    config: Mapping[str, Any], topic: str, offset: int, partition: int | None = None
) -> DeadLetter:
    """The record at ``offset`` (in ``partition``, which may be omitted if only one has it)."""
    records = [
        r
        for r in scan(config, topic)
        if r.offset == offset and (partition is None or r.partition == partition)
    ]
    if not records:
        where = f"partition {partition}" if partition is not None else "any partition"
        raise DLQError(f"no record at offset {offset} in {where} of {topic!r}")
    if len(records) > 1:
        found = ", ".join(str(p) for p in sorted(r.partition for r in records))
        raise DLQError(
            f"offset {offset} exists in partitions {found} of {topic!r}; pass --partition"
        )
    return records[0]


@dataclass
class Stats:
    """Counts of DLQ records by exception type, reason, original partition and hour (UTC)."""

    total: int = 0
    by_exception: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_original_partition: Counter[str] = field(default_factory=Counter)
    by_hour: Counter[str] = field(default_factory=Counter)


def stats(records: Iterable[DeadLetter]) -> Stats:
    result = Stats()
    for r in records:
        result.total += 1
        result.by_exception[r.exception_type or "?"] += 1
        result.by_reason[r.reason or "?"] += 1
        result.by_original_partition[f"{r.original_topic or '?'}[{r.original_partition}]"] += 1
        hour = (
            datetime.fromtimestamp(r.timestamp / 1000, UTC).strftime("%Y-%m-%d %H:00")
            if r.timestamp
            else "?"
        )
        result.by_hour[hour] += 1
    return result


# -- replaying ----------------------------------------------------------------------------


@dataclass
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do)."""

    replayed: int = 0
    skipped_filtered: int = 0
    refused_replay_limit: int = 0
    targets: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False


def replay_target(record: DeadLetter, to: str, retry_template: str) -> str:
    """Where a record goes: ``retry`` (its group's first tier), ``source``, or a topic name."""
    if to == "source":
        if not record.original_topic:
            raise DLQError(
                f"record {record.partition}@{record.offset} has no original topic header"
            )
        return record.original_topic
    if to == "retry":
        if not record.original_topic or not record.consumer_group:
            raise DLQError(
                f"record {record.partition}@{record.offset} names no original topic and "
                "consumer group, so it has no retry tier: use --to source or --to TOPIC"
            )
        from resilient_kafka.policies import topic_name

        return topic_name(
            retry_template, topic=record.original_topic, group=record.consumer_group, n=1
        )
    return to


def replay_headers(record: DeadLetter, now_ms: int) -> list[tuple[str, bytes]]:
    """The record's headers for a fresh start: attempts, due time and budget reset; replay
    count and time stamped."""
    drop = {rk.ATTEMPT, rk.DUE, rk.REASON, rk.FIRST_FAILURE, REPLAY_COUNT, REPLAY_AT}
    drop |= {rk.SCHEMA_ID, rk.SCHEMA_GUID, rk.SCHEMA_FIELD}  # (a new failure names it again)
    out = [(k, v) for k, v in record.headers if k not in drop]
    out += [
        (rk.ATTEMPT, b"0"),
        (REPLAY_COUNT, str(record.replay_count + 1).encode()),
        (REPLAY_AT, str(now_ms).encode()),
    ]
    return out


def replay(
    config: Mapping[str, Any],
    topic: str,
    *,
    to: str = "retry",
    selection: Selection | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    max_replays: int = 3,
    force: bool = False,
    limit: int | None = None,
    replay_group: str | None = None,
    retry_template: str = "{topic}.{group}.retry.{n}",
    progress: Callable[[int, int], None] | None = None,
    idle_timeout: float = 3.0,
) -> ReplayReport:
    """Re-publish selected DLQ records; resumable, never deletes from the DLQ.

    Progress is committed in the consumer group ``replay_group`` (default
    ``rk-replay.<topic>``) only after each copy is acknowledged, so an interrupted replay resumes
    where it stopped without duplicating. ``limit`` stops after that many replays.
    """
    from confluent_kafka import KafkaError, TopicPartition

    from resilient_kafka.producer import ResilientProducer

    if rate is not None and rate <= 0:
        raise ConfigurationError(f"rate must be positive, got {rate}")
    if max_replays < 1:
        raise ConfigurationError(f"max_replays must be >= 1, got {max_replays}")
    where = str(config.get("bootstrap.servers", "?"))
    group = replay_group or f"rk-replay.{topic}"
    consumer = _consumer(config, **{"group.id": group})
    report = ReplayReport(dry_run=dry_run)
    producer = None if dry_run else ResilientProducer({**config})
    known_topics = set(consumer.list_topics(timeout=15).topics)
    try:
        partitions = _partitions(consumer, topic, where)
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=15)
        consumer.assign(
            [
                TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else -2)
                for tp in committed
            ]
        )
        remaining = set(partitions)
        last_seen = time.monotonic()
        pace = 1.0 / rate if rate else 0.0
        next_send = time.monotonic()
        pending: dict[int, int] = {}  # partition -> next offset to commit once acked
        total_hint = 0
        while remaining and (limit is None or report.replayed < limit):
            batch = consumer.consume(100, timeout=0.2)
            if not batch:
                if time.monotonic() - last_seen >= idle_timeout:
                    break
                continue
            last_seen = time.monotonic()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                    continue
                if limit is not None and report.replayed >= limit:
                    break
                record = decode(msg)
                total_hint += 1
                pending[record.partition] = record.offset + 1
                if selection is not None and not selection.matches(record):
                    report.skipped_filtered += 1
                    continue
                if record.replay_count >= max_replays and not force:
                    report.refused_replay_limit += 1
                    continue
                target = replay_target(record, to, retry_template)
                if target not in known_topics:
                    raise DLQError(f"replay target topic {target!r} does not exist on {where}")
                report.targets[target] += 1
                report.replayed += 1
                if producer is not None:
                    wait = next_send - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)  # --rate pacing
                    next_send = max(next_send, time.monotonic()) + pace
                    producer.produce(
                        target,
                        value=record.value,
                        key=record.key,
                        headers=replay_headers(record, int(time.time() * 1000)),
                    )
                    producer.poll(0)
                if progress is not None:
                    progress(report.replayed, total_hint)
            if producer is not None:
                _commit_acked(consumer, producer, topic, pending)
        if producer is not None:
            _commit_acked(consumer, producer, topic, pending)
    finally:
        consumer.close()
        if producer is not None:
            producer.close()
    return report


def _commit_acked(consumer: Any, producer: Any, topic: str, pending: dict[int, int]) -> None:
    """Commit the replay's progress only once every copy so far is acknowledged."""
    from confluent_kafka import TopicPartition

    if not pending:
        return
    failures = producer.delivery_failures
    if producer.flush(30) != 0 or producer.delivery_failures != failures:
        raise DLQError(
            "some replayed copies were not acknowledged; progress not committed (re-running "
            "the replay resumes from the last committed position)"
        )
    consumer.commit(
        offsets=[TopicPartition(topic, p, o) for p, o in pending.items()], asynchronous=False
    )
    pending.clear()
