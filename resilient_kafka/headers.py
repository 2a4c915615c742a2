"""The ``rk.*`` headers on retry and DLQ records, and helpers to read them from a message.

Values are UTF-8 text (numbers in decimal) so any tool can read them. On every hop the ``rk.*``
headers are replaced, never appended, so a record cannot grow with its retries.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any, NamedTuple

PREFIX = "rk."
ORIGINAL_TOPIC = "rk.original.topic"
ORIGINAL_PARTITION = "rk.original.partition"
ORIGINAL_OFFSET = "rk.original.offset"
ORIGINAL_TIMESTAMP = "rk.original.timestamp"
ATTEMPT = "rk.attempt"
FIRST_FAILURE = "rk.first.failure"
DUE = "rk.due"
EXCEPTION_TYPE = "rk.exception.type"
EXCEPTION_MESSAGE = "rk.exception.message"
EXCEPTION_STACKTRACE = "rk.exception.stacktrace"
CONSUMER_GROUP = "rk.consumer.group"
REASON = "rk.reason"
SCHEMA_ID = "rk.schema.id"  # DLQ copies of records a Schema Registry deserializer refused
SCHEMA_GUID = "rk.schema.guid"
SCHEMA_FIELD = "rk.schema.field"  # key | value
ID = "rk.id"  # a message's unique id, stamped by ResilientProducer and kept on every copy

# Values of rk.reason on DLQ records.
EXHAUSTED = "exhausted"
NON_RETRYABLE = "non_retryable"
DESERIALIZATION = "deserialization"
TIMEOUT = "timeout"

HeaderList = list[tuple[str, bytes]]


class Original(NamedTuple):
    """Where a message was first consumed, before any retry hop."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None


def header_dict(msg: Any) -> dict[str, bytes]:
    """The message's headers as a dict (the last value wins for repeated names)."""
    return {key: value for key, value in (msg.headers() or ()) if value is not None}


def _text(headers: dict[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if value is not None else None


def _int(headers: dict[str, bytes], name: str) -> int | None:
    text = _text(headers, name)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def attempt(msg: Any) -> int:
    """Failed attempts so far: 0 for a message that has never failed (or a bad header)."""
    return max(0, _int(header_dict(msg), ATTEMPT) or 0)


def failures_so_far(headers: dict[str, bytes], now_ms: int) -> tuple[int, int]:
    """(failed attempts, first failure in epoch ms) from a record's :func:`header_dict`, read
    defensively: a missing, malformed or negative count is 0; a first failure that is missing,
    negative or in the future is now (a forged header must not pick a tier that does not
    exist, nor keep a retry budget from ever running out)."""
    count = _int(headers, ATTEMPT)
    first = _int(headers, FIRST_FAILURE)
    if first is None or first < 0 or first > now_ms:
        first = now_ms
    return (count if count is not None and count > 0 else 0), first


def due(msg: Any) -> int | None:
    """Epoch milliseconds at which a retry record may be processed, or None."""
    return _int(header_dict(msg), DUE)


def original(msg: Any, headers: dict[str, bytes] | None = None) -> Original:
    """The original coordinates: from ``rk.original.*`` on a retry hop, else the message's own
    (``headers``: the message's :func:`header_dict`, when the caller has it already)."""
    if headers is None:
        headers = header_dict(msg)
    topic = _text(headers, ORIGINAL_TOPIC)
    partition = _int(headers, ORIGINAL_PARTITION)
    offset = _int(headers, ORIGINAL_OFFSET)
    if topic is not None and partition is not None and offset is not None:
        return Original(topic, partition, offset, _int(headers, ORIGINAL_TIMESTAMP))
    kind, timestamp = msg.timestamp()
    return Original(msg.topic(), msg.partition(), msg.offset(), timestamp if kind else None)


def message_id(msg: Any) -> str:
    """The identity of the logical message: its ``rk.id`` when it has one, else its original
    coordinates (the same on every retry hop, redelivery and restart)."""
    listed = msg.headers()
    found: dict[str, bytes] | None = (
        {key: value for key, value in listed if value is not None} if listed else None
    )
    if not found:  # no headers: its own coordinates
        return f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
    value = found.get(ID)
    if value:
        return "id:" + value.decode("utf-8", "replace")
    orig = original(msg, found)
    return f"{orig.topic}/{orig.partition}/{orig.offset}"


def truncate_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    marker = b"...[truncated]"
    return data[: max(0, limit - len(marker))].decode("utf-8", "ignore").encode() + marker


def exception_type(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_frames_text: dict[tuple[tuple[Any, int], ...], str] = {}
_FRAMES_CACHE_SIZE = 256


def _frames(tb: Any) -> str:
    """The traceback's frames as ``traceback`` prints them, without the column carets (working
    those out parses the source, ~200 µs a failure); cached per code path, so a flood of the
    same failure costs a frame walk each."""
    walked = []
    while tb is not None:
        walked.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    key = tuple([(frame.f_code, lineno) for frame, lineno in walked])
    text = _frames_text.get(key)
    if text is None:
        text = "".join(traceback.StackSummary.extract(iter(walked)).format())
        if len(_frames_text) >= _FRAMES_CACHE_SIZE:
            _frames_text.clear()
        _frames_text[key] = text
    return text


def _exception_line(exc: BaseException) -> str:
    """``Type: message`` (and notes) as ``traceback`` ends a trace, without re-walking it."""
    if isinstance(exc, SyntaxError):  # has its own multi-line layout
        return "".join(traceback.format_exception_only(exc))
    try:
        text = str(exc)
    except Exception:
        text = "<exception str() failed>"
    name = exception_type(exc)
    line = f"{name}: {text}\n" if text else f"{name}\n"
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list | tuple):
        line += "".join(f"{note}\n" for note in notes)
    return line


def _has_group(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BaseExceptionGroup):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def stack_trace(exc: BaseException) -> str:
    """``exc`` formatted like ``traceback.format_exception`` (causes and contexts first)."""
    if _has_group(exc):  # sub-exceptions and their tracebacks: traceback's own layout
        return "".join(traceback.format_exception(exc))
    if exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__):
        tb = exc.__traceback__  # the common case: one exception
        if tb is None:
            return _exception_line(exc)
        return f"Traceback (most recent call last):\n{_frames(tb)}{_exception_line(exc)}"
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for error, link in reversed(chain):
        if error.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.append(_frames(error.__traceback__))
        parts.append(_exception_line(error))
        parts.append(link)
    return "".join(parts)


def forward_headers(
    msg: Any,
    *,
    prev: dict[str, bytes] | None = None,
    exc: BaseException,
    attempt_no: int,
    first_failure_ms: int,
    group: str,
    max_text_bytes: int,
    due_ms: int | None = None,
    reason: str | None = None,
    include_stacktrace: bool = True,
    message_limit: int | None = None,
) -> HeaderList:
    """Headers for the retry or DLQ copy of ``msg``: user headers kept, ``rk.*`` replaced."""
    orig = original(msg, prev)
    user: Iterable[tuple[str, bytes | None]] = msg.headers() or ()
    headers: HeaderList = [
        (key, value or b"") for key, value in user if key == ID or not key.startswith(PREFIX)
    ]
    text_limit = max_text_bytes if message_limit is None else min(message_limit, max_text_bytes)
    headers += [
        (ORIGINAL_TOPIC, orig.topic.encode()),
        (ORIGINAL_PARTITION, str(orig.partition).encode()),
        (ORIGINAL_OFFSET, str(orig.offset).encode()),
        (ATTEMPT, str(attempt_no).encode()),
        (FIRST_FAILURE, str(first_failure_ms).encode()),
        (EXCEPTION_TYPE, exception_type(exc).encode()),
        (EXCEPTION_MESSAGE, truncate_utf8(str(exc), text_limit)),
        (CONSUMER_GROUP, group.encode()),
    ]
    if orig.timestamp is not None:
        headers.append((ORIGINAL_TIMESTAMP, str(orig.timestamp).encode()))
    if include_stacktrace:
        headers.append((EXCEPTION_STACKTRACE, truncate_utf8(stack_trace(exc), max_text_bytes)))
    if due_ms is not None:
        headers.append((DUE, str(due_ms).encode()))
    if reason is not None:
        headers.append((REASON, reason.encode()))
    schema = getattr(exc, "schema", None) if reason == DESERIALIZATION else None
    if schema is not None:  # (a DeserializationError of a Schema Registry record)
        if schema.id is not None:
            headers.append((SCHEMA_ID, str(schema.id).encode()))
        else:
            headers.append((SCHEMA_GUID, str(schema.guid).encode()))
        headers.append((SCHEMA_FIELD, str(getattr(exc, "field", "value")).encode()))
    return headers


def size_of(key: bytes | None, value: bytes | None, headers: HeaderList) -> int:
    """Approximate record size as the producer counts it against ``message.max.bytes``."""
    size = 64 + len(key or b"") + len(value or b"") + 10 * len(headers)  # + framing
    for name, data in headers:
        size += len(name) + len(data)
    return size
