"""Executors: where ``run()``'s handler runs. The loop hands each admitted record to
:meth:`submit`; the executor reports its outcome (done, or failed with the exception) to the
settlement step, on the polling thread. :class:`InlineExecutor` runs the handler right there,
one record at a time; concurrent executors sit behind the same two calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Status, StatusCode

from resilient_kafka import headers
from resilient_kafka._outage import OutageControl
from resilient_kafka._record import Record
from resilient_kafka._settle import Settlement
from resilient_kafka.breaker import CircuitBreakerError
from resilient_kafka.policies import RetryPolicy

Handler = Callable[[Message], object]


class Executor:
    """What the loop asks of an executor; these defaults are those of one that settles every
    record inside :meth:`submit` (nothing pending, nothing to await)."""

    busy = False  # outcomes pending elsewhere
    claims_itself = False  # dedup claims are made by the executor (else by the loop, before)
    room = 1 << 30  # how many more records may be fetched (no bound: nothing held elsewhere)
    batch_records = 0  # records per fetch (0: sized to the handler's speed)
    batch_wait = 0.0  # how long a fetch waits for batch_records to be there

    submit: Callable[[Record], None]  # hand a record over (settled here, or later)

    def collect(self, timeout: float = 0.0) -> None:
        """Apply outcomes reported from elsewhere (none here)."""

    def wait(self, timeout: float) -> bool:
        """Nothing to wait for: the polling thread waits on the broker."""
        return False

    def revoke(self, keys: object, *, lost: bool) -> None:
        """Nothing is running on other threads: nothing to await or drop."""

    def shutdown(self) -> None:
        """Nothing to stop."""

    def replayed(self) -> None:
        """Exactly-once: an aborted transaction is replayed (nothing held here)."""

    def gauges(self) -> None:
        """No work held beside the polling thread: nothing to show."""
        return None


class InlineExecutor(Executor):
    """Runs the handler on the polling thread (blocking retries in place first, inside a
    ``process`` span when traced) and settles the record before the next one."""

    def __init__(
        self,
        handler: Handler,
        settle: Settlement,
        *,
        retry: RetryPolicy,
        outage: OutageControl,
        committer: Any,
        stop: threading.Event,
        metrics: Any,
        tracing: Any,
        group: str,
        parent_on_creation: bool,
    ) -> None:
        self._settle = settle
        self._metrics = metrics
        self._retry = retry
        self._outage = outage
        self._committer = committer
        self._stop = stop
        self._current: Record | None = None  # the record whose handler is running
        self._observers: dict[str, Callable[[float], None]] = {}  # successful durations
        self._call: Callable[[Message], object] = handler
        if retry.blocking:
            import tenacity

            blocking = tenacity.Retrying(
                stop=retry.blocking_stop,
                wait=retry.blocking_wait or tenacity.wait_none(),
                retry=tenacity.retry_if_exception(self._retry_in_place),
                sleep=stop.wait,  # type: ignore[arg-type]
                reraise=True,
                before_sleep=self._blocking_retry_noted,
            )
            self._call = lambda msg: blocking(handler, msg)
        self._tracing = tracing
        self._group = group
        self._parent_on_creation = parent_on_creation
        self.submit: Callable[[Record], None] = (
            self._submit_traced
            if tracing is not None
            else self._submit
            if metrics.enabled
            else self._submit_untimed
        )

    def _submit(self, record: Record) -> None:
        """Handle ``record`` and settle it."""
        self._current = record
        started = time.monotonic()
        try:
            self._call(record.msg)
        except Exception as exc:
            self._metrics.process(
                record.topic, time.monotonic() - started, headers.exception_type(exc)
            )
            self._settle.failed(record, exc)
        else:
            topic = record.topic
            observe = self._observers.get(topic)
            if observe is None:
                observe = self._observers[topic] = self._metrics.process_ok(topic)
            observe(time.monotonic() - started)
            self._settle.done(record)

    def _submit_untimed(self, record: Record) -> None:
        """:meth:`_submit` with metrics off: no clock read for a duration nobody records."""
        self._current = record
        try:
            self._call(record.msg)
        except Exception as exc:
            self._settle.failed(record, exc)
        else:
            self._settle.done(record)

    def _submit_traced(self, record: Record) -> None:
        """:meth:`_submit` inside ``process {topic}``; forwards become its children."""
        self._current = record
        span = self._tracing.start_process(
            record.msg, self._group, parent_on_creation=self._parent_on_creation
        )
        record.span = span
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        started = time.monotonic()
        try:
            try:
                self._call(record.msg)
            except Exception as exc:
                error_type = headers.exception_type(exc)
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                span.record_exception(exc)
                if isinstance(exc, CircuitBreakerError):
                    span.add_event("resilient_kafka.circuit_breaker.rejected")
                self._metrics.process(record.topic, time.monotonic() - started, error_type)
                self._settle.failed(record, exc)
            else:
                span.set_attribute("resilient_kafka.outcome", "success")
                self._metrics.process(record.topic, time.monotonic() - started, "")
                self._settle.done(record)
        finally:
            otel_context.detach(token)
            span.end()
            record.span = None

    def _retry_in_place(self, exc: BaseException) -> bool:
        record = self._current
        assert record is not None
        if self._committer.wrote_for(record):
            return False  # its output is in the transaction: a retry topic hop replays cleanly
        return (
            not self._stop.is_set()
            and not self._outage.tripped(record, exc)
            and self._retry.is_retryable(exc)
        )

    def _blocking_retry_noted(self, state: Any) -> None:
        record = self._current
        if record is not None and state.outcome is not None:
            exc = state.outcome.exception()
            error_type = headers.exception_type(exc) if exc is not None else ""
            self._metrics.retry(record.topic, "blocking", error_type)
