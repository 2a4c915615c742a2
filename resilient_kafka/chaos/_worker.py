"""A consumer worker of a chaos scenario (run as its own OS process).

It consumes the scenario's topic with ``ResilientConsumer``, calls a simulated downstream through
a circuit breaker, and records each side effect in the scenario's SQLite ledger. With dedup on,
the ledger row and the dedup store's "done" mark are written in one SQLite transaction, so a
duplicate row means the library ran the handler twice for a processed message.

With ``concurrency`` > 1 the handler runs on that many threads at once: each thread writes
through a SQLite connection of its own, and the dedup store (whose completion writes the row,
on the polling thread) is the library's thread-safe ``SQLiteStore``. Each row carries the
record's place in the source log (partition and offset; a retry copy's original ones) and
whether it came through a retry tier, for the runner's per-key order check.

``python -m resilient_kafka.chaos._worker '<json settings>'``
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
import time
from typing import Any

from resilient_kafka import (
    CircuitBreaker,
    DeadLetterPolicy,
    ResilientConsumer,
    RetryPolicy,
    headers,
)
from resilient_kafka.chaos._stack import client_config
from resilient_kafka.dedup import SQLiteStore

# part/off: the record's place in the source topic (a retry copy's original place); retried: 1
# when this processing was of a retry tier's copy
LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger (id TEXT NOT NULL, key TEXT, seq INTEGER,"
    " worker TEXT NOT NULL, at REAL NOT NULL, part INTEGER, off INTEGER, retried INTEGER)"
)
LEDGER_INSERT = "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
Row = tuple[str, str, int, int, int, int]  # id, key, seq, part, off, retried
CALLS_SCHEMA = "CREATE TABLE IF NOT EXISTS calls (id TEXT NOT NULL, at REAL NOT NULL)"


class Poison(ValueError):
    """A message no handler can process: straight to the DLQ."""


RETRY = RetryPolicy(delays=(0.5, 2.0), dead_letter_on=(Poison,))
DEAD_LETTER = DeadLetterPolicy()


def derived_topics(topic: str, group: str) -> list[str]:
    """The workers' retry tiers and DLQ of ``topic`` (made by the runner where the cluster
    answers no CreateTopics: the mock cluster)."""
    tiers = [RETRY.topic(topic, group, n) for n in range(1, RETRY.attempts + 1)]
    return [*tiers, DEAD_LETTER.topic(topic, group)]


class LedgerStore(SQLiteStore):
    """The dedup store whose completion writes the side effect's ledger row atomically."""

    def __init__(self, path: str, worker: str) -> None:
        super().__init__(path, timeout=30.0)
        self._db.execute(LEDGER_SCHEMA)
        self.worker = worker
        # dedup key -> the side effect's row, from the handler (a worker thread) to complete()
        # (the polling thread); twin copies of one message never run together, so one entry a
        # key at a time (dict operations are atomic)
        self.pending: dict[str, Row] = {}

    def complete(self, key: str, owner: str) -> bool:
        msg_id, msg_key, seq, part, off, retried = self.pending.pop(key)

        def body() -> bool:
            self._db.execute(
                LEDGER_INSERT,
                (msg_id, msg_key, seq, self.worker, time.time(), part, off, retried),
            )
            return self._mark_done(key, owner)

        return self._transaction(body)


def main(settings: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s {settings['worker']} %(name)s %(message)s"
    )
    group = settings["group"]
    store = LedgerStore(settings["db"], settings["worker"]) if settings["dedup"] else None
    local = threading.local()  # a SQLite connection per handler thread

    def connection() -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is None:
            db = sqlite3.connect(settings["db"], timeout=30.0, isolation_level=None)
            local.db = db
        return db

    setup = connection()
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(LEDGER_SCHEMA)
    setup.execute(CALLS_SCHEMA)
    breaker = CircuitBreaker("downstream", fail_max=5, reset_timeout=1.0)
    down_flag = settings["downstream_flag"]
    latency = settings["downstream_latency_ms"] / 1000
    consumer = ResilientConsumer(
        {
            **client_config(settings["bootstrap"], settings["external"]),
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings["session_timeout_ms"],
            "heartbeat.interval.ms": 1000,
            # commits every second (librdkafka: 5 s): a crash replays little, and dedup skips it
            "auto.commit.interval.ms": 1000,
            "client.id": settings["worker"],
            # static membership: a restarted worker rejoins as the member it replaces, and the
            # group gives it the same partitions without a rebalance of the others
            **(
                {"group.instance.id": f"{group}-{settings['instance']}"}
                if settings["static_membership"]
                else {}
            ),
        },
        retry=RETRY,
        dead_letter=DEAD_LETTER,
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
        db = connection()
        # the downstream's own record of the call (committed on its own, like a remote service)
        db.execute("INSERT INTO calls VALUES (?, ?)", (payload["id"], time.time()))
        origin = headers.original(msg)  # a retry copy's place in the source topic
        retried = int(msg.topic() != settings["topic"])
        msg_id, msg_key, seq = payload["id"], payload["key"], payload["seq"]
        if store is not None:
            row = (msg_id, msg_key, seq, origin.partition, origin.offset, retried)
            store.pending[f"{group}|id:{msg_id}"] = row
        else:
            worker, at, part, off = settings["worker"], time.time(), origin.partition, origin.offset
            db.execute(LEDGER_INSERT, (msg_id, msg_key, seq, worker, at, part, off, retried))

    def assigned(consumer: Any, partitions: list[Any]) -> None:
        print(f"assigned {len(partitions)} at {time.time():.3f}", flush=True)

    consumer.subscribe([settings["topic"]], on_assign=assigned)
    print("ready", flush=True)
    consumer.run(handler, concurrency=settings["concurrency"], ordering=settings["ordering"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
