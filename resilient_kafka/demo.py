"""``resilient-kafka demo``: the main job end to end on a real broker, with live progress.

A producer streams order events; a ResilientConsumer's handler charges each order through a
simulated flaky payment service (transient outages that retry topics absorb, poison orders that
go straight to the DLQ, a few that keep failing until their retries run out). It is guarded by a
circuit breaker. Midway the service goes down entirely: the breaker opens, consumption pauses,
the DLQ stops growing, a probe finds the service back and the backlog drains. The run ends with
an accounting: every order was paid, or is in the dead-letter queue — none lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from resilient_kafka import _config, headers
from resilient_kafka._extras import require
from resilient_kafka.breaker import CircuitBreaker
from resilient_kafka.consumer import ResilientConsumer
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.policies import RetryPolicy
from resilient_kafka.producer import ResilientProducer
from resilient_kafka.testing._cluster import ExternalKafka, KafkaCluster


class PaymentDeclined(Exception):
    """The order itself is bad (a poison record): retrying cannot help."""


class PaymentServiceUnavailable(ConnectionError):
    """The payment service is flaky: a later attempt may succeed."""


class CardIssuerUnavailable(ConnectionError):
    """This order's card issuer cannot be reached: retryable, but says nothing about the
    payment service itself, so it does not trip the breaker."""


class FlakyPaymentService:
    """Deterministic per order: ~2 % poison (declined), ~12 % fail once and ~3 % twice with a
    503, ~1 % never recover (their issuer is unreachable; retries run out). The rest succeed at
    once. During ``outage`` every call fails."""

    def __init__(self, outage: tuple[float, float] | None = None) -> None:
        self.charges = 0
        self.calls_during_outage = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._outage = outage  # (start, end) in seconds after start: everything fails

    def down(self) -> bool:
        if self._outage is None:
            return False
        start, end = self._outage
        return start <= time.monotonic() - self._started < end

    @staticmethod
    def _roll(order_id: str) -> int:
        return int(hashlib.sha256(order_id.encode()).hexdigest()[:8], 16) % 1000

    def charge(self, order_id: str, attempt: int) -> None:
        roll = self._roll(order_id)
        with self._lock:
            self.charges += 1
        if self.down():
            with self._lock:
                self.calls_during_outage += 1
            raise PaymentServiceUnavailable("payment service is down")
        if roll < 20:
            raise PaymentDeclined(f"card declined for {order_id}")
        if roll < 30:
            raise CardIssuerUnavailable(f"card issuer for {order_id} timed out")
        if roll < 180 and attempt < (2 if roll >= 150 else 1):
            raise PaymentServiceUnavailable("payment service returned 503")


@dataclass
class Accounting:
    """Where every order ended up."""

    produced: set[str] = field(default_factory=set)
    paid: set[str] = field(default_factory=set)
    dead_lettered: dict[str, str] = field(default_factory=dict)  # order id -> rk.reason
    handled_per_attempt: Counter[int] = field(default_factory=Counter)
    delivery_errors: int = 0
    timeline: dict[str, float] = field(default_factory=dict)  # event -> seconds after start
    dlq_at: dict[str, int] = field(default_factory=dict)  # event -> DLQ size then

    @property
    def lost(self) -> set[str]:
        return self.produced - self.paid - set(self.dead_lettered)

    @property
    def settled(self) -> bool:
        return bool(self.produced) and not self.lost


@contextlib.contextmanager
def _cluster(bootstrap_servers: str | None) -> Iterator[KafkaCluster]:
    bootstrap = bootstrap_servers or os.environ.get(_config.BOOTSTRAP_ENV, "").strip()
    if bootstrap:
        yield ExternalKafka(bootstrap, _config.extra_config_from_env())
        return
    from resilient_kafka.testing._embedded import EmbeddedKafka

    with EmbeddedKafka() as broker:
        yield broker


class OrderPipeline:
    """Producer, ResilientConsumer and a DLQ reader running against one cluster."""

    def __init__(
        self,
        cluster: KafkaCluster,
        *,
        messages: int,
        rate: float,
        delays: tuple[float, ...],
        outage: tuple[float, float] | None = None,
        partitions: int = 3,
    ) -> None:
        run = uuid.uuid4().hex[:6]
        self.cluster = cluster
        self.topic = f"orders-{run}"
        self.group = f"payments-{run}"
        self.messages = messages
        self.rate = rate
        self.accounting = Accounting()
        self.service = FlakyPaymentService(outage)
        self.lock = threading.Lock()
        cluster.create_topics({self.topic: partitions})
        # declined cards and unreachable issuers say nothing about the payment service's health
        self.breaker = CircuitBreaker(
            "payments",
            fail_max=5,
            reset_timeout=2.0,
            exclude=[PaymentDeclined, CardIssuerUnavailable],
        )
        self.consumer = ResilientConsumer(
            cluster.client_config(group_id=self.group, auto_offset_reset="earliest"),
            retry=RetryPolicy(delays=delays, dead_letter_on=(PaymentDeclined,)),
            breakers=[self.breaker],
            metrics_port=0,
        )
        self.consumer.subscribe([self.topic])
        self.dlq_topic = self.consumer.dead_letter_topic(self.topic)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._produce, name="producer", daemon=True),
            threading.Thread(target=self.consumer.run, args=(self._handle,), daemon=True),
            threading.Thread(target=self._read_dlq, name="dlq-reader", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.consumer.stop()
        for thread in self._threads:
            thread.join(60)

    def _handle(self, msg: Any) -> None:
        order_id = msg.key().decode()
        attempt = headers.attempt(msg)
        with self.lock:
            self.accounting.handled_per_attempt[attempt] += 1
        self.breaker.call(self.service.charge, order_id, attempt)
        with self.lock:
            self.accounting.paid.add(order_id)

    def _produce(self) -> None:
        producer = ResilientProducer(self.cluster.producer_config())

        def delivered(err: Any, msg: Any) -> None:
            with self.lock:
                if err is None:
                    self.accounting.produced.add(msg.key().decode())
                else:
                    self.accounting.delivery_errors += 1

        started = time.monotonic()
        for i in range(self.messages):
            if self._stop.is_set():
                break
            order = f"order-{i:06d}"
            value = f'{{"order": "{order}", "amount_cents": {100 + i % 900}}}'
            producer.produce(self.topic, key=order, value=value, on_delivery=delivered)
            producer.poll(0)
            ahead = (i + 1) / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self._stop.wait(ahead)
        producer.flush(30)
        producer.close()

    def _read_dlq(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        reader = Consumer(
            self.cluster.client_config(
                group_id=f"{self.group}-dlq-audit", auto_offset_reset="earliest"
            )
        )
        try:
            # The consumer creates its DLQ in the background after subscribe(). A subscription
            # to a topic that does not exist yet is only rechecked at librdkafka's next full
            # metadata refresh (5 minutes by default): subscribe once the topic is there.
            while not self._stop.is_set():
                with contextlib.suppress(KafkaException):
                    if self.dlq_topic in reader.list_topics(timeout=1).topics:
                        break
                self._stop.wait(0.2)
            reader.subscribe([self.dlq_topic])
            while not self._stop.is_set():
                for msg in reader.consume(100, timeout=0.2):
                    if msg.error() is None:
                        reason = headers.header_dict(msg).get(headers.REASON, b"?").decode()
                        with self.lock:
                            order = (msg.key() or b"").decode()
                            self.accounting.dead_lettered[order] = reason
        finally:
            reader.close()

    def observe(self, elapsed: float) -> None:
        """Note the outage timeline: service down, consumer paused, service up, resumed."""
        acc = self.accounting
        down, paused = self.service.down(), self.consumer.outage is not None
        with self.lock:
            dlq = len(acc.dead_lettered)
            for event, happened in (
                ("service down", down),
                ("consumer paused", paused),
                ("service back", "service down" in acc.timeline and not down),
                ("consumer resumed", "consumer paused" in acc.timeline and not paused),
            ):
                if happened and event not in acc.timeline:
                    acc.timeline[event] = elapsed
                    acc.dlq_at[event] = dlq

    def settled(self) -> bool:
        """Every order produced, and each one paid or dead-lettered."""
        with self.lock:
            acc = self.accounting
            return len(acc.produced) + acc.delivery_errors >= self.messages and acc.settled


def _progress_table(pipeline: OrderPipeline, rich_table: Any, elapsed: float) -> Any:
    acc = pipeline.accounting
    outage = pipeline.consumer.outage
    paused = len(outage.partitions) if outage is not None else 0
    with pipeline.lock:
        reasons = Counter(acc.dead_lettered.values())
        rows = [
            ("orders produced", f"{len(acc.produced)} / {pipeline.messages}"),
            ("paid", str(len(acc.paid))),
            ("first attempts", str(acc.handled_per_attempt[0])),
            *(
                (f"retries from tier {n}", str(acc.handled_per_attempt[n]))
                for n in range(1, len(pipeline.consumer.retry_topics(pipeline.topic)) + 1)
            ),
            ("dead-lettered", f"{len(acc.dead_lettered)}  {dict(reasons) or ''}"),
            ("not yet settled", str(len(acc.lost))),
            ("payment service", "DOWN" if pipeline.service.down() else "up"),
            ("circuit breaker", pipeline.breaker.current_state),
            ("paused partitions", str(paused)),
        ]
    table = rich_table.Table(title=f"orders → payments  ({elapsed:.0f}s)")
    table.add_column("stage")
    table.add_column("orders", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def run_demo(
    messages: int = 2000,
    rate: float = 100.0,
    delays: tuple[float, ...] = (1.0, 3.0, 10.0),
    outage: tuple[float, float] | None = (8.0, 18.0),
    bootstrap_servers: str | None = None,
    timeout: float = 300.0,
) -> int:
    """Run the pipeline with a live view and print the accounting; 0 when nothing was lost."""
    if messages < 1 or rate <= 0:
        raise ConfigurationError(
            f"--messages and --rate must be positive (got {messages} and {rate})"
        )
    rich_console = require("rich.console", extra="demo", purpose="resilient-kafka demo")
    rich_live = require("rich.live", extra="demo", purpose="resilient-kafka demo")
    rich_table = require("rich.table", extra="demo", purpose="resilient-kafka demo")
    console = rich_console.Console()

    with _cluster(bootstrap_servers) as cluster:
        kind = "embedded Tansu broker" if not isinstance(cluster, ExternalKafka) else "cluster"
        console.print(f"Using the {kind} at [bold]{cluster.bootstrap_servers}[/bold]")
        pipeline = OrderPipeline(
            cluster, messages=messages, rate=rate, delays=delays, outage=outage
        )
        console.print(f"Prometheus metrics: {pipeline.consumer.metrics_url}")
        console.print(
            f"{messages} orders at {rate:g}/s into [bold]{pipeline.topic}[/bold]; retry tiers "
            f"{', '.join(pipeline.consumer.retry_topics(pipeline.topic))}; "
            f"DLQ {pipeline.dlq_topic}"
        )
        started = time.monotonic()
        pipeline.start()
        try:
            with rich_live.Live(console=console, refresh_per_second=4, transient=False) as live:
                while time.monotonic() - started < timeout:
                    pipeline.observe(time.monotonic() - started)
                    live.update(_progress_table(pipeline, rich_table, time.monotonic() - started))
                    if pipeline.settled():
                        break
                    time.sleep(0.25)
                live.update(_progress_table(pipeline, rich_table, time.monotonic() - started))
        finally:
            pipeline.stop()

    acc = pipeline.accounting
    lost = acc.lost
    summary = rich_table.Table(title="Accounting")
    summary.add_column("orders")
    summary.add_column("count", justify="right")
    summary.add_row("produced (acknowledged)", str(len(acc.produced)))
    summary.add_row("paid", str(len(acc.paid & acc.produced)))
    for reason, count in sorted(Counter(acc.dead_lettered.values()).items()):
        summary.add_row(f"in the DLQ ({reason})", str(count))
    summary.add_row("payment calls", str(pipeline.service.charges))
    summary.add_row("lost", str(len(lost)))
    console.print(summary)
    if acc.timeline:
        timeline = rich_table.Table(title="Outage timeline")
        timeline.add_column("event")
        timeline.add_column("at", justify="right")
        timeline.add_column("DLQ size", justify="right")
        for event, at in sorted(acc.timeline.items(), key=lambda item: item[1]):
            timeline.add_row(event, f"{at:.1f}s", str(acc.dlq_at[event]))
        console.print(timeline)
        console.print(
            f"payment calls while the service was down: {pipeline.service.calls_during_outage} "
            "(failures before the breaker opened, then one probe per reset timeout)"
        )
    if acc.delivery_errors:
        console.print(f"[red]{acc.delivery_errors} orders could not be produced[/red]")
    if acc.settled and not acc.delivery_errors:
        console.print("[green]OK[/green]: every order was paid or is in the DLQ; 0 lost.")
        return 0
    console.print(f"[red]FAILED[/red]: {len(lost)} orders unaccounted for: {sorted(lost)[:10]}")
    return 1
