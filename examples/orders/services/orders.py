"""Orders: the HTTP API that takes orders, and the saga orchestrator that sees them through.

**Transactional outbox.** ``POST /orders`` has no Kafka input to replay, so the order row and
the records it causes (``OrderPlaced``, ``OrderStatusChanged``, ``ReserveStock``) are written in
one SQLite transaction, and a relay publishes them (outbox.py). The saga consumer does the same:
a reply, the saga's new state, the next command and an ``inbox`` row commit together. Exactly-once
would not help here: the truth is SQLite, not Kafka.

The saga sends a step again when its reply has not come within the step timeout (doubling,
capped): a reply lost anywhere (a dead letter, a broker that lost an acknowledged record) then
costs time, never an order stuck for good.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import outbox, saga, schemas, service, web
from examples.orders.db import Database, Tx

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE NOT NULL, customer TEXT NOT NULL,
    items TEXT NOT NULL, amount_cents INTEGER NOT NULL, card TEXT NOT NULL, state TEXT NOT NULL,
    version INTEGER NOT NULL, pending TEXT NOT NULL, charged INTEGER NOT NULL, reason TEXT,
    attempt INTEGER NOT NULL, deadline REAL, resends INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, terminal_at REAL, request TEXT);
CREATE INDEX IF NOT EXISTS orders_deadline ON orders(deadline) WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, ignored TEXT);
"""
    + outbox.SCHEMA
)

_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


class BadOrder(ValueError):
    pass


class Orders:
    def __init__(self, db: Database, relay: outbox.Relay | None, profile: c.Profile) -> None:
        self.db = db
        self.relay = relay
        self.profile = profile

    # -- the API -------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: Any, headers: Any) -> tuple[int, Any]:
        if method == "POST" and path == "/orders":
            key = {k.lower(): v for k, v in headers.items()}.get("idempotency-key", "")
            try:
                return self.place(key, body)
            except BadOrder as exc:
                return 400, {"error": str(exc)}
        if method == "GET" and path == "/stats":
            return 200, self.stats()
        found = re.fullmatch(r"/orders/([\w.:-]+)", path)
        if method == "GET" and found:
            order = self.get(found[1])
            return (200, order) if order else (404, {"error": f"no order {found[1]}"})
        return 404, {"error": f"no route {method} {path}"}

    def place(self, key: str, body: Any) -> tuple[int, dict[str, Any]]:
        """201 with the new order; 200 with the stored one for a key seen before with the same
        request (a client's retry after a lost answer or a crash of this process creates no
        second order); 422 for a key reused with another request. Keys are one client's: a
        real API would scope them by the authenticated caller."""
        if not _KEY.fullmatch(key or ""):
            raise BadOrder("an Idempotency-Key header (1-80 of A-Z a-z 0-9 _ . : -) is required")
        customer, items, card = _validated(body)
        amount = sum(c.PRICES[i["sku"]] * i["qty"] for i in items)
        now = time.time()
        order = saga.Order(
            f"o-{key}", customer, tuple((i["sku"], i["qty"]) for i in items), amount, card
        )
        request = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.db.transaction() as tx:
            seen = tx.one("SELECT request FROM orders WHERE idempotency_key = ?", (key,))
            if seen is not None and seen["request"] != request:
                return 422, {"error": f"Idempotency-Key {key} was used for another request"}
            if seen is not None:
                existing = True
            else:
                existing = False
                tx.execute(
                    "INSERT INTO orders (order_id, idempotency_key, customer, items, "
                    "amount_cents, card, state, version, pending, charged, reason, attempt, "
                    "created_at, updated_at, request) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, '', 0, ?, ?, ?)",
                    (
                        order.order_id,
                        key,
                        customer,
                        json.dumps(items),
                        amount,
                        card,
                        order.state,
                        order.version,
                        json.dumps(sorted(order.pending)),
                        now,
                        now,
                        request,
                    ),
                )
                self._set_deadline(tx, order, now)
                outbox.add(
                    tx,
                    c.ORDER_EVENTS,
                    order.order_id,
                    schemas.encode(
                        "OrderPlaced",
                        id=f"{order.order_id}:placed",
                        order_id=order.order_id,
                        data={"customer": customer, "items": items, "amount_cents": amount},
                    ),
                    f"{order.order_id}:placed",
                )
                self._emit(tx, order, saga.place(order), changed=True)
        if self.relay:
            self.relay.wake()
        stored = self.get_by_key(key)
        return (200 if existing else 201), stored

    def get(self, order_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM orders WHERE order_id = ?", (order_id,))
        return _public(rows[0]) if rows else None

    def get_by_key(self, key: str) -> dict[str, Any]:
        return _public(self.db.query("SELECT * FROM orders WHERE idempotency_key = ?", (key,))[0])

    def stats(self) -> dict[str, Any]:
        by_state = {s: 0 for s in saga.STATES} | {
            r[0]: r[1] for r in self.db.query("SELECT state, COUNT(*) FROM orders GROUP BY state")
        }
        steps = {s: 0 for s in saga.COMMANDS} | {}
        for (pending,) in self.db.query("SELECT pending FROM orders WHERE pending != '[]'"):
            for step in json.loads(pending):
                steps[step] += 1
        return {
            "by_state": by_state,
            "steps_in_flight": steps,
            "resends": self.db.query("SELECT COALESCE(SUM(resends), 0) FROM orders")[0][0],
            "ignored_replies": self.db.query(
                "SELECT COUNT(*) FROM inbox WHERE ignored IS NOT NULL"
            )[0][0],
            "outbox_backlog": outbox.backlog(self.db),
        }

    # -- the saga ------------------------------------------------------------------------------

    def on_reply(self, event: schemas.Envelope) -> None:
        """Apply a participant's reply: state, next commands and the inbox row in one commit."""
        with self.db.transaction() as tx:
            if tx.one("SELECT 1 FROM inbox WHERE event_id = ?", (event.id,)):
                return  # applied before (a redelivery the dedup store did not catch)
            row = tx.one("SELECT * FROM orders WHERE order_id = ?", (event.order_id,))
            if row is None:
                tx.execute("INSERT INTO inbox VALUES (?, ?)", (event.id, "unknown order"))
                return
            result = saga.transition(_order(row), event)
            tx.execute("INSERT INTO inbox VALUES (?, ?)", (event.id, result.ignored or None))
            if result.ignored:
                return
            self._save(tx, result.order)
            self._emit(tx, result.order, result.commands, changed=result.changed)
        if self.relay:
            self.relay.wake()

    def resend_due(self) -> int:
        """Send again the awaited steps of every order whose deadline has passed."""
        now = time.time()
        due = self.db.query("SELECT order_id FROM orders WHERE deadline <= ?", (now,))
        for (order_id,) in due:
            with self.db.transaction() as tx:
                row = tx.one(
                    "SELECT * FROM orders WHERE order_id = ? AND deadline <= ?", (order_id, now)
                )
                if row is None:
                    continue
                order, commands = saga.resend(_order(row))
                self._save(tx, order)
                tx.execute(
                    "UPDATE orders SET resends = resends + 1 WHERE order_id = ?", (order_id,)
                )
                self._emit(tx, order, commands, changed=False)
        if due and self.relay:
            self.relay.wake()
        return len(due)

    def _save(self, tx: Tx, order: saga.Order) -> None:
        now = time.time()
        tx.execute(
            "UPDATE orders SET state = ?, version = ?, pending = ?, charged = ?, reason = ?, "
            "attempt = ?, updated_at = ?, terminal_at = ? WHERE order_id = ?",
            (
                order.state,
                order.version,
                json.dumps(sorted(order.pending)),
                int(order.charged),
                order.reason,
                order.attempt,
                now,
                now if order.state in saga.TERMINAL else None,
                order.order_id,
            ),
        )
        self._set_deadline(tx, order, now)

    def _set_deadline(self, tx: Tx, order: saga.Order, now: float) -> None:
        deadline = (
            saga.next_deadline(now, order.attempt, self.profile, order.order_id)
            if order.pending
            else None
        )
        tx.execute("UPDATE orders SET deadline = ? WHERE order_id = ?", (deadline, order.order_id))

    def _emit(
        self, tx: Tx, order: saga.Order, commands: list[saga.Command], *, changed: bool
    ) -> None:
        if changed:
            record_id = f"{order.order_id}:v{order.version}"
            outbox.add(
                tx,
                c.ORDER_EVENTS,
                order.order_id,
                schemas.encode(
                    "OrderStatusChanged",
                    id=record_id,
                    order_id=order.order_id,
                    data={"state": order.state, "version": order.version, "reason": order.reason},
                ),
                record_id,
            )
        for cmd in commands:
            outbox.add(
                tx,
                cmd.topic,
                cmd.order_id,
                schemas.encode(
                    cmd.type,
                    id=cmd.record_id,
                    order_id=cmd.order_id,
                    command_id=cmd.command_id,
                    data=cmd.data,
                ),
                cmd.record_id,
            )


def _validated(body: Any) -> tuple[str, list[dict[str, Any]], str]:
    if not isinstance(body, dict):
        raise BadOrder("the body must be a JSON object with customer, items and card")
    customer, items, card = body.get("customer"), body.get("items"), body.get("card")
    if not isinstance(customer, str) or not customer:
        raise BadOrder("customer: a non-empty string is required")
    if not isinstance(card, str) or not re.fullmatch(r"\d{12,19}", card):
        raise BadOrder("card: 12 to 19 digits are required")
    if not isinstance(items, list) or not schemas.valid_items(items):
        raise BadOrder('items: a non-empty list of {"sku": str, "qty": int > 0} is required')
    unknown = sorted({i["sku"] for i in items} - set(c.PRICES))
    if unknown:
        raise BadOrder(f"items: unknown sku {', '.join(unknown)} (we sell {', '.join(c.PRICES)})")
    return customer, items, card


def _order(row: sqlite3.Row) -> saga.Order:
    return saga.Order(
        order_id=row["order_id"],
        customer=row["customer"],
        items=tuple((i["sku"], i["qty"]) for i in json.loads(row["items"])),
        amount_cents=row["amount_cents"],
        card=row["card"],
        state=row["state"],
        version=row["version"],
        pending=frozenset(json.loads(row["pending"])),
        charged=bool(row["charged"]),
        reason=row["reason"] or "",
        attempt=row["attempt"],
    )


def _public(row: sqlite3.Row) -> dict[str, Any]:
    order = {
        k: row[k]
        for k in (
            "order_id",
            "customer",
            "amount_cents",
            "state",
            "version",
            "reason",
            "resends",
            "created_at",
            "terminal_at",
        )
    }
    order["items"] = json.loads(row["items"])
    order["pending"] = json.loads(row["pending"])
    order["card"] = "•••• " + row["card"][-4:]  # never echo a card number
    return order


def main() -> None:
    s = service.settings()
    db = Database(Path(s.workdir) / "orders.db", SCHEMA)
    relay = outbox.Relay(db, service.producer_config(s)).start()
    orders = Orders(db, relay, s.profile)
    consumer = service.consumer(s, "order-saga", retry_on=(sqlite3.OperationalError,))
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            orders.resend_due()

    threading.Thread(target=tick, name="saga-timeouts", daemon=True).start()
    server = web.serve(s.http_port, orders.route)
    service.ready(s, port=s.http_port, pid=os.getpid())
    try:
        consumer.run(lambda msg: orders.on_reply(msg.value()))  # type: ignore[arg-type]
    finally:
        stop.set()
        server.shutdown()
        relay.stop()


if __name__ == "__main__":
    main()
