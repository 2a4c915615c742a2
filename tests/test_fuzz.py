"""Hostile input, fuzzed (hypothesis): headers of every shape through what reads them (the
consumer's header parsing and retry/DLQ copies, the DLQ tool's decoding of every header family),
payloads through the DLQ tool's rendering, and configuration values. Nothing here may raise
anything but the specific errors the docs promise."""

from __future__ import annotations

import math
from typing import Any

from confluent_kafka import KafkaException, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_kafka import (
    ConfigurationError,
    DeadLetterPolicy,
    ResilientConsumer,
    ResilientProducer,
    RetryPolicy,
    headers,
)
from resilient_kafka import dlq as dlq_tool

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [
    headers.ID,
    headers.DUE,
    headers.ATTEMPT,
    headers.FIRST_FAILURE,
    headers.ORIGINAL_TOPIC,
    headers.ORIGINAL_PARTITION,
    headers.ORIGINAL_OFFSET,
    headers.ORIGINAL_TIMESTAMP,
    headers.EXCEPTION_TYPE,
    headers.EXCEPTION_MESSAGE,
    headers.EXCEPTION_STACKTRACE,
    headers.CONSUMER_GROUP,
    headers.REASON,
    "kafka_dlt-original-topic",  # Spring
    "kafka_dlt-original-partition",
    "kafka_dlt-original-offset",
    "kafka_dlt-exception-fqcn",
    "retry_topic-attempts",
    "__connect.errors.topic",  # Kafka Connect
    "__connect.errors.partition",
    "__connect.errors.offset",
    "__connect.errors.exception.class.name",
    "__streams.errors.topic",  # Kafka Streams
    "__streams.errors.partition",
    "__streams.errors.offset",
    "traceparent",
    "x-app",
]
VALUES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"-1",
            b"-9223372036854775809",
            b"99999999999999",
            b"1e18",
            b" 12 ",
            "\u0661\u0662".encode(),  # Arabic-Indic digits: int() takes them
            b"\xff\xfe\xfd",
            b"\x00\x00\x00\x07",  # Spring's 4-byte int
            b"\x80\x00\x00\x00\x00\x00\x00\x00",  # Spring's 8-byte long, the lowest
            b"9" * 5000,  # past Python's int() digit limit
            b"x" * 1_000_000,  # a megabyte
        ]
    ),
)
HEADERS = st.lists(
    st.tuples(st.one_of(st.sampled_from(NAMES), st.text(max_size=20)), st.none() | VALUES),
    max_size=12,
)


def _message(hdrs: list[tuple[str, bytes | None]], key: bytes | None = b"k", value: Any = b"v"):
    return Message(
        topic="orders", partition=3, offset=41, key=key, value=value, headers=hdrs or None
    )


@FUZZ
@given(HEADERS, st.integers(min_value=0, max_value=2**45))
def test_the_consumers_header_readers_never_raise(hdrs: Any, now_ms: int) -> None:
    msg = _message(hdrs)
    found = headers.header_dict(msg)
    failed, first = headers.failures_so_far(found, now_ms)
    assert failed >= 0 and 0 <= first <= now_ms
    assert headers.attempt(msg) >= 0
    headers.due(msg)
    origin = headers.original(msg, found)
    assert isinstance(origin.topic, str) and isinstance(origin.offset, int)
    assert headers.message_id(msg)


@FUZZ
@given(HEADERS, st.text(max_size=300))
def test_retry_and_dlq_copies_replace_every_rk_header_and_stay_bounded(
    hdrs: Any, message: str
) -> None:
    msg = _message(hdrs)
    limit = 512
    copy = headers.forward_headers(
        msg,
        prev=headers.header_dict(msg),
        exc=ValueError(message),
        attempt_no=2,
        first_failure_ms=1,
        group="g",
        max_text_bytes=limit,
        due_ms=5,
        reason=headers.EXHAUSTED,
    )
    names = [name for name, _ in copy]
    ours = [name for name in names if name.startswith(headers.PREFIX) and name != headers.ID]
    assert len(ours) == len(set(ours)), "an rk.* header written twice"
    for name, data in copy:
        assert isinstance(data, bytes)
        if name.startswith(headers.PREFIX) and name != headers.ID:
            assert len(data) <= limit + 64, (name, len(data))
    # the user's own headers travel on unchanged
    user = [(k, v or b"") for k, v in hdrs if not k.startswith(headers.PREFIX)]
    assert [(k, v) for k, v in copy if not k.startswith(headers.PREFIX)] == user


@FUZZ
@given(HEADERS, st.none() | st.binary(max_size=200))
def test_the_dlq_tool_decodes_any_record_of_any_family(hdrs: Any, value: bytes | None) -> None:
    record = dlq_tool.decode(_message(hdrs, value=value))
    assert record.family in ("resilient-kafka", "spring", "connect", "streams", "unknown")
    assert record.to_json()["family"] == record.family
    kind, text = dlq_tool.render_value(value)
    assert isinstance(kind, str) and isinstance(text, str)


def _config_values() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.binary(max_size=8),
        st.lists(st.integers(), max_size=2),
    )


CONFIG_KEYS = [
    "group.id",
    "auto.offset.reset",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "max.poll.interval.ms",
    "session.timeout.ms",
    "isolation.level",
    "partition.assignment.strategy",
    "message.max.bytes",
    "fetch.max.bytes",
    "no.such.property",
]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), _config_values(), max_size=4))
def test_bad_consumer_configuration_gets_a_specific_error(conf: dict[str, Any]) -> None:
    """Either the consumer constructs, or it says what is wrong: ConfigurationError (ours),
    KafkaException (librdkafka's), TypeError/ValueError (confluent's own checks)."""
    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", **conf}
    try:
        consumer = ResilientConsumer(config, metrics=False)
    except (ConfigurationError, KafkaException, TypeError, ValueError):
        return
    consumer.close()


@settings(max_examples=150, deadline=None)
@given(
    delays=st.lists(_config_values(), max_size=3),
    jitter=_config_values(),
    timeout=_config_values(),
    max_text=_config_values(),
)
def test_bad_policies_get_a_configuration_error(
    delays: list[Any], jitter: Any, timeout: Any, max_text: Any
) -> None:
    for build in (
        lambda: RetryPolicy(delays=tuple(delays)),
        lambda: RetryPolicy(jitter=jitter),
        lambda: RetryPolicy(timeout=timeout),
        lambda: DeadLetterPolicy(max_text_bytes=max_text),
    ):
        try:
            policy = build()
        except ConfigurationError:
            continue
        if isinstance(policy, RetryPolicy):
            assert all(isinstance(d, int | float) and 0 <= d < math.inf for d in policy.delays)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS[3:]), _config_values(), max_size=3))
def test_bad_producer_configuration_gets_a_specific_error(conf: dict[str, Any]) -> None:
    try:
        producer = ResilientProducer({"bootstrap.servers": "127.0.0.1:1", **conf}, metrics=False)
    except (ConfigurationError, KafkaException, TypeError, ValueError):
        return
    producer.flush(0)
