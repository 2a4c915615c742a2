"""The pytest plugin as a user's suite sees it: fixtures, embedded or external cluster."""

from __future__ import annotations

import json
import os

import pytest

from resilient_kafka.testing import KafkaCluster

USER_TEST = """
import json, os
from confluent_kafka import Consumer, Producer

def test_fixtures(kafka, kafka_config, topic_factory):
    topic = topic_factory(3)
    other = topic_factory()
    assert topic != other
    assert kafka.list_topics()[topic] == 3
    assert kafka_config["bootstrap.servers"] == kafka.bootstrap_servers
    kafka_config["group.id"] = "mutated"          # a fresh copy per test

    producer = Producer(kafka.producer_config())
    producer.produce(topic, key="k", value="hello")
    assert producer.flush(30) == 0

    consumer = Consumer({**kafka_config, "group.id": "user", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        msg = None
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
        assert msg is not None and msg.value() == b"hello"
    finally:
        consumer.close()
    with open(os.environ["RK_REPORT"], "w") as f:
        json.dump({"kind": type(kafka).__name__, "bootstrap": kafka.bootstrap_servers,
                   "topics": [topic, other]}, f)

def test_config_is_fresh(kafka_config):
    assert "group.id" not in kafka_config
"""


def _run_user_suite(pytester: pytest.Pytester, monkeypatch, **env: str) -> dict[str, object]:
    report = pytester.path / "report.json"
    monkeypatch.setenv("RK_REPORT", str(report))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    loaded: dict[str, object] = json.loads(report.read_text())
    return loaded


def test_user_suite_gets_an_embedded_broker(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    report = _run_user_suite(pytester, monkeypatch)
    assert report["kind"] == "EmbeddedKafka"


def test_user_suite_uses_the_external_cluster_and_cleans_up_topics(
    pytester: pytest.Pytester, monkeypatch, kafka: KafkaCluster
) -> None:
    report = _run_user_suite(pytester, monkeypatch, KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers)
    assert report["kind"] == "ExternalKafka"
    assert report["bootstrap"] == kafka.bootstrap_servers
    remaining = kafka.list_topics()
    topics = report["topics"]
    assert isinstance(topics, list) and len(topics) == 2
    assert not set(topics) & set(remaining), "topic_factory left its topics behind"


def test_plugin_is_registered_through_the_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*kafka_config*", "*topic_factory*"])
    assert os.environ.get("PYTEST_PLUGINS") is None  # found by entry point, not by env
