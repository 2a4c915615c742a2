"""OpenTelemetry tracing across retry hops, on the real embedded broker."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Message
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer, ResilientProducer, RetryPolicy, dlq
from resilient_kafka.testing import KafkaCluster
from tests.helpers import produce


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _run_to_dlq(
    kafka: KafkaCluster, topic: str, group: str, provider: TracerProvider | None, **options
) -> list[Message]:
    def handler(msg: Message) -> None:
        raise ValueError("still broken")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2, 0.2)),
        registry=CollectorRegistry(),
        tracer_provider=provider,
        **options,
    )
    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    found: list[dlq.DeadLetter] = []
    try:
        # the consumer creates its retry/DLQ topics in the background
        _wait(lambda: f"{topic}.{group}.dlq" in kafka.list_topics(), 30, "the DLQ topic")
        _wait(
            lambda: (
                found.extend(dlq.read(kafka.producer_config(), f"{topic}.{group}.dlq")) or found
            ),
            30,
            "the record to reach the DLQ",
        )
    finally:
        consumer.stop()
        thread.join(30)
    return found  # type: ignore[return-value]


def test_a_record_failing_to_the_dlq_is_one_connected_trace(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    provider, exporter = _tracing()
    producer = ResilientProducer(
        kafka.producer_config(), registry=CollectorRegistry(), tracer_provider=provider
    )
    # an old traceparent in the user's headers is replaced, never duplicated
    stale = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    producer.produce(topic, key="order-1", value="v", headers=[("traceparent", stale.encode())])
    assert producer.flush(10) == 0
    producer.close()

    (dead,) = _run_to_dlq(kafka, topic, group, provider)
    retry1, retry2, dlq_topic = (
        f"{topic}.{group}.retry.1",
        f"{topic}.{group}.retry.2",
        f"{topic}.{group}.dlq",
    )
    _wait(
        lambda: any(s.name == f"send {dlq_topic}" for s in exporter.get_finished_spans()),
        10,
        "the DLQ send span to end",
    )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    chain = [
        f"send {topic}",
        f"process {topic}",
        f"send {retry1}",
        f"process {retry1}",
        f"send {retry2}",
        f"process {retry2}",
        f"send {dlq_topic}",
    ]
    assert set(chain) <= set(spans), sorted(spans)
    trace_ids = {spans[name].context.trace_id for name in chain}
    assert len(trace_ids) == 1, "the hops are not one trace"
    for parent, child in itertools.pairwise(chain):
        assert spans[child].parent is not None
        assert spans[child].parent.span_id == spans[parent].context.span_id, (parent, child)
    for name in chain:
        kind = SpanKind.PRODUCER if name.startswith("send") else SpanKind.CONSUMER
        assert spans[name].kind == kind

    process = spans[f"process {topic}"]
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["messaging.destination.partition.id"] == "0"
    assert process.attributes["messaging.kafka.offset"] == 0
    assert process.attributes["messaging.consumer.group.name"] == group
    assert process.attributes["error.type"] == "ValueError"
    assert process.attributes["resilient_kafka.outcome"] == "retry_scheduled"
    assert process.status.status_code == StatusCode.ERROR
    assert [link.context.span_id for link in process.links] == [
        spans[f"send {topic}"].context.span_id
    ]
    assert any(e.name == "resilient_kafka.retry.scheduled" for e in process.events)
    last = spans[f"process {retry2}"]
    assert last.attributes["resilient_kafka.outcome"] == "dead_lettered"
    assert last.attributes["resilient_kafka.retry.attempt"] == 2
    send_dlq = spans[f"send {dlq_topic}"]
    assert send_dlq.attributes["resilient_kafka.forward.reason"] == "dlq"
    assert isinstance(send_dlq.attributes["messaging.kafka.offset"], int)

    traceparents = [v for k, v in dead.headers if k == "traceparent"]
    assert len(traceparents) == 1
    assert traceparents[0].decode().split("-")[2] == format(send_dlq.context.span_id, "016x")
    assert stale.encode() not in traceparents


def test_link_only_starts_a_new_trace_per_process_span(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    provider, exporter = _tracing()
    producer = ResilientProducer(
        kafka.producer_config(), registry=CollectorRegistry(), tracer_provider=provider
    )
    producer.produce(topic, key="k", value="v")
    assert producer.flush(10) == 0
    producer.close()
    _run_to_dlq(kafka, topic, group, provider, trace_parent="link_only")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process, send = spans[f"process {topic}"], spans[f"send {topic}"]
    assert process.parent is None
    assert process.context.trace_id != send.context.trace_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]


def test_without_a_tracer_provider_nothing_is_traced(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [("k", "v")])
    (dead,) = _run_to_dlq(kafka, topic, group, None)
    assert not [k for k, _ in dead.headers if k in ("traceparent", "tracestate", "baggage")]
    consumer = ResilientConsumer(kafka.client_config(group_id=group), registry=CollectorRegistry())
    try:
        assert consumer._tracing is None and consumer._producer._tracing is None
    finally:
        consumer.close()


def test_bad_trace_parent_is_rejected(kafka: KafkaCluster) -> None:
    import pytest

    from resilient_kafka import ConfigurationError

    with pytest.raises(ConfigurationError, match="trace_parent must be"):
        ResilientConsumer(
            kafka.client_config(group_id="g"), registry=CollectorRegistry(), trace_parent="parent"
        )


def test_double_instrumentation_is_warned_about(monkeypatch) -> None:
    import confluent_kafka
    import pytest

    from resilient_kafka.tracing import warn_if_double_instrumented

    warn_if_double_instrumented()  # the plain client: no warning (filterwarnings would not mind)
    monkeypatch.setattr(confluent_kafka, "Producer", type("AutoInstrumentedProducer", (), {}))
    with pytest.warns(RuntimeWarning, match="ConfluentKafkaInstrumentor is active"):
        warn_if_double_instrumented()
