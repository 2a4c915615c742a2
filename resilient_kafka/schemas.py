"""Schema Registry records: which schema a record names, and whether a deserializer's failure
is the record's fault or the registry's.

The deserializers of ``confluent_kafka.schema_registry`` (Avro, JSON Schema, Protobuf) plug in
as ``key_deserializer``/``value_deserializer`` unchanged. What this module adds:

- :func:`reference` reads the schema a record names, without the registry: the Confluent
  framing (magic byte 0 and a 4-byte schema id, or magic byte 1 and a 16-byte schema GUID), or
  the ``__value_schema_id``/``__key_schema_id`` header (which comes first, as the deserializers
  read it). A record that fails goes to the DLQ with it in ``rk.schema.*`` headers.
- :func:`registry_unavailable` tells a registry that cannot answer now (unreachable, timing out,
  5xx, 408, 429) from a record it cannot read (an unknown schema id, a failed validation, bytes
  that do not decode). The first holds the records, as an open breaker does; only the second
  goes to the DLQ.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_HEADERS = {"key": "__key_schema_id", "value": "__value_schema_id"}
_TRANSIENT_STATUS = {408, 429}


@dataclass(frozen=True)
class SchemaReference:
    """The schema a record's key or value names: a registry id or GUID, and where it was."""

    id: int | None
    guid: str | None
    source: str  # "prefix" (the payload's framing) or "header"

    def __str__(self) -> str:
        return f"id {self.id}" if self.id is not None else f"guid {self.guid}"


def reference(data: bytes | None, headers: Any, field: str = "value") -> SchemaReference | None:
    """The schema ``data`` (the raw key or value) names, or None if it is not framed for a
    schema registry. Never raises: it describes a record that failed."""
    name = _HEADERS[field]
    found: Any = None
    if isinstance(headers, Mapping):
        found = headers.get(name)
    elif headers:
        found = next((v for k, v in _pairs(headers) if k == name), None)
    if isinstance(found, bytes | bytearray | memoryview):
        parsed = _framing(bytes(found), "header")
        if parsed is not None:
            return parsed
    return _framing(data, "prefix") if data else None


def _pairs(headers: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    for item in headers:
        if isinstance(item, tuple) and len(item) == 2:
            yield item


def _framing(data: bytes | None, source: str) -> SchemaReference | None:
    if not data:
        return None
    if data[0] == 0 and len(data) >= 5:
        return SchemaReference(struct.unpack_from(">I", data, 1)[0], None, source)
    if data[0] == 1 and len(data) >= 17:
        return SchemaReference(None, str(uuid.UUID(bytes=bytes(data[1:17]))), source)
    return None


def registry_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the registry could not answer now, rather than
    that the record cannot be read: a transport error (refused, timed out, reset) or an HTTP
    status of 5xx, 408 or 429."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = getattr(current, "http_status_code", None)  # SchemaRegistryError
        if isinstance(status, int) and (status >= 500 or status in _TRANSIENT_STATUS):
            return True
        if _transport_error(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _transport_error(exc: BaseException) -> bool:
    """httpx's (the registry client's) errors below HTTP: connection refused, timeouts, resets.
    By name: the client is httpx or httpx2 depending on the Python version."""
    for kind in type(exc).__mro__:
        if kind.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2") and (
            kind.__name__ == "TransportError"
        ):
            return True
    return isinstance(exc, ConnectionError | TimeoutError)
