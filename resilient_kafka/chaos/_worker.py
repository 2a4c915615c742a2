"""A consumer worker of a chaos scenario (run as its own OS process).

It consumes the scenario's topic with ``ResilientConsumer``, calls a simulated downstream through
a circuit breaker, and records each side effect in the scenario's SQLite ledger. With dedup on,
the ledger row and the dedup store's "done" mark are written in one SQLite transaction, so a
duplicate row means the library ran the handler twice for a processed message.

``python -m resilient_kafka.chaos._worker '<json settings>'``
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from typing import Any

from resilient_kafka import CircuitBreaker, ResilientConsumer, RetryPolicy
from resilient_kafka.dedup import SQLiteStore

LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger (id TEXT NOT NULL, key TEXT, seq INTEGER,"
    " worker TEXT NOT NULL, at REAL NOT NULL)"
)
CALLS_SCHEMA = "CREATE TABLE IF NOT EXISTS calls (id TEXT NOT NULL, at REAL NOT NULL)"


class Poison(ValueError):
    """A message no handler can process: straight to the DLQ."""


class LedgerStore(SQLiteStore):
    """The dedup store whose completion writes the side effect's ledger row atomically."""

    def __init__(self, path: str, worker: str) -> None:
        super().__init__(path, timeout=30.0)
        self._db.execute(LEDGER_SCHEMA)
        self.worker = worker
        self.pending: dict[str, tuple[str, str, int]] = {}

    def complete(self, key: str, owner: str) -> bool:
        row = self.pending.pop(key)

        def body() -> bool:
            self._db.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?)", (*row, self.worker, time.time())
            )
            return self._mark_done(key, owner)

        return self._transaction(body)


def main(settings: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s {settings['worker']} %(name)s %(message)s"
    )
    group = settings["group"]
    store = LedgerStore(settings["db"], settings["worker"]) if settings["dedup"] else None
    plain = sqlite3.connect(settings["db"], timeout=30.0, isolation_level=None)
    plain.execute("PRAGMA journal_mode=WAL")
    plain.execute(LEDGER_SCHEMA)
    plain.execute(CALLS_SCHEMA)
    breaker = CircuitBreaker("downstream", fail_max=5, reset_timeout=1.0)
    down_flag = settings["downstream_flag"]
    latency = settings["downstream_latency_ms"] / 1000
    consumer = ResilientConsumer(
        {
            "bootstrap.servers": settings["bootstrap"],
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            # commits every second (librdkafka: 5 s): a crash replays little, and dedup skips it
            "auto.commit.interval.ms": 1000,
            "client.id": settings["worker"],
        },
        retry=RetryPolicy(delays=(0.5, 2.0), dead_letter_on=(Poison,)),
        breakers=[breaker],
        dedup=store,
        dedup_lease=10.0,
        metrics=False,
    )

    def downstream(payload: dict[str, Any]) -> None:
        if latency:
            time.sleep(latency)
        if os.path.exists(down_flag):
            raise ConnectionError("downstream unavailable")

    def handler(msg: Any) -> None:
        payload = json.loads(msg.value())
        if payload.get("poison"):
            raise Poison(f"message {payload['id']} can never be processed")
        breaker.call(downstream, payload)
        # the downstream's own record of the call (committed on its own, like a remote service)
        plain.execute("INSERT INTO calls VALUES (?, ?)", (payload["id"], time.time()))
        row = (payload["id"], payload["key"], payload["seq"])
        if store is not None:
            store.pending[f"{group}|id:{payload['id']}"] = row
        else:
            plain.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?)", (*row, settings["worker"], time.time())
            )

    def assigned(consumer: Any, partitions: list[Any]) -> None:
        print(f"assigned {len(partitions)}", flush=True)

    consumer.subscribe([settings["topic"]], on_assign=assigned)
    print("ready", flush=True)
    consumer.run(handler)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
