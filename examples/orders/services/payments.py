"""Payments: charges and refunds through the payment gateway, behind a circuit breaker.

- A declined card is a *business* outcome: it becomes ``PaymentDeclined``, is never retried,
  never dead-lettered, and the breaker ignores it (``exclude=[CardDeclined]``).
- The gateway timing out or answering 5xx is a *failure*: the breaker counts it and the record
  goes to a retry tier. When the breaker opens, the consumer pauses (and probes) instead of
  burning the retry tiers into the DLQ.
- **Why not exactly-once:** the gateway call is outside Kafka (a replay after an abort would
  call it again), and exactly-once cannot have library dedup. Instead the gateway's
  idempotency key (the command id) makes a repeated call harmless, and the ``commands`` table
  keeps the reply: the record's offset commits only after the reply is acknowledged, so a crash
  anywhere re-delivers the command, which re-sends the stored reply (the input offset is the
  outbox).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import schemas, service
from examples.orders.db import Database
from examples.orders.gateway import CardDeclined, GatewayClient, GatewayUnavailable
from resilient_kafka import CircuitBreaker, ResilientProducer

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    order_id TEXT PRIMARY KEY, charge_status TEXT, gateway_ref TEXT, amount_cents INTEGER,
    refund_status TEXT, refund_ref TEXT);
CREATE TABLE IF NOT EXISTS commands (command_id TEXT PRIMARY KEY, reply BLOB NOT NULL)
"""


class Payments:
    def __init__(self, db: Database, gateway: GatewayClient, breaker: CircuitBreaker) -> None:
        self.db = db
        self.gateway = gateway
        self.breaker = breaker

    def reply_for(self, cmd: schemas.Envelope) -> bytes:
        stored = self.db.query("SELECT reply FROM commands WHERE command_id = ?", (cmd.command_id,))
        if stored:
            return bytes(stored[0]["reply"])
        key = cmd.command_id  # the gateway's idempotency key: one charge per command, ever
        if cmd.type == "ChargePayment":
            try:
                ref = self.breaker.call(
                    self.gateway.charge,
                    key,
                    cmd.order_id,
                    cmd.data["amount_cents"],
                    cmd.data["card"],
                )
                type_, data = (
                    "PaymentCharged",
                    {"amount_cents": cmd.data["amount_cents"], "gateway_ref": ref},
                )
                row: tuple[Any, ...] = ("charged", ref, cmd.data["amount_cents"], None, None)
            except CardDeclined as exc:
                type_, data = "PaymentDeclined", {"reason": str(exc)}
                row = ("declined", None, cmd.data["amount_cents"], None, None)
            return self._store(cmd, type_, data, row)
        if cmd.type == "RefundPayment":
            charged = self.db.query(
                "SELECT gateway_ref FROM payments WHERE order_id = ? AND charge_status = 'charged'",
                (cmd.order_id,),
            )
            if not charged:  # nothing was charged: nothing to give back
                return self._store(cmd, "PaymentRefunded", {"amount_cents": 0, "noop": True}, None)
            ref = self.breaker.call(
                self.gateway.refund, key, cmd.order_id, cmd.data["amount_cents"]
            )
            return self._store(
                cmd,
                "PaymentRefunded",
                {"amount_cents": cmd.data["amount_cents"], "noop": False},
                ("refunded", ref),
            )
        raise ValueError(f"{cmd.type} is not a payment command")

    def _store(
        self, cmd: schemas.Envelope, type_: str, data: dict[str, Any], row: tuple[Any, ...] | None
    ) -> bytes:
        reply = schemas.reply(cmd, type_, data)
        with self.db.transaction() as tx:
            # two copies of one command may race (a retry copy and a re-send): the first wins
            tx.execute("INSERT OR IGNORE INTO commands VALUES (?, ?)", (cmd.command_id, reply))
            if row is not None and len(row) == 5:
                tx.execute(
                    "INSERT OR IGNORE INTO payments (order_id, charge_status, gateway_ref, "
                    "amount_cents, refund_status, refund_ref) VALUES (?, ?, ?, ?, ?, ?)",
                    (cmd.order_id, *row),
                )
            elif row is not None:
                tx.execute(
                    "UPDATE payments SET refund_status = ?, refund_ref = ? WHERE order_id = ?",
                    (*row, cmd.order_id),
                )
            stored = tx.one("SELECT reply FROM commands WHERE command_id = ?", (cmd.command_id,))
        return bytes(stored["reply"])  # type: ignore[index]


def main() -> None:
    s = service.settings()
    p = s.profile
    breaker = CircuitBreaker(
        "payment-gateway",
        fail_max=p.breaker_fail_max,
        reset_timeout=p.breaker_reset,
        exclude=[CardDeclined],
    )
    payments = Payments(
        Database(Path(s.workdir) / "payments.db", SCHEMA), GatewayClient(s.gateway_url), breaker
    )
    consumer = service.consumer(
        s,
        "payments",
        delays=p.payment_retry_delays,
        breakers=[breaker],
        retry_on=(GatewayUnavailable, service.NotAcknowledged, sqlite3.OperationalError),
    )
    producer = ResilientProducer(service.producer_config(s))

    def handle(msg: Any) -> None:
        cmd: schemas.Envelope = msg.value()
        reply = payments.reply_for(cmd)
        # the command's offset commits only once its reply is acknowledged
        service.produce_acknowledged(
            producer, c.PAYMENT_EVENTS, reply, cmd.order_id, f"{cmd.command_id}:reply"
        )

    service.ready(s)
    consumer.run(handle, concurrency=8, ordering="key")
    producer.flush(10)


if __name__ == "__main__":
    main()
