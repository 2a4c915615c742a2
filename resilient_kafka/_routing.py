"""Routing: where a failed record goes next (its next retry tier, or the DLQ) and with which
headers. Sending the copy is forwarding's business (``_forwarding``)."""

from __future__ import annotations

import functools
import time
from typing import Any

from resilient_kafka import headers
from resilient_kafka._forwarding import Forward
from resilient_kafka._outage import FloodGuard
from resilient_kafka._record import Record
from resilient_kafka._settings import Settings
from resilient_kafka._topics import Topics
from resilient_kafka.errors import DeadLetterFloodError


class Router:
    """Turns a failed record into a :class:`Forward`, or refuses (a DLQ flood)."""

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        flood: FloodGuard | None,
        metrics: Any,
        tracing: Any,
    ) -> None:
        self._settings = settings
        self._retry = settings.retry
        self._dead_letter = settings.dead_letter
        self._topics = topics
        self._flood = flood
        self._metrics = metrics
        self._tracing = tracing
        self._traced = getattr(tracing, "tracer", None) is not None  # not NoTracing
        # headers never take more than this: the size check is skipped below it
        self._headers_bound = 4096 + 2 * self._dead_letter.max_text_bytes

    def route(
        self, record: Record, exc: BaseException, reason: str | None = None
    ) -> Forward | None:
        """The copy of ``record`` for its next tier or the DLQ; None when a DLQ flood holds it
        back (``on_flood="pause"``). Raises DeadLetterFloodError for ``on_flood="raise"``."""
        msg = record.msg
        now_ms = int(time.time() * 1000)
        prev = headers.header_dict(msg)
        failed, first = headers.failures_so_far(prev, now_ms)
        attempt = failed + 1
        source = self._topics.source_of(record.topic)
        due_ms = None
        retry = self._retry
        if reason is None:
            timeout = retry.timeout
            if not retry.is_retryable(exc):
                reason = headers.NON_RETRYABLE
            elif timeout is not None and now_ms - first >= timeout * 1000:
                reason = headers.TIMEOUT
            elif attempt > retry.attempts:
                reason = headers.EXHAUSTED
        if reason is None:
            target = self._topics.target(source, attempt)
            due_ms = now_ms + int(retry.delay(attempt) * 1000)
        else:
            flood = self._flood
            if flood is not None:
                if flood.would_flood():
                    if self._dead_letter.on_flood == "raise":
                        raise DeadLetterFloodError(
                            f"{flood.consecutive} consecutive / {flood.dead} recent dead "
                            f"letters: {record.topic} [{record.partition}] @{record.offset} not "
                            "dead-lettered (DeadLetterPolicy limits exceeded)"
                        ) from exc
                    return None
                flood.record(True)
            target = self._topics.target(source, None)
        key, value = record.raw_key_value()
        hdrs = self._sized_headers(msg, prev, exc, attempt, first, key, value, due_ms, reason)
        span = None
        if self._traced:
            span, hdrs = self._tracing.start_forward(
                target,
                hdrs,
                key,
                record_span=record.span,
                record_headers=msg.headers(),
                parent_on_creation=self._settings.parent_on_creation,
                attributes={
                    "resilient_kafka.forward.reason": "retry" if reason is None else "dlq",
                    "resilient_kafka.retry.attempt": attempt,
                    "resilient_kafka.original.destination": source,
                },
            )
            self._tracing.routed(record.span, target, attempt, due_ms, reason)
        kind, ts = msg.timestamp()
        error_type = headers.exception_type(exc)
        if reason is None:
            self._metrics.outcome(record.topic, "retry_scheduled", error_type)
            self._metrics.retry(record.topic, "topic", error_type)
        else:
            self._metrics.outcome(record.topic, "dead_lettered", error_type)
            self._metrics.dead_lettered(source)
        return Forward(
            record.coordinates,
            source,
            target,
            key,
            value,
            hdrs,
            ts if kind else 0,
            span,
            record.progress,
        )

    def _sized_headers(
        self,
        msg: Any,
        prev: dict[str, bytes],
        exc: BaseException,
        attempt: int,
        first: int,
        key: bytes | None,
        value: bytes | None,
        due_ms: int | None,
        reason: str | None,
    ) -> headers.HeaderList:
        """Headers that keep the record under ``message.max.bytes``: drop the stack trace, then
        shorten the exception message, before a forward could fail because of our diagnostics."""
        build = functools.partial(
            headers.forward_headers,
            msg,
            prev=prev,
            exc=exc,
            attempt_no=attempt,
            first_failure_ms=first,
            group=self._settings.group,
            max_text_bytes=self._dead_letter.max_text_bytes,
            due_ms=due_ms,
            reason=reason,
        )
        limit = self._settings.max_bytes
        stacktrace = reason is not None or self._dead_letter.stacktrace_on_retry
        hdrs = build(include_stacktrace=stacktrace)
        prev_bytes = sum(len(name) + len(data or b"") for name, data in msg.headers() or ())
        if len(key or b"") + len(value or b"") + prev_bytes + self._headers_bound <= limit:
            return hdrs  # far below the limit: no need to add up what was built
        if headers.size_of(key, value, hdrs) <= limit:
            return hdrs
        hdrs = build(include_stacktrace=False)
        if headers.size_of(key, value, hdrs) <= limit:
            return hdrs
        return build(include_stacktrace=False, message_limit=64)
