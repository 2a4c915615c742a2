"""OpenTelemetry tracing with the messaging semantic conventions, across retry hops.

``send {topic}`` (PRODUCER) spans for every produce the library makes, ended at the delivery
report, their context injected into the record's headers (replacing any ``traceparent``,
``tracestate`` or ``baggage``); ``process {topic}`` (CONSUMER) spans around each handler call in
``run()``, parented on the record's creation context and linked to it. A record that fails twice
and is dead-lettered is one connected trace. With no tracer provider configured, nothing is
extracted, injected or started.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from resilient_kafka import __version__, headers

PROPAGATION_HEADERS = ("traceparent", "tracestate", "baggage")
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"


class _HeaderGetter:
    """Reads propagation fields from Kafka headers, leniently (bytes → str, bad UTF-8 skipped)."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def _text_headers(headers: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key in PROPAGATION_HEADERS and value is not None:
            try:
                carrier[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                continue
    return carrier


def _header_list(headers: Any) -> list[tuple[str, Any]]:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _links(context: Any) -> list[Link]:
    """A link to the span in ``context`` (a record's creation context), if there is one."""
    if context is None:
        return []
    linked = trace.get_current_span(context).get_span_context()
    return [Link(linked)] if linked.is_valid else []


def _add_key(attrs: dict[str, Any], key: Any) -> None:
    """``messaging.kafka.message.key`` when the key is text (bytes that decode as UTF-8)."""
    if isinstance(key, bytes):
        with contextlib.suppress(UnicodeDecodeError):
            attrs["messaging.kafka.message.key"] = key.decode("utf-8")
    elif isinstance(key, str):
        attrs["messaging.kafka.message.key"] = key


def warn_if_double_instrumented() -> None:
    import confluent_kafka

    if getattr(confluent_kafka.Producer, "__name__", "") == "AutoInstrumentedProducer":
        warnings.warn(
            "ConfluentKafkaInstrumentor is active: it adds its own spans and headers on top of "
            "resilient-kafka's; uninstrument it (ConfluentKafkaInstrumentor().uninstrument())",
            RuntimeWarning,
            stacklevel=3,
        )


def tracer_for(provider: Any = None) -> Tracing | None:
    """A :class:`Tracing` for ``provider`` (or the global one), or None when none is set up."""
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
    warn_if_double_instrumented()
    return Tracing(provider)


class Tracing:
    """Span helpers bound to one tracer."""

    def __init__(self, provider: Any) -> None:
        self.tracer = provider.get_tracer("resilient_kafka", __version__, schema_url=SCHEMA_URL)
        # (topic, group) -> the process span's name and creation attributes (the SDK copies them)
        self._process_attrs: dict[tuple[Any, str], tuple[str, dict[str, Any]]] = {}

    @staticmethod
    def creation_context(headers: Any) -> Any:
        """The context a record was sent in (from its ``traceparent``), or None."""
        if not headers:
            return None
        carrier = _text_headers(_header_list(headers))
        if "traceparent" not in carrier:
            return None
        return propagate.extract(carrier, getter=_GETTER)  # type: ignore[arg-type]

    def start_send(
        self,
        topic: str,
        headers: Any,
        key: Any,
        *,
        link_context: Any = None,
        attributes: dict[str, Any] | None = None,
        context: Any = None,
    ) -> tuple[Any, list[tuple[str, Any]]]:
        """Start ``send {topic}`` (a child of ``context``, else of the current span) and return
        it with headers carrying its context."""
        attrs: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
        }
        _add_key(attrs, key)
        attrs.update(attributes or {})
        span = self.tracer.start_span(
            f"send {topic}",
            context=context,
            kind=SpanKind.PRODUCER,
            attributes=attrs,
            links=_links(link_context),
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        kept = [(k, v) for k, v in _header_list(headers) if k not in PROPAGATION_HEADERS]
        return span, kept + [(k, v.encode()) for k, v in carrier.items()]

    @staticmethod
    def end_send(span: Any, err: Any, msg: Any) -> None:
        """End a send span at the delivery report."""
        if msg is not None:
            partition = msg.partition()
            if partition is not None and partition >= 0:
                span.set_attribute("messaging.destination.partition.id", str(partition))
            offset = msg.offset()
            if err is None and offset is not None and offset >= 0:
                span.set_attribute("messaging.kafka.offset", offset)
        if err is not None:
            span.set_attribute("error.type", err.name())
            span.set_status(Status(StatusCode.ERROR, err.str()))
        span.end()

    def start_process(self, msg: Any, group: str, *, parent_on_creation: bool = True) -> Any:
        """Start ``process {topic}`` for a handler call (not made current here).

        Only the attributes a sampler may look at are passed at creation; the per-record ones
        (partition, offset, key, attempt) are added when the span is recorded, so an unsampled
        record does not pay for them.
        """
        creation = self.creation_context(msg.headers())
        topic = msg.topic()
        known = self._process_attrs.get((topic, group))
        if known is None:
            known = self._process_attrs[(topic, group)] = (
                f"process {topic}",
                {
                    "messaging.system": "kafka",
                    "messaging.operation.name": "process",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": topic,
                    "messaging.consumer.group.name": group,
                },
            )
        name, sampled_on = known
        span = self.tracer.start_span(
            name,
            context=creation if parent_on_creation else None,
            kind=SpanKind.CONSUMER,
            attributes=sampled_on,
            links=_links(creation) if creation is not None else (),
        )
        if span.is_recording():
            attrs: dict[str, Any] = {
                "messaging.destination.partition.id": str(msg.partition()),
                "messaging.kafka.offset": msg.offset(),
                "resilient_kafka.retry.attempt": headers.attempt(msg),
            }
            _add_key(attrs, msg.key())
            span.set_attributes(attrs)
        return span

    def start_forward(
        self,
        topic: str,
        headers: Any,
        key: Any,
        *,
        record_span: Any,
        record_headers: Any,
        parent_on_creation: bool,
        attributes: dict[str, Any],
    ) -> tuple[Any, list[tuple[str, Any]]]:
        """Start ``send {topic}`` for a retry or DLQ copy, in the record's trace: a child of its
        process span (``run()``), else of its creation context (the drop-in loop, unless
        ``trace_parent="link_only"``), and linked to the creation context; never the ambient
        context, which may belong to anything."""
        creation = self.creation_context(record_headers)
        if record_span is not None:
            parent = trace.set_span_in_context(record_span)
        elif parent_on_creation and creation is not None:
            parent = creation
        else:
            parent = trace.set_span_in_context(trace.INVALID_SPAN)  # a root, linked
        return self.start_send(
            topic, headers, key, link_context=creation, attributes=attributes, context=parent
        )

    @staticmethod
    def routed(
        span: Any, target: str, attempt: int, due_ms: int | None, reason: str | None
    ) -> None:
        """The record's outcome as an attribute and an event on its process span."""
        if span is None or not span.is_recording():
            return
        if reason is None:
            delay = (due_ms - time.time() * 1000) / 1000 if due_ms else 0.0
            span.set_attribute("resilient_kafka.outcome", "retry_scheduled")
            span.add_event(
                "resilient_kafka.retry.scheduled",
                {"messaging.destination.name": target, "attempt": attempt, "delay_s": delay},
            )
        else:
            span.set_attribute("resilient_kafka.outcome", "dead_lettered")
            span.add_event(
                "resilient_kafka.dead_lettered",
                {"messaging.destination.name": target, "reason": reason},
            )


class NoTracing:
    """Tracing switched off: the same calls, doing nothing."""

    @staticmethod
    def start_forward(
        topic: str, headers: Any, key: Any, **_: Any
    ) -> tuple[None, list[tuple[str, Any]]]:
        return None, headers

    @staticmethod
    def routed(*_: Any) -> None:
        return None
