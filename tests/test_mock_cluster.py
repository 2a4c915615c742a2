"""MockCluster (librdkafka's mock cluster through ctypes) with ordinary confluent-kafka clients."""

from __future__ import annotations

import gc
import json
import socket
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from resilient_kafka.testing import (
    ApiKey,
    KafkaCluster,
    MockCluster,
    MockClusterError,
    MockClusterUnavailableError,
    TopicError,
)
from tests.helpers import consume, wait_for

QUIET = {"log_level": 0}  # for clients that are expected to see broken brokers


class Deliveries:
    """Delivery reports of one producer, by record value."""

    def __init__(self) -> None:
        self.reports: dict[bytes, KafkaError | None] = {}
        self.offsets: dict[bytes, int] = {}

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        self.reports[msg.value()] = err
        if err is None:
            self.offsets[msg.value()] = msg.offset()

    def wait(self, producer: Producer, value: bytes, timeout: float = 10.0) -> KafkaError | None:
        """Serve ``producer`` until ``value`` has its report; return its error (None: acked)."""
        deadline = time.monotonic() + timeout
        while value not in self.reports:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no delivery report for {value!r} within {timeout}s")
            producer.poll(0.05)
        return self.reports[value]


def reader(cluster: MockCluster, topic: str, **config: Any) -> Consumer:
    consumer = Consumer(
        cluster.client_config(
            group_id=f"reader-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **config,
        )
    )
    consumer.subscribe([topic])
    return consumer


def leader_of(cluster: MockCluster, topic: str, partition: int = 0) -> int:
    admin = AdminClient(cluster.producer_config())
    return int(admin.list_topics(topic, timeout=5).topics[topic].partitions[partition].leader)


def accepts(server: str) -> bool:
    """Whether ``host:port`` accepts a TCP connection."""
    host, port = server.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


# -- lifecycle -------------------------------------------------------------------------------


def test_lifecycle_and_kafka_cluster_interface() -> None:
    cluster = MockCluster(brokers=2)
    assert isinstance(cluster, KafkaCluster)
    with pytest.raises(MockClusterError, match="not running"):
        _ = cluster.bootstrap_servers
    with cluster:
        servers = cluster.bootstrap_servers.split(",")
        assert len(servers) == 2 and all(s.startswith("127.0.0.1:") for s in servers)
        assert cluster.client_config(group_id="g")["bootstrap.servers"] == ",".join(servers)
        assert cluster.broker_ids == [1, 2]
        assert "2 broker(s) on 127.0.0.1:" in repr(cluster)
    assert not cluster.running
    assert not any(accepts(server) for server in servers)
    cluster.close()  # a second close is harmless
    with pytest.raises(MockClusterError, match="not running"):
        cluster.broker_down(1)
    with cluster:  # a closed cluster starts again, empty, on new ports
        assert cluster.bootstrap_servers.split(",") != servers
        assert cluster.list_topics() == {}


def test_a_forgotten_cluster_is_destroyed_when_collected() -> None:
    cluster = MockCluster(brokers=1).start()
    server = cluster.bootstrap_servers
    assert accepts(server)
    del cluster
    gc.collect()
    assert not accepts(server)


def test_missing_library_or_symbols_are_clear(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RK_LIBRDKAFKA", str(tmp_path / "nothing.so"))
    with pytest.raises(MockClusterUnavailableError, match=r"RK_LIBRDKAFKA=.* is not a file"):
        MockCluster().start()

    import ctypes.util

    libm = ctypes.util.find_library("m")  # a real shared library without rd_kafka_* symbols
    assert libm is not None
    with pytest.raises(RuntimeError, match="does not export rd_kafka_version_str"):
        MockCluster(library=libm).start()


def test_topics_are_created_and_deleted_without_the_admin_api(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topics({"orders": 3, "payments": 1})
    mock_cluster.create_topic("audit", partitions=2, replication_factor=3)
    assert mock_cluster.list_topics() == {"orders": 3, "payments": 1, "audit": 2}

    mock_cluster.create_topics(["orders"], exist_ok=True)
    with pytest.raises(TopicError) as caught:
        mock_cluster.create_topics({"orders": 3, "bad": 0, "fine": 1})
    assert set(caught.value.errors) == {"orders", "bad"}
    assert "Topic already exists" in caught.value.errors["orders"]
    assert "partitions must be a positive integer" in caught.value.errors["bad"]
    with pytest.raises(TopicError, match=r"replication factor must be 1\.\.3"):
        mock_cluster.create_topics(["wide"], replication_factor=4)
    with pytest.raises(TopicError, match="topic configs"):
        mock_cluster.create_topics(["compacted"], config={"cleanup.policy": "compact"})

    mock_cluster.delete_topics(["payments"])
    assert mock_cluster.list_topics() == {"orders": 3, "audit": 2, "fine": 1}
    with pytest.raises(TopicError) as caught:
        mock_cluster.delete_topics(["payments"])
    assert set(caught.value.errors) == {"payments"}

    # The limit the override works around: the mock answers no CreateTopics request.
    admin = AdminClient({**mock_cluster.producer_config(), **QUIET})
    future = admin.create_topics([NewTopic("via-admin", 1, 1)], request_timeout=5)["via-admin"]
    with pytest.raises(Exception) as refused:
        future.result(10)
    assert refused.value.args[0].code() == KafkaError._UNSUPPORTED_FEATURE


# -- ordinary clients ------------------------------------------------------------------------


def test_produce_and_consume_through_a_group(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topics({"orders": 3})
    producer = Producer(mock_cluster.producer_config(acks="all"))
    for i in range(30):
        producer.produce("orders", key=f"k{i}", value=f"v{i}")
    assert producer.flush(10) == 0

    consumer = reader(mock_cluster, "orders")
    try:
        messages = consume(consumer, 30, timeout=15)
    finally:
        consumer.close()
    assert sorted(m.value() for m in messages) == sorted(f"v{i}".encode() for i in range(30))
    assert {m.partition() for m in messages} == {0, 1, 2}


def test_commit_metadata_is_kept(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topic("t")
    config = mock_cluster.client_config(group_id="g", enable_auto_commit=False)
    consumer = Consumer(config)
    try:
        consumer.commit(offsets=[TopicPartition("t", 0, 5, "meta")], asynchronous=False)
    finally:
        consumer.close()

    fresh = Consumer(config)
    try:
        [committed] = fresh.committed([TopicPartition("t", 0)], timeout=10)
    finally:
        fresh.close()
    assert (committed.offset, committed.metadata) == (5, "meta")


def test_read_committed_readers_see_open_and_aborted_transactions(
    mock_cluster: MockCluster,
) -> None:
    """A limit of librdkafka 2.16's mock, pinned so the docs are revisited when it changes.

    Transactions run (init, abort, commit, control records), but classic Fetch answers report
    the high watermark as last stable offset and no aborted transactions, so read_committed
    consumers see what Kafka would hide from them.
    """
    mock_cluster.create_topic("tx")
    producer = Producer(mock_cluster.producer_config(transactional_id="tx-1"))
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce("tx", value=b"aborted")
    producer.flush(10)

    while_open = reader(mock_cluster, "tx", isolation_level="read_committed")
    try:
        assert [m.value() for m in consume(while_open, 1, timeout=15)] == [b"aborted"]
    finally:
        while_open.close()

    producer.abort_transaction(10)
    producer.begin_transaction()
    producer.produce("tx", value=b"committed")
    producer.commit_transaction(10)

    after = reader(mock_cluster, "tx", isolation_level="read_committed")
    try:
        values = [m.value() for m in consume(after, 2, timeout=15)]
    finally:
        after.close()
    assert values == [b"aborted", b"committed"]


# -- leaders and brokers ---------------------------------------------------------------------


def test_set_leader_moves_the_leader_and_the_producer_follows(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topic("moving", replication_factor=3)
    deliveries = Deliveries()
    producer = Producer(mock_cluster.producer_config({**QUIET, "on_delivery": deliveries}))
    producer.produce("moving", value=b"before")
    assert deliveries.wait(producer, b"before") is None

    old = leader_of(mock_cluster, "moving")
    new = next(b for b in mock_cluster.broker_ids if b != old)
    mock_cluster.set_leader("moving", 0, new)
    assert leader_of(mock_cluster, "moving") == new
    # With the old leader gone only the new one can take the record.
    mock_cluster.broker_down(old)
    producer.produce("moving", value=b"after")
    assert deliveries.wait(producer, b"after") is None
    assert deliveries.offsets == {b"before": 0, b"after": 1}

    with pytest.raises(MockClusterError, match="Broker not available") as caught:
        mock_cluster.set_leader("moving", 0, 42)
    assert caught.value.code == KafkaError.BROKER_NOT_AVAILABLE


def test_a_down_leader_stalls_produce_until_it_is_up(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topic("outage")
    leader = leader_of(mock_cluster, "outage")
    deliveries = Deliveries()
    patient = Producer(
        mock_cluster.producer_config(
            {**QUIET, "on_delivery": deliveries}, reconnect_backoff_max_ms=500
        )
    )
    impatient = Producer(
        mock_cluster.producer_config({**QUIET, "on_delivery": deliveries}, message_timeout_ms=1000)
    )
    patient.produce("outage", value=b"warm-up")  # connect and learn the leader first
    impatient.produce("outage", value=b"warm-up-2")
    assert deliveries.wait(patient, b"warm-up") is None
    assert deliveries.wait(impatient, b"warm-up-2") is None

    mock_cluster.broker_down(leader)
    patient.produce("outage", value=b"waits")
    impatient.produce("outage", value=b"gives-up")
    err = deliveries.wait(impatient, b"gives-up")
    assert err is not None and err.code() == KafkaError._MSG_TIMED_OUT
    patient.poll(0)
    assert b"waits" not in deliveries.reports  # the whole second: no broker took it

    mock_cluster.broker_up(leader)
    assert deliveries.wait(patient, b"waits", timeout=15) is None
    assert deliveries.offsets[b"waits"] == 2


# -- error injection -------------------------------------------------------------------------


def test_retriable_produce_errors_are_retried_by_an_idempotent_producer(
    mock_cluster: MockCluster,
) -> None:
    mock_cluster.create_topic("retried")
    stats: list[dict[str, Any]] = []

    def stats_cb(raw: str) -> None:
        stats.append(json.loads(raw))

    deliveries = Deliveries()
    producer = Producer(
        mock_cluster.producer_config(
            {**QUIET, "on_delivery": deliveries, "stats_cb": stats_cb},
            enable_idempotence=True,
            statistics_interval_ms=100,
            retry_backoff_ms=10,
        )
    )
    producer.produce("retried", value=b"warm-up")  # InitProducerId and metadata first
    assert deliveries.wait(producer, b"warm-up") is None

    mock_cluster.push_request_errors(
        ApiKey.Produce,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION),
        19,  # NOT_ENOUGH_REPLICAS again, as a plain int
    )
    producer.produce("retried", value=b"once")
    assert deliveries.wait(producer, b"once") is None
    assert deliveries.offsets[b"once"] == 1

    def produce_requests() -> int:
        latest = stats[-1] if stats else {"brokers": {}}
        return sum(b["req"].get("Produce", 0) for b in latest["brokers"].values())

    # warm-up, three refused attempts, the one that stored it (partition-level retries are
    # not counted in txretries, so count the requests themselves)
    wait_for(lambda: (producer.poll(0.05), produce_requests() >= 5)[1], 10, "5 Produce requests")

    consumer = reader(mock_cluster, "retried")
    try:
        values = [m.value() for m in consume(consumer, 2, timeout=15)]
        assert values == [b"warm-up", b"once"]
        assert consumer.get_watermark_offsets(TopicPartition("retried", 0), timeout=5) == (0, 2)
    finally:
        consumer.close()


@pytest.mark.parametrize(
    "code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED]
)
def test_permanent_produce_errors_reach_the_delivery_report(
    mock_cluster: MockCluster, code: int
) -> None:
    mock_cluster.create_topic("refused")
    deliveries = Deliveries()
    producer = Producer(mock_cluster.producer_config({**QUIET, "on_delivery": deliveries}))
    mock_cluster.push_request_errors(ApiKey.Produce, code)
    producer.produce("refused", value=b"doomed")
    err = deliveries.wait(producer, b"doomed")
    assert err is not None and err.code() == code


def test_cleared_errors_are_not_returned(mock_cluster: MockCluster) -> None:
    mock_cluster.create_topic("cleared")
    deliveries = Deliveries()
    producer = Producer(mock_cluster.producer_config({**QUIET, "on_delivery": deliveries}))
    mock_cluster.push_request_errors(ApiKey.Produce, *[KafkaError.TOPIC_AUTHORIZATION_FAILED] * 5)
    mock_cluster.clear_request_errors(ApiKey.Produce)
    producer.produce("cleared", value=b"through")
    assert deliveries.wait(producer, b"through") is None

    with pytest.raises(ValueError, match="at least one"):
        mock_cluster.push_request_errors(ApiKey.Produce)
    with pytest.raises(TypeError, match="not a Kafka error code"):
        mock_cluster.push_request_errors(ApiKey.Produce, "oops")
