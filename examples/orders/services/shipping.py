"""Shipping: decides whether an order can ship, and **listens to its own events**.

The decision is deterministic (a hash of the order id: about ``ship_fail_pct`` % of orders can
never ship, which drives the saga's compensations), so a replay produces the same event. The
carrier is sometimes busy (a transient failure: retry tiers). Shipping writes no database from
the command: its ledger (``shipments``) is built by a second consumer from the
``shipping-events`` it published, so the ledger and the events can never disagree beyond lag.
**Why not exactly-once:** a replay re-emits the identical event with the same ``rk.id``, which
every consumer's dedup absorbs.
"""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import schemas, service
from examples.orders.db import Database
from resilient_kafka import ResilientProducer

SCHEMA = """
CREATE TABLE IF NOT EXISTS shipments (
    order_id TEXT PRIMARY KEY, outcome TEXT NOT NULL, event_id TEXT NOT NULL, at INTEGER)
"""


class CarrierBusy(Exception):
    """The carrier's API is busy: try again later."""


def outcome(order_id: str, seed: int, fail_pct: int) -> tuple[str, dict[str, Any]]:
    digest = int(hashlib.sha256(f"{seed}:{order_id}".encode()).hexdigest(), 16)
    if digest % 100 < fail_pct:
        return "ShipmentFailed", {"reason": "address cannot be served"}
    return "OrderShipped", {"tracking": f"TRK{digest % 10**10:010d}"}


def main() -> None:
    s = service.settings()
    p = s.profile
    ledger_db = Database(Path(s.workdir) / "shipping.db", SCHEMA)
    consumer = service.consumer(s, "shipping", retry_on=(CarrierBusy, service.NotAcknowledged))
    ledger = service.consumer(s, "shipping-ledger", retry_on=(Exception,), metrics=False)
    producer = ResilientProducer(service.producer_config(s))
    busy = random.Random()

    def ship(msg: Any) -> None:
        cmd: schemas.Envelope = msg.value()
        if busy.uniform(0, 100) < p.carrier_busy_pct:
            raise CarrierBusy(f"carrier busy for {cmd.order_id}")
        type_, data = outcome(cmd.order_id, s.seed, p.ship_fail_pct)
        event_id = f"{cmd.command_id}:reply"
        value = schemas.encode(
            type_,
            id=event_id,
            order_id=cmd.order_id,
            command_id=cmd.command_id,
            data=data,
        )
        service.produce_acknowledged(producer, c.SHIPPING_EVENTS, value, cmd.order_id, event_id)

    def record(msg: Any) -> None:
        event: schemas.Envelope = msg.value()
        with ledger_db.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO shipments VALUES (?, ?, ?, ?)",
                (event.order_id, event.type, event.id, event.at),
            )

    ledger_thread = threading.Thread(target=ledger.run, args=(record,), name="ledger")
    ledger_thread.start()
    service.ready(s)
    try:
        consumer.run(ship)  # returns on SIGTERM: then the ledger stops too
    finally:
        ledger.stop()
        ledger_thread.join(30)
        producer.flush(10)


if __name__ == "__main__":
    main()
