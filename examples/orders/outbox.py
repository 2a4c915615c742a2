"""The transactional outbox: a record to publish is a row written in the same SQLite transaction
as the state change that caused it; a relay thread publishes the rows and marks them sent once
the broker acknowledged them. A crash between the two re-publishes a row with the same ``rk.id``,
which consumers' dedup absorbs: state and output can never disagree for good."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from examples.orders.db import Database, Tx
from resilient_kafka import ResilientProducer

log = logging.getLogger("orders.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key TEXT NOT NULL,
    value BLOB NOT NULL, record_id TEXT NOT NULL, created_at REAL NOT NULL, sent_at REAL);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(sent_at) WHERE sent_at IS NULL
"""


def add(tx: Tx, topic: str, key: str, value: bytes, record_id: str) -> None:
    tx.execute(
        "INSERT INTO outbox (topic, key, value, record_id, created_at) VALUES (?, ?, ?, ?, ?)",
        (topic, key, value, record_id, time.time()),
    )


def backlog(db: Database) -> int:
    return int(db.query("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")[0][0])


class Relay:
    """Publishes unsent rows in ``seq`` order; a row is marked sent only after its ack."""

    def __init__(self, db: Database, producer_config: dict[str, Any], batch: int = 500) -> None:
        self._db = db
        self._producer = ResilientProducer(producer_config)
        self._batch = batch
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        self.published = 0

    def start(self) -> Relay:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what is pending (bounded by ``timeout``), then stop."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._producer.flush(2)

    def _loop(self) -> None:
        while True:
            try:
                sent = self._publish_once()
            except Exception:  # a dead relay would leave the API accepting orders for nothing
                log.exception("outbox relay: publishing failed; trying again in 1 s")
                self._stopping.wait(1.0)
                sent = 0
            if self._stopping.is_set() and not sent:
                return
            if not sent:
                self._wake.wait(0.2)
                self._wake.clear()

    def _publish_once(self) -> int:
        rows = self._db.query(
            "SELECT seq, topic, key, value, record_id FROM outbox WHERE sent_at IS NULL "
            "ORDER BY seq LIMIT ?",
            (self._batch,),
        )
        if not rows:
            return 0
        acked: list[int] = []
        failed: list[str] = []

        def delivered(seq: int) -> Any:
            def report(err: Any, _msg: Any) -> None:
                (failed.append(str(err)) if err else acked.append(seq))

            return report

        for row in rows:
            while True:
                try:
                    self._producer.produce(
                        row["topic"],
                        row["value"],
                        key=row["key"].encode(),
                        headers=[("rk.id", row["record_id"].encode())],
                        on_delivery=delivered(row["seq"]),
                    )
                    break
                except BufferError:  # the local queue is full: let it drain
                    self._producer.poll(0.1)
        self._producer.flush(30)  # rows not acknowledged by then are sent again (same rk.id)
        if acked:
            with self._db.transaction() as tx:
                now = time.time()
                for seq in acked:
                    tx.execute("UPDATE outbox SET sent_at = ? WHERE seq = ?", (now, seq))
            self.published += len(acked)
        if failed:
            log.warning(
                "outbox: %d records not acknowledged (%s); sending again", len(failed), failed[0]
            )
            time.sleep(0.5)
        return len(acked)
