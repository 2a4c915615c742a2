"""``python -m benchmarks.concurrency``: run() with concurrent handlers, against sequential.

Every case reads the same preloaded topic (1,000 keys over 4 partitions) with a fresh group,
and a handler that waits 10 ms (``time.sleep``, or ``asyncio.sleep`` for the ``async def``
cases). Each case counts the records handled in a fixed window after its first one; the
table gives records/s and the ratio to sequential in the same run, and checks key order (a
key's records must reach the handler in offset order). ``noop_threads_64`` has a handler that
does nothing: its µs/record against ``raw_consume`` is the cost of dispatch.

python -m benchmarks.concurrency [-b BOOTSTRAP] [--seconds S] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from benchmarks._workload import consumer_config
from resilient_kafka import ResilientConsumer

KEYS = 1000
PARTITIONS = 4
WORK = 0.010  # seconds each handler waits


def _preload(config: dict[str, Any], topic: str, count: int, hot_share: float = 0.0) -> None:
    producer = Producer({**config, "linger.ms": 20, "acks": "all"})
    hot_every = int(1 / hot_share) if hot_share else 0
    failures: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err)

    for i in range(count):
        key = "hot" if hot_every and i % hot_every == 0 else f"key-{i % KEYS}"
        while True:
            try:
                producer.produce(topic, b"v" * 100, key.encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) or failures:
        raise RuntimeError(f"preloading {topic} failed: {failures[:3] or 'flush timed out'}")


class _Window:
    """Counts handled records in ``seconds`` after the first (or until they run out), then
    stops the consumer; checks per-key offset order."""

    def __init__(self, seconds: float, stop: Callable[[], None]) -> None:
        self.seconds = seconds
        self._stop = stop
        self.lock = threading.Lock()
        self.count = 0
        self.started = 0.0
        self.last = 0.0
        self.offsets: dict[tuple[int, bytes], int] = {}
        self.reorders = 0
        self.rss_kb: list[int] = []

    def handled(self, msg: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            key = (msg.partition(), msg.key())
            if self.offsets.get(key, -1) > msg.offset():
                self.reorders += 1
            self.offsets[key] = msg.offset()
            if not self.started:
                self.started = now
                # the window ends on time even if the records run out before it
                threading.Timer(self.seconds, self._stop).start()
            elif now - self.started <= self.seconds:
                self.count += 1
                self.last = now
            if self.count % 500 == 0:
                self.rss_kb.append(_rss_kb())

    @property
    def rate(self) -> float:
        elapsed = self.last - self.started
        return self.count / elapsed if elapsed > 0 else 0.0


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _case(
    config: dict[str, Any],
    topic: str,
    seconds: float,
    *,
    asynchronous: bool,
    work: float = WORK,
    **run: Any,
) -> dict[str, Any]:
    consumer = ResilientConsumer(consumer_config(config), registry=CollectorRegistry())
    window = _Window(seconds, consumer.stop)
    if asynchronous:

        async def handler(msg: Any) -> None:
            await asyncio.sleep(work)
            window.handled(msg)

        run_handler: Any = handler
    else:

        def plain(msg: Any) -> None:
            if work:
                time.sleep(work)
            window.handled(msg)

        run_handler = plain
    consumer.subscribe([topic])
    consumer.run(run_handler, **run)
    rate = window.rate
    rss = window.rss_kb
    return {
        "records_per_s": rate,
        "us_per_record": 1e6 / rate if rate else 0.0,
        "reorders": window.reorders,
        "rss_growth_mb": (max(rss) - rss[0]) / 1024 if len(rss) > 1 else 0.0,
    }


def _raw_consume(config: dict[str, Any], topic: str, seconds: float) -> dict[str, Any]:
    consumer = Consumer(consumer_config(config))
    consumer.subscribe([topic])
    count, started, last = 0, 0.0, 0.0
    try:
        while not started or (time.perf_counter() - started < seconds):
            batch = consumer.consume(1000, 1.0)
            if not batch and started:
                break  # the topic is read to its end
            for msg in batch:
                if msg.error() is not None:
                    continue
                now = time.perf_counter()
                if not started:
                    started = now
                elif now - started <= seconds:
                    count += 1
                    last = now
    finally:
        consumer.close()
    rate = count / (last - started) if last > started else 0.0
    return {"records_per_s": rate, "us_per_record": 1e6 / rate if rate else 0.0, "reorders": 0}


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[dict[str, Any]]:
    if bootstrap:
        yield {"bootstrap.servers": bootstrap}
        return
    from resilient_kafka.testing import EmbeddedKafka

    with EmbeddedKafka() as kafka:
        yield kafka.client_config()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrency")
    parser.add_argument("-b", "--bootstrap", help="an existing cluster")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed window per case")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: dict[str, dict[str, Any]] = {}
    with _broker(args.bootstrap) as config:
        from confluent_kafka.admin import AdminClient

        from resilient_kafka._admin import create_topics

        run_id = uuid.uuid4().hex[:6]
        topic, hot = f"bench-conc-{run_id}", f"bench-conc-hot-{run_id}"
        admin = AdminClient({"bootstrap.servers": config["bootstrap.servers"]})
        create_topics(admin, {topic: PARTITIONS, hot: PARTITIONS}, where="the benchmark broker")
        console.print("[dim]preloading…[/dim]")
        started = time.monotonic()
        _preload(config, topic, 100_000)
        _preload(config, hot, 50_000, hot_share=0.5)
        console.print(f"[dim]preloaded in {time.monotonic() - started:.0f}s[/dim]")
        cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("raw_consume", lambda: _raw_consume(config, topic, args.seconds)),
            ("sequential", lambda: _case(config, topic, args.seconds, asynchronous=False)),
            (
                "threads_16",
                lambda: _case(config, topic, args.seconds, asynchronous=False, concurrency=16),
            ),
            (
                "threads_64",
                lambda: _case(config, topic, args.seconds, asynchronous=False, concurrency=64),
            ),
            (
                "asyncio_100",
                lambda: _case(config, topic, args.seconds, asynchronous=True, concurrency=100),
            ),
            (
                "asyncio_1000",
                lambda: _case(config, topic, args.seconds, asynchronous=True, concurrency=1000),
            ),
            (
                "hot_key_threads_64",
                lambda: _case(config, hot, args.seconds, asynchronous=False, concurrency=64),
            ),
            (
                "noop_threads_64",
                lambda: _case(
                    config, topic, args.seconds, asynchronous=False, work=0.0, concurrency=64
                ),
            ),
        ]
        for name, case in cases:
            console.print(f"[dim]running {name}…[/dim]")
            results[name] = case()
    sequential = results["sequential"]["records_per_s"]
    table = Table(title=f"run() concurrency, handler waits {WORK * 1000:.0f} ms")
    for column in ("case", "records/s", "x sequential", "µs/record", "key reorders", "RSS +MB"):
        table.add_column(column, justify="right" if column != "case" else "left")
    for name, r in results.items():
        ratio = r["records_per_s"] / sequential if sequential else 0.0
        r["vs_sequential"] = ratio
        table.add_row(
            name,
            f"{r['records_per_s']:,.0f}",
            f"{ratio:,.1f}",
            f"{r['us_per_record']:,.1f}",
            str(r["reorders"]),
            f"{r.get('rss_growth_mb', 0.0):.1f}",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
