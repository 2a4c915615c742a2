"""``resilient-kafka demo``: the main job end to end on a real broker, with a report.

Sends keyed messages with delivery reports, consumes them in a consumer group, commits only
after processing, and checks that every message arrived once and every offset was committed.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from resilient_kafka import _config
from resilient_kafka._extras import require
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.testing._cluster import ExternalKafka, KafkaCluster

_TIMEOUT = 60.0


@dataclass
class DemoResult:
    """What the demo saw; ``ok`` only when nothing was lost, duplicated or left uncommitted."""

    bootstrap_servers: str
    topic: str
    sent: int
    delivered: int = 0
    delivery_errors: list[str] = field(default_factory=list)
    consumed: int = 0
    duplicates: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    produce_seconds: float = 0.0
    consume_seconds: float = 0.0

    @property
    def missing(self) -> int:
        return self.delivered - (self.consumed - self.duplicates)

    @property
    def ok(self) -> bool:
        return (
            self.delivered == self.sent
            and self.missing == 0
            and self.duplicates == 0
            and self.committed == self.end_offsets
        )


@contextlib.contextmanager
def _cluster(bootstrap_servers: str | None) -> Iterator[KafkaCluster]:
    bootstrap = bootstrap_servers or os.environ.get(_config.BOOTSTRAP_ENV, "").strip()
    if bootstrap:
        yield ExternalKafka(bootstrap, _config.extra_config_from_env())
        return
    from resilient_kafka.testing._embedded import EmbeddedKafka

    with EmbeddedKafka() as broker:
        yield broker


def round_trip(
    cluster: KafkaCluster, *, messages: int, partitions: int, progress: Any = None
) -> DemoResult:
    """Produce ``messages`` keyed records, consume and commit them, and account for each one."""
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    run_id = uuid.uuid4().hex[:8]
    topic = f"resilient-kafka-demo-{run_id}"
    cluster.create_topics({topic: partitions})
    result = DemoResult(cluster.bootstrap_servers, topic, sent=messages)

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            result.delivery_errors.append(str(err))
            return
        result.delivered += 1
        partition = msg.partition()
        result.end_offsets[partition] = max(result.end_offsets.get(partition, 0), msg.offset() + 1)

    producer = Producer(cluster.producer_config({"enable.idempotence": True, "acks": "all"}))
    task = progress.add_task("producing", total=messages) if progress else None
    started = time.monotonic()
    for i in range(messages):
        while True:
            try:
                producer.produce(
                    topic, key=f"order-{i}", value=f"{run_id}:{i}", on_delivery=on_delivery
                )
                break
            except BufferError:  # local queue full: serve delivery reports, then try again
                producer.poll(0.1)
        producer.poll(0)
        if progress:
            progress.update(task, completed=i + 1)
    remaining = producer.flush(_TIMEOUT)
    producer.close()
    result.produce_seconds = time.monotonic() - started
    if remaining:
        result.delivery_errors.append(f"{remaining} message(s) still undelivered after flush")

    consumer = Consumer(
        cluster.client_config(
            {
                "group.id": f"resilient-kafka-demo-{run_id}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    seen: Counter[str] = Counter()
    task = progress.add_task("consuming", total=result.delivered) if progress else None
    started = time.monotonic()
    deadline = started + _TIMEOUT
    try:
        consumer.subscribe([topic])
        while len(seen) < result.delivered and time.monotonic() < deadline:
            batch = consumer.consume(500, timeout=0.5)
            for msg in batch:
                if msg.error():
                    continue
                seen[(msg.value() or b"").decode()] += 1
            if batch:
                consumer.commit(asynchronous=False)  # commit only what was processed
            if progress:
                progress.update(task, completed=len(seen))
        result.consume_seconds = time.monotonic() - started
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
        result.committed = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    finally:
        consumer.close()
    result.consumed = sum(seen.values())
    result.duplicates = sum(count - 1 for count in seen.values())
    with contextlib.suppress(Exception):
        cluster.delete_topics([topic])
    return result


def run_demo(
    messages: int = 1000, partitions: int = 3, bootstrap_servers: str | None = None
) -> int:
    """Run the demo with progress bars and print a report; exit code 0 when nothing was lost."""
    if messages < 1 or partitions < 1:
        raise ConfigurationError(
            f"--messages and --partitions must be positive (got {messages} and {partitions})"
        )
    rich_console = require("rich.console", extra="demo", purpose="resilient-kafka demo")
    rich_progress = require("rich.progress", extra="demo", purpose="resilient-kafka demo")
    rich_table = require("rich.table", extra="demo", purpose="resilient-kafka demo")
    console = rich_console.Console()

    with _cluster(bootstrap_servers) as cluster:
        kind = "embedded Tansu broker" if not isinstance(cluster, ExternalKafka) else "cluster"
        console.print(f"Using the {kind} at [bold]{cluster.bootstrap_servers}[/bold]")
        with rich_progress.Progress(console=console, transient=True) as progress:
            result = round_trip(
                cluster, messages=messages, partitions=partitions, progress=progress
            )

    table = rich_table.Table(title=f"Round trip through {result.topic}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rate = result.delivered / result.produce_seconds if result.produce_seconds else 0.0
    table.add_row("sent", str(result.sent))
    table.add_row("delivered (acks=all)", f"{result.delivered}  ({rate:,.0f} msg/s)")
    table.add_row("delivery errors", str(len(result.delivery_errors)))
    table.add_row("consumed", f"{result.consumed}  in {result.consume_seconds:.1f}s")
    table.add_row("missing", str(result.missing))
    table.add_row("duplicates", str(result.duplicates))
    for partition in sorted(result.end_offsets):
        table.add_row(
            f"partition {partition} end / committed",
            f"{result.end_offsets[partition]} / {result.committed.get(partition, '-')}",
        )
    console.print(table)
    for error in result.delivery_errors[:5]:
        console.print(f"[red]delivery error:[/red] {error}")
    if result.ok:
        console.print("[green]OK[/green]: every message delivered, consumed once and committed.")
        return 0
    console.print("[red]FAILED[/red]: see the table above.")
    return 1
