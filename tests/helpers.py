"""Shared test helpers: waiting on conditions with deadlines, finding processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def run_until(
    consumer: Any,
    handler: Callable[[Message], object],
    done: Callable[[], object],
    timeout: float = 60,
    **options: Any,
) -> None:
    """``consumer.run(handler, **options)`` in a thread until ``done()`` (``timeout`` seconds
    at most), then stop it and wait for it to close."""
    import threading

    thread = threading.Thread(target=consumer.run, args=(handler,), kwargs=options, daemon=True)
    thread.start()
    try:
        wait_for(done, timeout, "the records to be handled")
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


SESSION_ENV = "RK_TEST_SESSION"
"""Set by the test session (conftest.py) and inherited by every process it starts: the leak
check counts only those, so a chaos run or another suite on the machine is not a leak."""


def broker_processes(session: str | None = None) -> set[int]:
    """PIDs of every live Tansu broker, moto S3 server and test redis-server on this machine;
    with ``session``, only those whose environment carries ``RK_TEST_SESSION=<session>``
    (started by that test session, also when their parent has died since)."""
    marker = f"{SESSION_ENV}={session}".encode() if session else None
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        is_tansu = argv[0].endswith(b"tansu") and b"broker" in argv
        is_moto = b"moto.server" in argv
        is_redis = b"redis-server" in argv[0]  # it rewrites its title: no args to match
        if not (is_tansu or is_moto or is_redis) or not pid_alive(int(entry.name)):
            continue
        if marker is not None:
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker not in environ:
                continue
        found.add(int(entry.name))
    return found


def consume(consumer: Consumer, count: int, timeout: float = 30.0) -> list[Message]:
    """Poll until ``count`` messages (not errors) arrived; fail after ``timeout`` seconds."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        if time.monotonic() >= deadline:
            raise AssertionError(f"consumed {len(messages)} of {count} within {timeout}s")
        for msg in consumer.consume(count - len(messages), timeout=0.5):
            if msg.error() is None:
                messages.append(msg)
    return messages


def produce(config: dict[str, Any], topic: str, records: list[tuple[str, str]]) -> None:
    """Produce ``(key, value)`` records and fail the test unless every one is acknowledged."""
    from confluent_kafka import Producer

    errors: list[Any] = []
    producer = Producer({**config, "acks": "all"})
    for key, value in records:
        producer.produce(
            topic, key=key, value=value, on_delivery=lambda err, _m: err and errors.append(err)
        )
    assert producer.flush(30) == 0, "records still undelivered after 30s"
    producer.close()
    assert not errors, errors


def read_all(kafka: Any, topic: str, count: int) -> list[Message]:
    """``count`` records of ``topic`` from the beginning, read by a fresh group (once the
    topic exists: a consumer creates its retry/DLQ topics in the background)."""
    import uuid

    wait_for(lambda: topic in kafka.list_topics(), 30, f"topic {topic} to exist")
    reader = Consumer(
        kafka.client_config(group_id=f"reader-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest")
    )
    reader.subscribe([topic])
    try:
        return consume(reader, count)
    finally:
        reader.close()


def metric_total(registry: Any, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in ``registry`` whose labels include ``labels``."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def fresh_consumer(kafka: Any, **kwargs: Any) -> Any:
    """A ResilientConsumer in a group of its own, from the earliest offset, committing only
    what it settles (no auto-commit), with a registry of its own unless given one."""
    import uuid

    from prometheus_client import CollectorRegistry

    from resilient_kafka import ResilientConsumer

    kwargs.setdefault("registry", CollectorRegistry())
    return ResilientConsumer(
        kafka.client_config(
            group_id=f"group-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        ),
        **kwargs,
    )


def serve(
    run: Callable[..., None], handler: Any, done: Any, timeout: float = 60, **options: Any
) -> None:
    """``run(handler, **options)`` (a consumer's run or run_batches) on a thread until
    ``done()``; then stop it and wait for it to end."""
    import threading

    consumer = run.__self__  # type: ignore[attr-defined]
    thread = threading.Thread(target=run, args=(handler,), kwargs=options, daemon=True)
    thread.start()
    try:
        wait_for(done, timeout, "the records to be handled")
    finally:
        consumer.stop()
        thread.join(60)
    assert not thread.is_alive()


def committed_offsets(kafka: Any, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offsets of ``topic``'s partitions."""
    from confluent_kafka import TopicPartition

    reader = Consumer(kafka.client_config(group_id=group))
    try:
        tps = reader.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in tps]
    finally:
        reader.close()


def records_in(kafka: Any, topic: str, seconds: float = 3.0) -> list[Message]:
    """What ``topic`` holds (nothing if it does not exist), read for ``seconds`` from its start
    by assignment (no group join to wait for)."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    if topic not in kafka.list_topics():
        return []
    reader = Consumer(kafka.client_config(group_id=f"r-{uuid.uuid4().hex[:6]}"))
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        return [m for m in reader.consume(100, seconds) if m.error() is None]
    finally:
        reader.close()


def rdk_threads() -> int:
    """librdkafka's native threads in this process (librdkafka names them ``rdk:...``)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().startswith("rdk:")
        except OSError:
            continue  # the thread exited while we looked
    return count
