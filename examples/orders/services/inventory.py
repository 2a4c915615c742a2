"""Inventory: reserves, releases and commits stock. **Exactly-once mode.**

Why exactly-once fits here: the reply is a pure function of a committed row, and there is no
external side effect. The handler writes its state and the reply in one SQLite transaction
(``commands`` is the idempotency table: command id -> reply), then produces the reply through
``consumer.producer``; the reply and the consumed offset commit in one Kafka transaction. An
aborted transaction is replayed and produces the *same* reply from the stored row, so the SQLite
commit and the Kafka transaction act as one step. (The library refuses ``dedup=`` together with
exactly-once: here the ``commands`` table is the dedup.)
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import schemas, service
from examples.orders.db import Database, Tx

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY, initial INTEGER NOT NULL, available INTEGER NOT NULL,
    reserved INTEGER NOT NULL DEFAULT 0, shipped INTEGER NOT NULL DEFAULT 0,
    CHECK (available >= 0 AND reserved >= 0 AND shipped >= 0));
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY, items TEXT NOT NULL, state TEXT NOT NULL, updated_at INTEGER);
CREATE TABLE IF NOT EXISTS commands (command_id TEXT PRIMARY KEY, reply BLOB NOT NULL)
"""


class SagaContractBroken(Exception):
    """A command that no correct saga sends (commit without a reservation): a bug, so the
    record goes to the DLQ, where the invariant checker will find it unexplained."""


class Inventory:
    def __init__(self, db: Database) -> None:
        self.db = db

    def seed(self, stock: dict[str, int]) -> None:
        with self.db.transaction() as tx:
            for sku, qty in stock.items():
                tx.execute(
                    "INSERT OR IGNORE INTO stock (sku, initial, available) VALUES (?, ?, ?)",
                    (sku, qty, qty),
                )

    def reply_for(self, cmd: schemas.Envelope) -> bytes:
        """The reply to ``cmd``: the stored one if it was handled before, else decided now and
        stored with its effect in one transaction."""
        with self.db.transaction() as tx:
            row = tx.one("SELECT reply FROM commands WHERE command_id = ?", (cmd.command_id,))
            if row is not None:
                return bytes(row["reply"])
            reply = schemas.reply(cmd, *self._decide(tx, cmd))
            tx.execute("INSERT INTO commands VALUES (?, ?)", (cmd.command_id, reply))
            return reply

    def _decide(self, tx: Tx, cmd: schemas.Envelope) -> tuple[str, dict[str, Any]]:
        res = tx.one("SELECT items, state FROM reservations WHERE order_id = ?", (cmd.order_id,))
        state = res["state"] if res else None
        if cmd.type == "ReserveStock":
            if state in ("released", "rejected"):
                return "StockRejected", {"reason": "order closed"}
            if state is not None:
                return "StockReserved", {}
            items = [(i["sku"], i["qty"]) for i in cmd.data["items"]]
            for sku, qty in items:
                row = tx.one("SELECT available FROM stock WHERE sku = ?", (sku,))
                if row is None or row["available"] < qty:
                    self._record(tx, cmd.order_id, items, "rejected", cmd.at)
                    why = "unknown sku" if row is None else "insufficient stock"
                    return "StockRejected", {"reason": f"{why}: {sku}"}
            _move(tx, items, "available", "reserved")
            self._record(tx, cmd.order_id, items, "reserved", cmd.at)
            return "StockReserved", {}
        if cmd.type == "ReleaseStock":
            if state == "reserved":
                _move(tx, json.loads(res["items"]), "reserved", "available")  # type: ignore[index]
                tx.execute(
                    "UPDATE reservations SET state = 'released' WHERE order_id = ?", (cmd.order_id,)
                )
                return "StockReleased", {"noop": False}
            if state == "committed":
                raise SagaContractBroken(f"release of {cmd.order_id}, whose stock has shipped")
            if state is None:  # nothing reserved: a tombstone, so a late reserve is refused
                self._record(tx, cmd.order_id, [], "released", cmd.at)
            return "StockReleased", {"noop": True}
        if cmd.type == "CommitStock":
            if state == "reserved":
                _move(tx, json.loads(res["items"]), "reserved", "shipped")  # type: ignore[index]
                tx.execute(
                    "UPDATE reservations SET state = 'committed' WHERE order_id = ?",
                    (cmd.order_id,),
                )
                return "StockCommitted", {}
            if state == "committed":
                return "StockCommitted", {}
            raise SagaContractBroken(f"commit of {cmd.order_id} in reservation state {state}")
        raise SagaContractBroken(f"{cmd.type} is not an inventory command")

    @staticmethod
    def _record(tx: Tx, order_id: str, items: list[tuple[str, int]], state: str, at: int) -> None:
        tx.execute(
            "INSERT INTO reservations VALUES (?, ?, ?, ?)",
            (order_id, json.dumps(items), state, at),
        )


def _move(tx: Tx, items: list[Any], source: str, target: str) -> None:
    """Move each item's quantity from one stock column to another (the CHECK constraint fails
    the transaction rather than let a column go negative)."""
    assert {source, target} <= {"available", "reserved", "shipped"}  # column names, not input
    for sku, qty in items:
        tx.execute(
            f"UPDATE stock SET {source} = {source} - ?, {target} = {target} + ? WHERE sku = ?",
            (qty, qty, sku),
        )


def main() -> None:
    s = service.settings()
    inventory = Inventory(Database(Path(s.workdir) / "inventory.db", SCHEMA))
    inventory.seed(s.profile.stock)
    consumer = service.consumer(
        s,
        "inventory",
        retry_on=(sqlite3.OperationalError,),
        dedup=False,
        exactly_once=True,
        transaction_interval=s.profile.transaction_interval,
        # a stable id: a restarted instance fences its predecessor and aborts its open
        # transaction at once (docs/exactly-once.md). Transactions commit every 0.2 s, so a
        # 10 s transaction timeout is ample, and bounds how long a stuck commit can hold us
        producer_config={
            "transactional.id": f"{c.NAMESPACE}-inventory",
            "transaction.timeout.ms": 10_000,
        },
        forward_timeout=10.0,
    )

    def handle(msg: Any) -> None:
        cmd: schemas.Envelope = msg.value()
        reply = inventory.reply_for(cmd)
        consumer.producer.produce(
            c.INVENTORY_EVENTS,
            reply,
            key=cmd.order_id.encode(),
            headers=service.reply_headers(f"{cmd.command_id}:reply"),
        )

    service.ready(s)
    service.run(consumer, handle)


if __name__ == "__main__":
    main()
