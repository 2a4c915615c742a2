"""DLQ operations on the real embedded broker: listing, filters, decoding, stats, replay."""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer

from resilient_kafka import ResilientConsumer, RetryPolicy, dlq, headers
from resilient_kafka.cli import main
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.testing import KafkaCluster
from tests.helpers import consume, produce


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


class Poison(Exception):
    pass


def _dead_letter_some(kafka: KafkaCluster, topic_factory) -> tuple[str, str, str]:
    """Run a consumer that dead-letters two records (one poison, one exhausted)."""
    topic, group = topic_factory(2), f"g{uuid.uuid4().hex[:8]}"
    produce(
        kafka.producer_config(),
        topic,
        [("good", "ok"), ("bad", "poison"), ("flaky", "always-fails"), ("good2", "ok")],
    )
    dead: list[Any] = []

    def handler(msg: Message) -> None:
        if msg.value() == b"poison":
            raise Poison("refused by validation")
        if msg.value() == b"always-fails":
            raise ConnectionError("downstream timed out")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2,), dead_letter_on=(Poison,)),
    )
    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    dlq_topic = f"{topic}.{group}.dlq"
    try:
        # the consumer creates its retry/DLQ topics in the background
        _wait(lambda: dlq_topic in kafka.list_topics(), 30, "the DLQ topic")
        _wait(
            lambda: (
                dead.extend(dlq.read(kafka.producer_config(), dlq_topic, None)[len(dead) :])
                or len(dead) >= 2
            ),
            30,
            "two dead letters",
        )
    finally:
        consumer.stop()
        thread.join(30)
    return topic, group, dlq_topic


def test_dead_letters_are_listed_with_the_right_fields_and_filters_apply(
    kafka: KafkaCluster, topic_factory, capsys
) -> None:
    topic, group, dlq_topic = _dead_letter_some(kafka, topic_factory)
    conf = kafka.producer_config()
    records = {r.key: r for r in dlq.read(conf, dlq_topic)}
    assert set(records) == {b"bad", b"flaky"}
    bad, flaky = records[b"bad"], records[b"flaky"]
    assert bad.family == "resilient-kafka"
    assert (bad.original_topic, bad.reason, bad.attempt) == (topic, "non_retryable", 1)
    assert bad.exception_type == "tests.test_dlq.Poison"
    assert bad.exception_message == "refused by validation"
    assert bad.consumer_group == group
    assert (flaky.reason, flaky.attempt, flaky.exception_type) == (
        "exhausted",
        2,
        "ConnectionError",
    )
    assert flaky.original_offset is not None and flaky.original_partition is not None

    def keys(selection: dlq.Selection) -> set[bytes | None]:
        return {r.key for r in dlq.read(conf, dlq_topic, selection)}

    assert keys(dlq.Selection(reason="exhausted")) == {b"flaky"}
    assert keys(dlq.Selection(exception="poison")) == {b"bad"}
    assert keys(dlq.Selection(key="bad")) == {b"bad"}
    assert keys(dlq.Selection(headers={"rk.reason": "non_retryable"})) == {b"bad"}
    assert keys(dlq.Selection(since=dlq.parse_time("-1h"))) == {b"bad", b"flaky"}
    assert keys(dlq.Selection(until=dlq.parse_time("-1h"))) == set()

    assert (
        main(
            [
                "dlq",
                "list",
                "--topic",
                topic,
                "--group",
                group,
                "-b",
                conf["bootstrap.servers"],
                "--json",
            ]
        )
        == 0
    )
    listed = json.loads(capsys.readouterr().out)
    assert {row["key"] for row in listed} == {"bad", "flaky"}
    for row in listed:
        for name in (
            "partition",
            "offset",
            "key",
            "original_topic",
            "original_partition",
            "original_offset",
            "attempt",
            "reason",
            "exception_type",
            "exception_message",
        ):
            assert name in row

    assert main(["dlq", "stats", dlq_topic, "-b", conf["bootstrap.servers"]]) == 0
    out = capsys.readouterr().out
    assert "2 record(s)" in out and "non_retryable" in out and "█" in out


def test_replay_into_the_retry_tier_succeeds_once_the_fault_is_fixed(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [("order-1", "charge me")])
    fixed = threading.Event()
    handled: list[tuple[str, int, str | None]] = []

    def handler(msg: Message) -> None:
        handled.append(
            (msg.topic(), headers.attempt(msg), dict(msg.headers() or []).get("rk.replay.count"))
        )
        if not fixed.is_set():
            raise ConnectionError("bug in the payment client")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2,)),
    )
    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    dlq_topic = f"{topic}.{group}.dlq"
    conf = kafka.producer_config()
    try:
        _wait(lambda: dlq_topic in kafka.list_topics(), 30, "the DLQ topic")  # made in background
        _wait(lambda: dlq.read(conf, dlq_topic), 30, "the record to be dead-lettered")
        fixed.set()  # the fix is deployed: replay
        report = dlq.replay(conf, dlq_topic)
        assert report.replayed == 1
        assert report.targets == {f"{topic}.{group}.retry.1": 1}
        _wait(lambda: len(handled) == 3, 30, "the replayed record to be handled")
    finally:
        consumer.stop()
        thread.join(30)
    assert handled[-1] == (f"{topic}.{group}.retry.1", 0, b"1")  # attempts reset, replay stamped
    assert len(dlq.read(conf, dlq_topic)) == 1  # never deleted from the DLQ


def _fill_dlq(kafka: KafkaCluster, topic_factory, count: int, replays: int = 0) -> tuple[str, str]:
    source, dlq_topic = topic_factory(1, suffix="src"), topic_factory(2, suffix="dlq")
    extra = [("rk.replay.count", str(replays).encode())] if replays else []
    producer = Producer(kafka.producer_config())
    for i in range(count):
        producer.produce(
            dlq_topic,
            key=f"k{i}",
            value=f"v{i}",
            headers=[
                ("rk.original.topic", source.encode()),
                ("rk.original.partition", b"0"),
                ("rk.original.offset", str(i).encode()),
                ("rk.attempt", b"3"),
                ("rk.reason", b"exhausted"),
                ("rk.consumer.group", b"payments"),
                *extra,
            ],
        )
    assert producer.flush(10) == 0
    return source, dlq_topic


def test_an_interrupted_replay_resumes_exactly(kafka: KafkaCluster, topic_factory) -> None:
    source, dlq_topic = _fill_dlq(kafka, topic_factory, 10)
    conf = kafka.producer_config()
    group = f"replay-{uuid.uuid4().hex[:6]}"
    first = dlq.replay(conf, dlq_topic, to="source", limit=4, replay_group=group)
    assert first.replayed == 4
    second = dlq.replay(conf, dlq_topic, to="source", replay_group=group)
    assert second.replayed == 6
    assert dlq.replay(conf, dlq_topic, to="source", replay_group=group).replayed == 0

    reader = Consumer(
        kafka.client_config(group_id=f"r{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest")
    )
    reader.subscribe([source])
    try:
        copies = consume(reader, 10)
        assert not [m for m in reader.consume(10, timeout=2.0) if m.error() is None], "duplicates"
    finally:
        reader.close()
    assert sorted(m.key() for m in copies) == sorted(f"k{i}".encode() for i in range(10))
    stamped = dict(copies[0].headers())
    assert stamped["rk.replay.count"] == b"1" and stamped["rk.attempt"] == b"0"
    assert "rk.reason" not in stamped and int(stamped["rk.replay.at"]) > 0


def test_replay_refuses_records_replayed_too_often_and_dry_runs(
    kafka: KafkaCluster, topic_factory
) -> None:
    _source, dlq_topic = _fill_dlq(kafka, topic_factory, 3, replays=3)
    conf = kafka.producer_config()
    dry = dlq.replay(conf, dlq_topic, to="source", dry_run=True, force=True)
    assert (dry.replayed, dry.dry_run) == (3, True)
    refused = dlq.replay(conf, dlq_topic, to="source")
    assert (refused.replayed, refused.refused_replay_limit) == (0, 3)
    with pytest.raises(dlq.DLQError, match="does not exist"):
        dlq.replay(conf, dlq_topic, to="no-such-topic", force=True, replay_group="other")
    with pytest.raises(dlq.DLQError, match=r"no retry tier|does not exist"):
        dlq.replay(conf, dlq_topic, force=True, replay_group="third")  # payments tier absent


def test_java_header_families_and_malformed_records_are_decoded(
    kafka: KafkaCluster, topic_factory, capsys
) -> None:
    topic = topic_factory(1)
    producer = Producer(kafka.producer_config())
    producer.produce(
        topic,
        key="spring",
        value=b"{}",
        headers=[
            ("kafka_dlt-original-topic", b"orders"),
            ("kafka_dlt-original-partition", struct.pack(">i", 3)),
            ("kafka_dlt-original-offset", struct.pack(">q", 1234567890123)),
            ("kafka_dlt-original-timestamp", struct.pack(">q", 1700000000000)),
            ("kafka_dlt-exception-fqcn", b"org.example.PaymentException"),
            ("kafka_dlt-exception-message", b"declined"),
            ("kafka_dlt-original-consumer-group", b"billing"),
            ("retry_topic-attempts", struct.pack(">i", 4)),
        ],
    )
    producer.produce(
        topic,
        key="connect",
        value=b"x",
        headers=[
            ("__connect.errors.topic", b"orders"),
            ("__connect.errors.partition", b"1"),
            ("__connect.errors.offset", b"77"),
            (
                "__connect.errors.exception.class.name",
                b"org.apache.kafka.connect.errors.DataException",
            ),
            ("__connect.errors.exception.message", b"bad schema"),
            ("__connect.errors.stage", b"VALUE_CONVERTER"),
            ("__connect.errors.connector.name", b"jdbc-sink"),
        ],
    )
    producer.produce(
        topic,
        key="streams",
        value=b"y",
        headers=[
            ("__streams.errors.topic", b"clicks"),
            ("__streams.errors.partition", b"0"),
            ("__streams.errors.offset", b"5"),
            (
                "__streams.errors.exception",
                b"org.apache.kafka.common.errors.SerializationException",
            ),
            ("__streams.errors.exception.message", b"unknown magic byte"),
        ],
    )
    producer.produce(
        topic,
        key=b"\xff\xfe",
        value=b"\x00\x01\xff",
        headers=[
            ("rk.original.topic", b"orders"),
            ("rk.original.partition", b"zz"),
            ("rk.exception.message", b"\xff broken"),
        ],
    )
    assert producer.flush(10) == 0
    records = dlq.read(kafka.producer_config(), topic)
    spring, connect, streams, broken = records
    assert (spring.family, spring.original_partition, spring.original_offset) == (
        "spring",
        3,
        1234567890123,
    )
    assert (spring.attempt, spring.consumer_group, spring.original_timestamp) == (
        4,
        "billing",
        1700000000000,
    )
    assert spring.exception_type == "org.example.PaymentException"
    assert (connect.family, connect.original_offset, connect.reason, connect.consumer_group) == (
        "connect",
        77,
        "VALUE_CONVERTER",
        "jdbc-sink",
    )
    assert (streams.family, streams.original_topic, streams.exception_message) == (
        "streams",
        "clicks",
        "unknown magic byte",
    )
    assert broken.original_partition is None
    assert any("rk.original.partition: not an integer" in p for p in broken.problems)
    assert any("rk.exception.message: not UTF-8" in p for p in broken.problems)
    assert broken.to_json()["key"] == {"hex": "fffe"}

    bs = kafka.bootstrap_servers
    assert main(["dlq", "show", topic, "3", "-b", bs]) == 0
    out = capsys.readouterr().out
    assert "undecodable header" in out and "value (hex, 3 bytes)" in out and "00 01 ff" in out
    assert main(["dlq", "show", topic, "0", "-b", bs]) == 0
    assert "written by  spring" in capsys.readouterr().out


def test_bad_input_gets_one_clear_line(
    kafka: KafkaCluster, topic_factory, capsys, monkeypatch
) -> None:
    bs = kafka.bootstrap_servers
    empty = topic_factory(1)
    assert main(["dlq", "list", empty, "-b", bs]) == 0
    assert "No matching records" in capsys.readouterr().out
    cases = [
        (["dlq", "list", "absent.g.dlq", "-b", bs], "topic 'absent.g.dlq' does not exist"),
        (["dlq", "list", empty, "-b", bs, "-X", "bogus.key=1"], "No such configuration property"),
        (["dlq", "list", empty, "-b", bs, "-X", "novalue"], "-X takes KEY=VALUE"),
        (["dlq", "list", empty, "-b", bs, "--since", "yesterday-ish"], "cannot read time"),
        (["dlq", "list", "-b", bs], "which DLQ?"),
        (["dlq", "show", empty, "x", "-b", bs], "OFFSET must be an integer"),
        (["dlq", "show", empty, "9", "-b", bs], "no record at offset 9"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert main(["dlq", "list", empty]) == 1
    assert "pass -b HOST:PORT" in capsys.readouterr().err


def test_replay_to_source_warns(kafka: KafkaCluster, topic_factory, capsys) -> None:
    source, dlq_topic = _fill_dlq(kafka, topic_factory, 1)
    assert main(["dlq", "replay", dlq_topic, "--to", "source", "-b", kafka.bootstrap_servers]) == 0
    captured = capsys.readouterr()
    assert "every consumer group subscribed to it" in captured.err
    assert f"→ {source}: 1" in captured.out


def test_parse_time_forms() -> None:
    assert dlq.parse_time("2026-11-25T08:00:00") == 1795593600000
    assert dlq.parse_time("2026-11-25T09:00:00+01:00") == 1795593600000
    assert dlq.parse_time("1795593600") == 1795593600000
    assert dlq.parse_time("1795593600000") == 1795593600000
    assert abs(dlq.parse_time("-2h") - (time.time() - 7200) * 1000) < 5000
    with pytest.raises(ConfigurationError):
        dlq.parse_time("soonish")
