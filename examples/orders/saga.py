"""The order saga, as a pure state machine: ``transition(order, event)`` returns the new order
and the records to send. No I/O here, so every path is a table test (tests/test_orders_example.py).

reserve stock -> charge payment -> ship (the pivot) -> commit stock -> COMPLETED.
A failure before the pivot compensates the steps done (release stock, refund), -> CANCELLED.
Shipping failing for good is the last place a compensation can start; commit, refund and
release are retried until they succeed (they cannot fail for business reasons).
The saga never cancels on a timeout: a charge may have happened. It sends the awaited step
again (same command id, new record id) and lets the participant's idempotency answer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

from examples.orders import config as c
from examples.orders.schemas import Envelope

RESERVING = "RESERVING"
CHARGING = "CHARGING"
SHIPPING = "SHIPPING"
FINALIZING = "FINALIZING"
COMPENSATING = "COMPENSATING"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"
STATES = (RESERVING, CHARGING, SHIPPING, FINALIZING, COMPENSATING, COMPLETED, CANCELLED)
TERMINAL = (COMPLETED, CANCELLED)
IN_FLIGHT = (RESERVING, CHARGING, SHIPPING, FINALIZING, COMPENSATING)

# step -> (command type, topic)
COMMANDS = {
    "reserve": ("ReserveStock", c.INVENTORY_COMMANDS),
    "charge": ("ChargePayment", c.PAYMENT_COMMANDS),
    "ship": ("ShipOrder", c.SHIPPING_COMMANDS),
    "commit": ("CommitStock", c.INVENTORY_COMMANDS),
    "refund": ("RefundPayment", c.PAYMENT_COMMANDS),
    "release": ("ReleaseStock", c.INVENTORY_COMMANDS),
}
# reply type -> the step it answers
REPLIES = {
    "StockReserved": "reserve",
    "StockRejected": "reserve",
    "PaymentCharged": "charge",
    "PaymentDeclined": "charge",
    "OrderShipped": "ship",
    "ShipmentFailed": "ship",
    "StockCommitted": "commit",
    "PaymentRefunded": "refund",
    "StockReleased": "release",
}


@dataclass(frozen=True)
class Order:
    order_id: str
    customer: str
    items: tuple[tuple[str, int], ...]
    amount_cents: int
    card: str
    state: str = RESERVING
    version: int = 1
    pending: frozenset[str] = frozenset({"reserve"})  # steps whose reply the saga awaits
    charged: bool = False
    reason: str = ""
    attempt: int = 0  # sends of the pending steps so far, minus one

    def items_json(self) -> list[dict[str, Any]]:
        return [{"sku": sku, "qty": qty} for sku, qty in self.items]


@dataclass(frozen=True)
class Command:
    """A record to send: ``command_id`` names the step (``{order}:{step}``); ``record_id``
    (the ``rk.id``) names this send of it, so a re-send gets past the participant's dedup and
    the participant's own idempotency (by ``command_id``) answers with the stored reply."""

    step: str
    type: str
    topic: str
    order_id: str
    command_id: str
    record_id: str
    data: dict[str, Any]


def command(order: Order, step: str) -> Command:
    type_, topic = COMMANDS[step]
    data: dict[str, Any] = {}
    if step in ("reserve", "ship"):
        data["items"] = order.items_json()
    if step == "ship":
        data["address"] = f"{order.customer}'s address"
    if step in ("charge", "refund"):
        data["amount_cents"] = order.amount_cents
    if step == "charge":
        data["card"] = order.card
    command_id = f"{order.order_id}:{step}"
    record_id = command_id if order.attempt == 0 else f"{command_id}#{order.attempt}"
    return Command(step, type_, topic, order.order_id, command_id, record_id, data)


def place(order: Order) -> list[Command]:
    """What a new order sends: the reservation."""
    return [command(order, "reserve")]


@dataclass(frozen=True)
class Outcome:
    order: Order
    commands: list[Command]
    changed: bool  # the state moved (an OrderStatusChanged is due)
    ignored: str = ""  # why the event changed nothing (stale, duplicate, unexpected)


def transition(order: Order, event: Envelope) -> Outcome:
    """Apply a participant's reply. Replies to steps not awaited (duplicates, late copies of an
    earlier send, replies after the order ended) change nothing."""
    step = REPLIES.get(event.type)
    if step is None:
        return Outcome(order, [], False, f"not a reply: {event.type}")
    if step not in order.pending:
        return Outcome(order, [], False, f"{event.type} for a step not awaited ({order.state})")
    s, t = order.state, event.type
    if s == RESERVING and t == "StockReserved":
        return _move(order, CHARGING, {"charge"})
    if s == RESERVING and t == "StockRejected":
        return _move(order, CANCELLED, set(), reason="out_of_stock")
    if s == CHARGING and t == "PaymentCharged":
        return _move(replace(order, charged=True), SHIPPING, {"ship"})
    if s == CHARGING and t == "PaymentDeclined":
        return _move(order, COMPENSATING, {"release"}, reason="payment_declined")
    if s == SHIPPING and t == "OrderShipped":
        return _move(order, FINALIZING, {"commit"})
    if s == SHIPPING and t == "ShipmentFailed":
        return _move(order, COMPENSATING, {"refund", "release"}, reason="shipping_failed")
    if s == FINALIZING and t == "StockCommitted":
        return _move(order, COMPLETED, set())
    if s == COMPENSATING:
        left = order.pending - {step}
        if not left:
            return _move(order, CANCELLED, set(), reason=order.reason)
        # one compensation done, the other still awaited: no new state, nothing to send
        return Outcome(replace(order, pending=frozenset(left)), [], False)
    return Outcome(order, [], False, f"{t} unexpected in {s}")  # pragma: no cover - by REPLIES


def _move(order: Order, state: str, pending: set[str], *, reason: str = "") -> Outcome:
    moved = replace(
        order,
        state=state,
        version=order.version + 1,
        pending=frozenset(pending),
        attempt=0,
        reason=reason or order.reason,
    )
    return Outcome(moved, [command(moved, step) for step in sorted(pending)], True)


def resend(order: Order) -> tuple[Order, list[Command]]:
    """The awaited steps again, one attempt later (the caller decides when: ``next_deadline``)."""
    again = replace(order, attempt=order.attempt + 1)
    return again, [command(again, step) for step in sorted(again.pending)]


def next_deadline(now: float, attempt: int, profile: c.Profile, order_id: str = "") -> float:
    """When to send the awaited steps again: the step timeout, doubling per attempt, capped,
    spread by up to +25 % per order (orders stalled by one outage do not all ask again at
    once); the spread is a hash, so the function stays pure."""
    spread = 1 + (zlib.crc32(f"{order_id}#{attempt}".encode()) % 1000) / 4000
    return now + min(profile.step_timeout * 2.0**attempt, profile.step_timeout_max) * spread
