"""The measured cases. Each reads a preloaded topic with a fresh group and times the first to the
last record, so group joins (slow on Tansu) stay out of the numbers."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from benchmarks._workload import (
    VALUE_BYTES,
    WARMUP,
    BatchCounter,
    Counter,
    consumer_config,
    warm_up,
)
from resilient_kafka import ResilientConsumer, ResilientProducer, RetryPolicy


@dataclass
class Result:
    name: str
    count: int
    elapsed: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def msgs_per_s(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def us_per_msg(self) -> float:
        return self.elapsed / self.count * 1e6 if self.count else 0.0


@dataclass
class Setup:
    """What every case gets: client config for the broker and the preloaded topic."""

    config: dict[str, Any]
    topic: str
    count: int
    partitions: int
    warmup: float = WARMUP


# -- raw confluent-kafka -----------------------------------------------------------------------


def raw_consume(s: Setup) -> Result:
    consumer = Consumer(consumer_config(s.config))
    consumer.subscribe([s.topic])
    seen, started = 0, 0.0
    try:
        while seen < s.count:
            for msg in consumer.consume(1000, 1.0):
                if msg.error() is not None:
                    continue
                msg.value()
                if not seen:
                    started = warm_up(s.warmup)
                seen += 1
        return Result("raw_consume", seen - 1, time.perf_counter() - started, "consume(1000)")
    finally:
        consumer.close()


def _poll_loop(consumer: Any, s: Setup, name: str, note: str) -> Result:
    """One poll() per record, the way applications write their own loop."""
    consumer.subscribe([s.topic])
    seen, started = 0, 0.0
    try:
        while seen < s.count:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            msg.value()
            if not seen:
                started = warm_up(s.warmup)
            seen += 1
        return Result(name, seen - 1, time.perf_counter() - started, note)
    finally:
        consumer.close()


def raw_poll(s: Setup) -> Result:
    return _poll_loop(Consumer(consumer_config(s.config)), s, "raw_poll", "poll()")


# -- ResilientConsumer -------------------------------------------------------------------------


def _run(s: Setup, name: str, note: str, **options: Any) -> Result:
    consumer = ResilientConsumer(consumer_config(s.config), **options)
    counter = Counter(s.count, s.warmup)
    counter.stop = consumer.stop
    consumer.subscribe([s.topic])
    consumer.run(counter)  # returns once the last record is handled and the consumer closed
    return Result(name, counter.timed, counter.elapsed, note)


def resilient_run_metrics_off(s: Setup) -> Result:
    return _run(s, "resilient_run_metrics_off", "run(handler), metrics=False", metrics=False)


def resilient_run_metrics_on(s: Setup) -> Result:
    return _run(
        s, "resilient_run_metrics_on", "run(handler), metrics on", registry=CollectorRegistry()
    )


def resilient_run_batches(
    s: Setup, name: str = "resilient_run_batches", note: str = "", **options: Any
) -> Result:
    consumer = ResilientConsumer(consumer_config(s.config), registry=CollectorRegistry(), **options)
    counter = BatchCounter(s.count, s.warmup)
    counter.stop = consumer.stop
    consumer.subscribe([s.topic])
    consumer.run_batches(counter, max_records=1000)
    return Result(name, counter.timed, counter.elapsed, f"run_batches(handler), 1000{note}")


def resilient_run_batches_dedup_sqlite(s: Setup) -> Result:
    import tempfile

    from resilient_kafka.dedup import SQLiteStore

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"{tmp}/dedup.db")
        try:
            return resilient_run_batches(
                s, "resilient_run_batches_dedup_sqlite", ", dedup=SQLiteStore", dedup=store
            )
        finally:
            store.close()


def resilient_run_batches_dedup_redis(s: Setup) -> Result:
    from resilient_kafka.dedup import RedisStore
    from resilient_kafka.testing._redis import redis_server

    with redis_server() as url:
        store = RedisStore(url)
        try:
            return resilient_run_batches(
                s, "resilient_run_batches_dedup_redis", ", dedup=RedisStore", dedup=store
            )
        finally:
            store.close()


def _dedup_run(s: Setup, name: str, store: Any) -> Result:
    try:
        return _run(
            s,
            name,
            f"metrics on, dedup={type(store).__name__}",
            registry=CollectorRegistry(),
            dedup=store,
        )
    finally:
        store.close()


def resilient_run_dedup_memory(s: Setup) -> Result:
    from resilient_kafka.dedup import MemoryStore

    return _dedup_run(s, "resilient_run_dedup_memory", MemoryStore(max_entries=s.count + 10))


def resilient_run_dedup_sqlite(s: Setup) -> Result:
    import tempfile

    from resilient_kafka.dedup import SQLiteStore

    with tempfile.TemporaryDirectory() as tmp:
        return _dedup_run(s, "resilient_run_dedup_sqlite", SQLiteStore(f"{tmp}/dedup.db"))


def resilient_run_dedup_redis(s: Setup) -> Result:
    from resilient_kafka.dedup import RedisStore
    from resilient_kafka.testing._redis import redis_server

    with redis_server() as url:
        return _dedup_run(s, "resilient_run_dedup_redis", RedisStore(url))


def _output_run(s: Setup, name: str, note: str, **options: Any) -> Result:
    """A handler that writes one output record per input through the consumer's producer."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    out = f"{s.topic}-out-{name}"
    admin_config = {k: v for k, v in s.config.items() if not k.startswith(("group.", "session."))}
    admin = AdminClient(admin_config)
    for future in admin.create_topics([NewTopic(out, 1)]).values():
        future.result()
    consumer = ResilientConsumer(consumer_config(s.config), registry=CollectorRegistry(), **options)
    counter = Counter(s.count, s.warmup)
    counter.stop = consumer.stop
    produce = consumer.producer.produce

    def handler(msg: Any) -> None:
        produce(out, msg.value())
        counter(msg)

    consumer.subscribe([s.topic])
    consumer.run(handler)
    return Result(name, counter.timed, counter.elapsed, note)


def resilient_run_with_output(s: Setup) -> Result:
    return _output_run(s, "resilient_run_with_output", "one output record per input")


def resilient_run_exactly_once(s: Setup) -> Result:
    return _output_run(
        s,
        "resilient_run_exactly_once",
        "one output record per input, exactly_once=True",
        exactly_once=True,
    )


def _tracer_provider(ratio: float) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class _Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    return provider


def _traced_run(s: Setup, name: str, note: str, ratio: float) -> Result:
    provider = _tracer_provider(ratio)
    try:
        result = _run(s, name, note, registry=CollectorRegistry(), tracer_provider=provider)
        result.extra["floor_us"] = span_floor_us(provider)
        return result
    finally:
        provider.shutdown()


def span_floor_us(provider: Any, count: int = 50_000) -> float:
    """µs for the least a traced record needs from the OpenTelemetry API: a bare span started,
    made current around the handler (its children and forwards join its trace) and ended;
    best of 3."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace

    tracer = provider.get_tracer("floor")
    attach, detach, current = (
        otel_context.attach,
        otel_context.detach,
        otel_trace.set_span_in_context,
    )
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            span = tracer.start_span("process t")
            detach(attach(current(span)))
            span.end()
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    return best


def resilient_run_tracing_on(s: Setup) -> Result:
    return _traced_run(
        s, "resilient_run_tracing_on", "metrics on, tracing 10% sampled (BatchSpanProcessor)", 0.1
    )


def resilient_run_tracing_unsampled(s: Setup) -> Result:
    return _traced_run(
        s, "resilient_run_tracing_unsampled", "metrics on, tracer provider sampling 0%", 0.0
    )


def resilient_poll_loop(s: Setup) -> Result:
    consumer = ResilientConsumer(consumer_config(s.config), registry=CollectorRegistry())
    return _poll_loop(consumer, s, "resilient_poll_loop", "drop-in poll()")


class _FailTenth:
    """Fails every tenth record once (first attempt only); times main-topic records apart."""

    def __init__(self, s: Setup) -> None:
        self.main_target = s.count
        self.retry_target = len(range(0, s.count, 10))
        self.main = Counter(self.main_target, s.warmup)
        self.retried = Counter(self.retry_target)
        self.main.stop = self.retried.stop = self._maybe_stop
        self.stop: Any = None
        self.topic = s.topic

    def _maybe_stop(self) -> None:
        if self.main.count >= self.main_target and self.retried.count >= self.retry_target:
            self.stop()

    def __call__(self, msg: Any) -> None:
        if msg.topic() == self.topic:
            self.main(msg)
            if int(msg.key()) % 10 == 0:
                raise TimeoutError("downstream timed out")
        else:
            self.retried(msg)


def retry_10pct(s: Setup) -> list[Result]:
    handler = _FailTenth(s)
    consumer = ResilientConsumer(
        consumer_config(s.config), retry=RetryPolicy(delays=(1.0,)), registry=CollectorRegistry()
    )
    handler.stop = consumer.stop
    consumer.subscribe([s.topic])
    consumer.run(handler)
    return [
        Result(
            "retry_10pct_main_topic",
            handler.main.timed,
            handler.main.elapsed,
            "10% fail once; main-topic records while their retries wait 1 s",
        ),
        Result(
            "retry_10pct_retry_path",
            handler.retried.timed,
            handler.retried.elapsed,
            "the retried 10%, handled from the 1 s retry tier",
        ),
    ]


def dlq_publish(s: Setup) -> Result:
    consumer = ResilientConsumer(
        consumer_config(s.config),
        retry=RetryPolicy(retry_on=(TimeoutError,)),
        registry=CollectorRegistry(),
    )
    seen = {"n": 0, "t0": 0.0, "acked": 0.0}
    drain = consumer._drain  # run() waits here, on its way out, for the last DLQ acks

    def timed_drain(timeout: float) -> bool:
        done = drain(timeout)
        if not seen["acked"]:
            seen["acked"] = time.perf_counter()
        return done

    consumer._drain = timed_drain  # type: ignore[method-assign]

    def handler(msg: Any) -> None:
        n = seen["n"] = seen["n"] + 1
        if n == 1:
            seen["t0"] = warm_up(s.warmup)
        if n == s.count:
            consumer.stop()
        raise ValueError("not retryable: straight to the DLQ")

    consumer.subscribe([s.topic])
    consumer.run(handler)
    return Result(
        "dlq_publish",
        s.count - 1,
        seen["acked"] - seen["t0"],
        "every record dead-lettered; until the last DLQ copy is acknowledged",
    )


# -- producing ---------------------------------------------------------------------------------


def _produce(producer: Any, topic: str, count: int) -> float:
    value = b"v" * VALUE_BYTES
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value, str(i).encode())
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(120):
        raise RuntimeError("flush timed out")
    return time.perf_counter() - started


def produce(s: Setup, topic: str) -> list[Result]:
    """Raw Producer and ResilientProducer with the same settings (idempotent, acks=all)."""
    conf = {**s.config, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    raw = _produce(Producer(conf), topic, s.count)
    resilient = _produce(ResilientProducer(conf, registry=CollectorRegistry()), topic, s.count)
    return [
        Result("raw_produce", s.count, raw, "Producer, idempotent, acks=all, until flushed"),
        Result("resilient_produce", s.count, resilient, "ResilientProducer, same settings"),
    ]


# -- latency -----------------------------------------------------------------------------------


def _paced_producer(config: dict[str, Any], topic: str, rate: int, seconds: float) -> None:
    producer = Producer({**config, "linger.ms": 0})
    interval = 1.0 / rate
    next_at = time.perf_counter()
    end = next_at + seconds
    while next_at < end:
        now = time.perf_counter()
        if now < next_at:
            time.sleep(next_at - now)  # pacing the load, not synchronising the test
        producer.produce(topic, struct.pack("!d", time.time()) + b"v" * (VALUE_BYTES - 8))
        producer.poll(0)
        next_at += interval
    producer.flush(30)


def _latency_once(
    s: Setup, topic: str, name: str, rate: int, seconds: float, warmup: float, join: float
) -> list[float]:
    samples: list[float] = []
    first: list[float] = []

    def record(msg: Any) -> None:
        sent = struct.unpack("!d", msg.value()[:8])[0]
        now = time.time()
        if not first:
            first.append(now)
        if now - first[0] >= warmup:  # skip the backlog produced while the group joined
            samples.append(now - sent)

    producer = threading.Thread(
        target=_paced_producer, args=(s.config, topic, rate, seconds + warmup + join)
    )
    fetch = {"fetch.wait.max.ms": 100}
    if name == "raw_poll_latency":
        consumer = Consumer(consumer_config(s.config, **fetch))
        consumer.subscribe([topic])
        producer.start()
        while producer.is_alive():
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                record(msg)
        consumer.close()
    else:
        resilient = ResilientConsumer(
            consumer_config(s.config, **fetch), registry=CollectorRegistry()
        )
        resilient.subscribe([topic])
        producer.start()

        def stop_when_sent() -> None:
            producer.join()
            resilient.stop()

        watcher = threading.Thread(target=stop_when_sent)
        watcher.start()
        resilient.run(record)
        watcher.join()
    producer.join()
    return samples


def latency(
    s: Setup, topic: str, *, rate: int, seconds: float, warmup: float = 1.5, join: float = 5.0
) -> list[Result]:
    """End-to-end produce→handle latency at a fixed rate, raw poll() and ResilientConsumer.run.

    The load runs ``join`` seconds (the group join's allowance) + ``warmup`` + ``seconds``."""
    results = []
    for name in ("raw_poll_latency", "resilient_run_latency"):  # a topic each: no backlog
        samples = sorted(_latency_once(s, f"{topic}.{name}", name, rate, seconds, warmup, join))
        if not samples:
            raise RuntimeError(f"{name}: no latency samples")
        p50 = samples[len(samples) // 2]
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        results.append(
            Result(
                name,
                len(samples),
                0.0,
                f"{rate} msg/s, fetch.wait.max.ms=100",
                {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000},
            )
        )
    return results


# -- memory ------------------------------------------------------------------------------------


def rss_growth(s: Setup) -> Result:
    """RSS of a fresh process running ``ResilientConsumer.run`` over ``s.count`` records."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rss", json.dumps(s.config), s.topic, str(s.count)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rss run exited {done.returncode}: {done.stderr.strip()[-800:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    warm, end = out["rss_warm"] / 2**20, out["rss_end"] / 2**20
    return Result(
        "rss_growth",
        s.count,
        out["elapsed"],
        f"run(handler), metrics on, own process: RSS {warm:.0f} MB after 10% → {end:.0f} MB",
        {"rss_growth_mb": round(end - warm, 2)},
    )


# -- peers -------------------------------------------------------------------------------------

PEERS = Path(__file__).parent / "peers"


def peer(name: str, python: str, args: list[str], s: Setup, count: int) -> Result:
    """A peer framework in its own process (and possibly virtualenv), same broker and topic."""
    script = "quixstreams_peer.py" if name == "quixstreams" else "faststream_peer.py"
    command = [python, str(PEERS / script), *args, s.config["bootstrap.servers"], s.topic]
    done = subprocess.run(
        [*command, str(count), str(s.warmup)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(name, out["count"] - 1, out["elapsed"], "no-op handler, own process")
