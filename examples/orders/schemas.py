"""Versioned event and command schemas, and the deserializer every consumer of the system uses.

Every record is a JSON envelope::

    {"type": "PaymentCharged", "v": 1, "id": "o-17:charge:reply", "order_id": "o-17",
     "command_id": "o-17:charge", "at": 1733300000000, "data": {...}}

Rules: a producer writes the newest version of a type; adding an optional field keeps the
version; anything else is a new version, and consumers upcast the versions they know to the
newest. A consumer never guesses: an unknown ``(type, v)``, a type that does not belong on the
topic, or a field of the wrong shape raises :class:`SchemaError`, which the consumer's
``value_deserializer`` turns into a DLQ record (``rk.reason: deserialization``) with the raw
bytes, before any handler sees it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from examples.orders import config as c

# field specs: "str", "int" (>= 0), "bool", "items" ([{"sku": str, "qty": int > 0}, ...]);
# a trailing "?" makes the field optional
Fields = Mapping[str, str]


class SchemaError(ValueError):
    """The record does not match any schema this consumer knows."""


class UnknownSchemaVersion(SchemaError):
    """A ``(type, v)`` this consumer has no schema for: newer than its code, or never defined."""


@dataclass(frozen=True)
class Schema:
    type: str
    v: int
    topic: str
    fields: Fields
    doc: str


def _schemas(*items: Schema) -> dict[tuple[str, int], Schema]:
    return {(s.type, s.v): s for s in items}


SCHEMAS = _schemas(
    Schema(
        "OrderPlaced",
        1,
        c.ORDER_EVENTS,
        {"customer": "str", "items": "items", "amount_cents": "int"},
        "an order was accepted by the API",
    ),
    Schema(
        "OrderStatusChanged",
        1,
        c.ORDER_EVENTS,
        {"state": "str", "version": "int", "reason": "str?"},
        "the saga moved an order to a new state",
    ),
    Schema(
        "ReserveStock",
        1,
        c.INVENTORY_COMMANDS,
        {"items": "items"},
        "reserve every item of the order, or none",
    ),
    Schema("ReleaseStock", 1, c.INVENTORY_COMMANDS, {}, "give the order's reservation back"),
    Schema("CommitStock", 1, c.INVENTORY_COMMANDS, {}, "the order shipped: reserved -> shipped"),
    Schema("StockReserved", 1, c.INVENTORY_EVENTS, {}, "reply: reserved"),
    Schema("StockRejected", 1, c.INVENTORY_EVENTS, {"reason": "str"}, "reply: not reserved"),
    Schema("StockReleased", 1, c.INVENTORY_EVENTS, {"noop": "bool"}, "reply: released"),
    Schema("StockCommitted", 1, c.INVENTORY_EVENTS, {}, "reply: committed"),
    Schema(
        "ChargePayment",
        1,
        c.PAYMENT_COMMANDS,
        {"amount_cents": "int", "card": "str"},
        "charge the order's card",
    ),
    Schema(
        "RefundPayment",
        1,
        c.PAYMENT_COMMANDS,
        {"amount_cents": "int"},
        "refund the order's charge, if there was one",
    ),
    Schema(
        "PaymentCharged",
        1,
        c.PAYMENT_EVENTS,
        {"amount_cents": "int", "gateway_ref": "str"},
        "reply: charged",
    ),
    Schema(
        "PaymentDeclined",
        1,
        c.PAYMENT_EVENTS,
        {"reason": "str"},
        "reply: the card was declined (a business outcome, not a failure)",
    ),
    Schema(
        "PaymentRefunded",
        1,
        c.PAYMENT_EVENTS,
        {"amount_cents": "int", "noop": "bool"},
        "reply: refunded (noop: there was no charge)",
    ),
    # v1 had no address; v2 made it required. Shipping reads both (v1 is upcast).
    Schema("ShipOrder", 1, c.SHIPPING_COMMANDS, {"items": "items"}, "ship the order"),
    Schema(
        "ShipOrder",
        2,
        c.SHIPPING_COMMANDS,
        {"items": "items", "address": "str"},
        "ship the order to an address",
    ),
    Schema("OrderShipped", 1, c.SHIPPING_EVENTS, {"tracking": "str"}, "reply: shipped"),
    Schema(
        "ShipmentFailed",
        1,
        c.SHIPPING_EVENTS,
        {"reason": "str"},
        "reply: cannot ship, for good (drives compensation)",
    ),
)

LATEST = {t: max(v for (name, v) in SCHEMAS if name == t) for (t, _v) in SCHEMAS}

# older version -> function returning the next version's data
UPCASTS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("ShipOrder", 1): lambda data: {**data, "address": "on file"},
}


@dataclass(frozen=True)
class Envelope:
    type: str
    v: int
    id: str
    order_id: str
    command_id: str
    at: int
    data: dict[str, Any]

    @property
    def step(self) -> str:
        """The saga step a command or reply belongs to (``o-17:charge`` -> ``charge``)."""
        return self.command_id.rsplit(":", 1)[-1] if self.command_id else ""


def encode(
    type_: str,
    *,
    id: str,
    order_id: str,
    data: Mapping[str, Any],
    command_id: str = "",
    at: int | None = None,
) -> bytes:
    """The newest version of ``type_``, validated: a producer never writes what it cannot read."""
    v = LATEST.get(type_)
    if v is None:
        raise SchemaError(f"no schema for type {type_!r}")
    _validate(SCHEMAS[(type_, v)], dict(data))
    body = {
        "type": type_,
        "v": v,
        "id": id,
        "order_id": order_id,
        "command_id": command_id,
        "at": int(time.time() * 1000) if at is None else at,
        "data": dict(data),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def reply(command: Envelope, type_: str, data: Mapping[str, Any]) -> bytes:
    """A participant's reply to ``command``: its record id is the command id + ``:reply``, the
    same on every replay, so the saga and the view skip a second copy."""
    return encode(
        type_,
        id=f"{command.command_id}:reply",
        order_id=command.order_id,
        command_id=command.command_id,
        data=data,
    )


def parse(raw: bytes | None, topic: str | None = None) -> Envelope:
    """Decode, validate and upcast one record's value; raises :class:`SchemaError`."""
    if raw is None:
        raise SchemaError("record has no value (a tombstone): no schema allows one")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"not a JSON envelope: {exc}") from None
    if not isinstance(body, dict):
        raise SchemaError(f"envelope must be a JSON object, got {type(body).__name__}")
    for name, kind in (("type", str), ("v", int), ("id", str), ("order_id", str), ("at", int)):
        if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool):
            raise SchemaError(f"envelope field {name!r} missing or not {kind.__name__}")
    type_, v = body["type"], body["v"]
    schema = SCHEMAS.get((type_, v))
    if schema is None:
        known = sorted(ver for (name, ver) in SCHEMAS if name == type_)
        raise UnknownSchemaVersion(
            f"unknown schema version {type_} v{v} (this consumer knows "
            f"{', '.join(f'v{k}' for k in known) or 'no version of it'})"
        )
    if topic is not None and schema.topic != topic:
        raise SchemaError(f"{type_} does not belong on {topic} (it goes on {schema.topic})")
    data = body.get("data")
    if not isinstance(data, dict):
        raise SchemaError(f"{type_} v{v}: data must be an object")
    _validate(schema, data)
    while v < LATEST[type_]:
        data = UPCASTS[(type_, v)](data)
        v += 1
    command_id = body.get("command_id", "")
    if not isinstance(command_id, str):
        raise SchemaError("envelope field 'command_id' must be a string")
    return Envelope(type_, v, body["id"], body["order_id"], command_id, body["at"], data)


def deserialize(raw: bytes | None, ctx: Any) -> Envelope:
    """The ``value_deserializer`` of every consumer (``ctx`` is confluent's
    ``SerializationContext``; its topic is the *source* topic, also for retry copies)."""
    topic = getattr(ctx, "topic", None)
    return parse(raw, _base_topic(topic) if topic else None)


def _base_topic(topic: str) -> str:
    """A retry tier's name starts with its source topic's (``{topic}.{group}.retry.{n}``)."""
    for base in c.TOPICS:
        if topic == base or topic.startswith(base + "."):
            return base
    return topic


def _validate(schema: Schema, data: dict[str, Any]) -> None:
    where = f"{schema.type} v{schema.v}"
    for name, spec in schema.fields.items():
        optional = spec.endswith("?")
        kind = spec.rstrip("?")
        if name not in data:
            if optional:
                continue
            raise SchemaError(f"{where}: missing field {name!r}")
        _check_value(where, name, kind, data[name])
    # fields it does not know are ignored (a tolerant reader): a producer that added an
    # optional field and was deployed first must not send every record to the DLQ


def _check_value(where: str, name: str, kind: str, value: Any) -> None:
    ok = {
        "str": lambda x: isinstance(x, str),
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
        "bool": lambda x: isinstance(x, bool),
        "items": valid_items,
    }[kind](value)
    if not ok:
        raise SchemaError(f"{where}: field {name!r} is not a valid {kind}: {value!r:.80}")


def valid_items(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(i, dict)
            and set(i) == {"sku", "qty"}
            and isinstance(i["sku"], str)
            and isinstance(i["qty"], int)
            and not isinstance(i["qty"], bool)
            and i["qty"] > 0
            for i in value
        )
    )


_JSON_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer", "minimum": 0},
    "bool": {"type": "boolean"},
    "items": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["sku", "qty"],
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
        },
    },
}


def json_schema(type_: str, v: int) -> dict[str, Any]:
    """The schema as a JSON Schema (draft 2020-12) document, for other languages' consumers."""
    s = SCHEMAS[(type_, v)]
    props = {n: _JSON_TYPES[spec.rstrip("?")] for n, spec in s.fields.items()}
    required = [n for n, spec in s.fields.items() if not spec.endswith("?")]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:resilient-kafka:orders:{s.type}:v{s.v}",
        "title": f"{s.type} v{s.v}",
        "description": s.doc,
        "type": "object",
        "required": ["type", "v", "id", "order_id", "at", "data"],
        "properties": {
            "type": {"const": s.type},
            "v": {"const": s.v},
            "id": {"type": "string"},
            "order_id": {"type": "string"},
            "command_id": {"type": "string"},
            "at": {"type": "integer"},
            "data": {
                "type": "object",
                "additionalProperties": False,
                "required": required,
                "properties": props,
            },
        },
    }
