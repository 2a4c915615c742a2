"""Hostile input on the embedded broker: records whose headers lie must not stall a partition,
and keys and payloads of any shape through the deserializers lose nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer, RetryPolicy, headers
from resilient_kafka.testing import KafkaCluster
from tests.helpers import metric_total, read_all, run_until, wait_for


def test_a_retry_record_due_far_ahead_waits_only_its_tiers_delay(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Three records of a retry tier carry an rk.due far in the future (absurd, a year ahead,
    an hour ahead: the writer's clock). Each waits its tier's delay from its first fetch, not
    its header, and the thirty records behind them on the tier's two partitions go on too."""
    source = topic_factory(2)
    group = f"g{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(1.0,), jitter=0.2),
        registry=registry,
    )
    tier = consumer.retry_topics(source)[0]
    handled: dict[str, float] = {}
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        with lock:
            handled[msg.value().decode()] = time.monotonic()  # type: ignore[union-attr]

    consumer.subscribe([source])
    wait_for(lambda: tier in kafka.list_topics(), 60, "the retry tier created")
    now_ms = int(time.time() * 1000)
    hostile = {
        "absurd": b"99999999999999",
        "a-year-ahead": str(now_ms + 365 * 86_400_000).encode(),
        "clock-an-hour-ahead": str(now_ms + 3_600_000 + 1000).encode(),
    }
    producer = Producer(kafka.producer_config())
    values = []
    for partition in (0, 1):
        for i in range(15):
            value = f"p{partition}-{i}"
            due = str(now_ms).encode()
            if partition == 0 and i == 1:
                value, due = "absurd", hostile["absurd"]
            elif partition == 1 and i == 0:
                value, due = "a-year-ahead", hostile["a-year-ahead"]
            elif partition == 1 and i == 7:
                value, due = "clock-an-hour-ahead", hostile["clock-an-hour-ahead"]
            producer.produce(tier, value=value, partition=partition, headers=[(headers.DUE, due)])
            values.append(value)
    assert producer.flush(30) == 0
    produced_at = time.monotonic()
    run_until(consumer, handler, lambda: len(handled) == 30, timeout=60)
    assert set(handled) == set(values)
    # each hostile record cost at most its tier's delay (1 s, +20 % jitter, +1 s of clock
    # slack) after its first fetch, and the ones behind it waited for it, once
    assert max(handled.values()) - produced_at < 15
    clamped = metric_total(registry, "resilient_kafka_retry_due_clamped_total")
    assert clamped == 3


HOSTILE = {
    "negative-attempt": [(headers.ATTEMPT, b"-3")],
    "attempt-not-a-number": [(headers.ATTEMPT, b"\xff\xfe")],
    "attempt-past-int-limit": [(headers.ATTEMPT, b"9" * 5000)],
    "first-failure-in-the-future": [(headers.FIRST_FAILURE, b"99999999999999")],
    "duplicated-rk-headers": [  # the last of a repeated header counts
        (headers.ATTEMPT, b"7"),
        (headers.ATTEMPT, b"0"),
        (headers.ID, b"a"),
        (headers.ID, b"b"),
    ],
    "forged-original": [
        (headers.ORIGINAL_TOPIC, b"\xff"),
        (headers.ORIGINAL_PARTITION, b"-7"),
        (headers.ORIGINAL_OFFSET, b"x"),
    ],
    "spring-family": [("kafka_dlt-original-offset", b"\x00\x00"), ("retry_topic-attempts", b"")],
    "huge-user-header": [("x-blob", b"x" * 600_000)],
}


def test_records_with_hostile_headers_are_retried_from_tier_one_and_lose_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Each record fails once: its retry copy goes to tier 1 whatever its headers claim
    (a forged negative attempt count once named a tier that does not exist), then succeeds."""
    source = topic_factory(1)
    group = f"g{uuid.uuid4().hex[:8]}"
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2, 0.2)),
        metrics=False,
    )
    producer = Producer(kafka.producer_config())
    for name, hdrs in HOSTILE.items():
        producer.produce(source, value=name, headers=hdrs)
    assert producer.flush(30) == 0
    seen: dict[str, list[str]] = {}
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        name = msg.value().decode()  # type: ignore[union-attr]
        with lock:
            seen.setdefault(name, []).append(msg.topic())  # type: ignore[arg-type]
            first = len(seen[name]) == 1
        if first:
            raise RuntimeError(f"{name} fails once")

    consumer.subscribe([source])
    tier_one = consumer.retry_topics(source)[0]
    run_until(consumer, handler, lambda: all(len(seen.get(n, ())) == 2 for n in HOSTILE))
    assert seen == {name: [source, tier_one] for name in HOSTILE}, seen


# keys and values of every shape: text, JSON, bytes that are neither, empty, absent, large (made
# from one drawn byte: hypothesis's buffer is 8 KB, a drawn 100 KB value would be thrown away)
_VALUES = st.one_of(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    ).map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=32),
    st.just(b""),
    st.none(),
    st.integers(0, 255).map(lambda b: bytes([b]) * 100_000),
    st.sampled_from([b"NaN", b"\xef\xbb\xbf{}", b'{"a": 1} x', b"\xff\xfe{\x00}\x00", b"1e999"]),
)
_KEYS = st.one_of(st.none(), st.text(max_size=8).map(str.encode), st.binary(max_size=8))
# one record of each hostile kind, always tried (hypothesis runs explicit examples first)
_EVERY_KIND = [
    (b"k", b'{"n": 1}'),
    (None, b"[1, 2]"),
    (b"\xff\xfe", b'{"n": 2}'),  # a key that is not UTF-8
    (b"k", b"{not json"),
    (b"k", None),  # a tombstone
    (b"", b""),
    (b"k", b"\x00" * 100_000),
    (b"k", b"\xef\xbb\xbf{}"),  # a BOM: json.loads of bytes detects it
    (b"k", b"\xff\xfe{\x00}\x00"),  # UTF-16
    (b"k", b"NaN"),
    (b"k", b"1e999"),
    (b"k", b'{"a": 1} x'),
]


def _key(data: bytes | None, ctx: object) -> str | None:
    return None if data is None else data.decode("utf-8")  # strict: not UTF-8 raises


def _value(data: bytes | None, ctx: object) -> object:
    return json.loads(data)  # type: ignore[arg-type]  # None raises: a tombstone is not JSON


def _readable(key: bytes | None, value: bytes | None) -> bool:
    try:
        _key(key, None)
        _value(value, None)
    except Exception:
        return False
    return True


@settings(
    max_examples=2,  # 30 records each, on the broker (~10 s an example), + the one below
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@example(records=_EVERY_KIND)
@given(records=st.lists(st.tuples(_KEYS, _VALUES), min_size=30, max_size=30))
def test_any_key_and_payload_through_the_deserializers_is_handled_or_dead_lettered(
    kafka: KafkaCluster, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    """Fuzzed keys and payloads through a key and a value deserializer, on the broker: what they
    read is handled once, what they cannot goes to the DLQ with its raw bytes and the reason;
    nothing is lost, the consumer never stops, and the group commits to the end."""
    topic, group = f"fuzz-{uuid.uuid4().hex[:8]}", f"g{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 1})
    producer = Producer({**kafka.producer_config(), "message.max.bytes": 2_000_000})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=()),
        key_deserializer=_key,
        value_deserializer=_value,
        registry=CollectorRegistry(),
    )
    handled: dict[int, tuple[object, object]] = {}

    def handler(msg: Message) -> None:
        handled[msg.offset()] = (msg.key(), msg.value())

    readable = {i for i, (key, value) in enumerate(records) if _readable(key, value)}
    consumer.subscribe([topic])
    dlq = consumer.dead_letter_topic(topic)
    unreadable = len(records) - len(readable)
    dead = []
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(handled) == len(readable), 60, "the readable records handled")
        if unreadable:
            dead = read_all(kafka, dlq, unreadable)
        wait_for(lambda: _committed(kafka, group, topic) == len(records), 30, "the commit")
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert set(handled) == readable
    for offset, (key, value) in handled.items():
        assert (key, value) == (_key(records[offset][0], None), _value(records[offset][1], None))
    by_offset = {headers.original(m).offset: m for m in dead}
    assert set(by_offset) == set(range(len(records))) - readable
    for offset, msg in by_offset.items():
        assert (msg.key(), msg.value()) == records[offset]  # the raw bytes, unchanged
        assert headers.header_dict(msg)[headers.REASON] == headers.DESERIALIZATION.encode()


def _committed(kafka: KafkaCluster, group: str, topic: str) -> int:
    reader = Consumer(kafka.client_config(group_id=group))
    try:
        (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        return tp.offset
    finally:
        reader.close()
