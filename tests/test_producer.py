"""ResilientProducer: safe defaults, and delivery failures that are never silent."""

from __future__ import annotations

import logging

import pytest

from resilient_kafka import ResilientProducer
from resilient_kafka.producer import producer_config_from
from resilient_kafka.testing import KafkaCluster
from tests.helpers import consume


def test_defaults_are_idempotent_and_acks_all_and_records_arrive(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    producer = ResilientProducer(kafka.producer_config())
    acks = []
    producer.produce(topic, key="k", value="v", on_delivery=lambda err, msg: acks.append(err))
    producer.produce(topic, "positional-value", "k2")
    assert producer.flush(10) == 0
    producer.close()
    assert acks == [None]
    assert producer.delivery_failures == 0

    from confluent_kafka import Consumer

    reader = Consumer(kafka.client_config(group_id="producer-test", auto_offset_reset="earliest"))
    reader.subscribe([topic])
    try:
        values = [m.value() for m in consume(reader, 2)]
    finally:
        reader.close()
    assert values == [b"v", b"positional-value"]


def test_a_delivery_failure_is_counted_logged_and_reported(
    kafka: KafkaCluster, topic_factory, caplog: pytest.LogCaptureFixture
) -> None:
    hooked = []
    producer = ResilientProducer(
        # the broker cannot be reached: every delivery times out quickly
        {"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 500},
        on_delivery_failure=lambda err, msg: hooked.append(msg.topic()),
    )
    seen_by_caller = []
    with caplog.at_level(logging.ERROR, logger="resilient_kafka.producer"):
        producer.produce("orders", value="silent?")
        producer.produce("orders", value="mine", on_delivery=lambda e, m: seen_by_caller.append(e))
        producer.flush(10)
    assert producer.delivery_failures == 2
    assert hooked == ["orders", "orders"]
    assert len(seen_by_caller) == 1 and seen_by_caller[0] is not None
    # the record without a caller callback is logged; the caller's own one is theirs to handle
    errors = [r for r in caplog.records if "delivery to orders" in r.getMessage()]
    assert len(errors) == 1


def test_forwarding_producer_takes_connection_and_security_settings_only() -> None:
    consumer_conf = {
        "bootstrap.servers": "b:9092",
        "group.id": "g",
        "security.protocol": "SASL_SSL",
        "sasl.password": "secret",
        "ssl.ca.location": "/ca.pem",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
    }
    assert producer_config_from(consumer_conf) == {
        "bootstrap.servers": "b:9092",
        "security.protocol": "SASL_SSL",
        "sasl.password": "secret",
        "ssl.ca.location": "/ca.pem",
    }
    assert "secret" not in repr(
        ResilientProducer({"bootstrap.servers": "b:9092", "sasl.password": "secret"})
    )


def test_a_config_level_on_delivery_is_chained_not_replaced(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    reports: list[tuple[object, str]] = []
    producer = ResilientProducer(
        {**kafka.producer_config(), "on_delivery": lambda err, msg: reports.append((err, "conf"))}
    )
    mine: list[object] = []
    producer.produce(topic, value="a")
    producer.produce(topic, value="b", on_delivery=lambda err, msg: mine.append(err))
    assert producer.flush(10) == 0
    producer.close()
    assert reports == [(None, "conf")]  # the record with its own callback reports there only
    assert mine == [None]


def test_a_config_level_on_delivery_sees_failures_and_they_are_counted() -> None:
    failures: list[object] = []
    producer = ResilientProducer(
        {
            "bootstrap.servers": "127.0.0.1:1",
            "message.timeout.ms": 500,
            "on_delivery": lambda err, msg: failures.append(err),
        }
    )
    producer.produce("orders", value="lost?")
    producer.flush(10)
    assert producer.delivery_failures == 1
    assert len(failures) == 1 and failures[0] is not None
