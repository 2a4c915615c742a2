"""The order view: the query side (CQRS). It consumes every event topic, builds one row per
order, and serves it over HTTP. It lags the services and converges (eventual consistency).

Consumer only, so nothing to recover on the producing side: each event is applied in one SQLite
transaction together with an ``applied(event_id)`` row, so a replay (a crash before the offset
commit, a duplicate the broker let through) changes nothing. Library dedup is the fast filter
in front. Events of one order arrive on four topics in no global order, so every update
commutes: flags are set, never cleared, and the state moves only to a higher version.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from examples.orders import schemas, service, web
from examples.orders.db import Database
from examples.orders.saga import STATES

FLAGS = {
    "StockReserved": "reserved",
    "StockRejected": "rejected",
    "StockReleased": "released",
    "StockCommitted": "committed",
    "PaymentCharged": "charged",
    "PaymentDeclined": "declined",
    "PaymentRefunded": "refunded",
    "OrderShipped": "shipped",
    "ShipmentFailed": "ship_failed",
}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS order_view (
    order_id TEXT PRIMARY KEY, state TEXT, version INTEGER NOT NULL DEFAULT 0, customer TEXT,
    amount_cents INTEGER, reason TEXT,
    {", ".join(f"{flag} INTEGER NOT NULL DEFAULT 0" for flag in FLAGS.values())},
    updated_at REAL);
CREATE TABLE IF NOT EXISTS applied (event_id TEXT PRIMARY KEY, lag_ms INTEGER)
"""


class View:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lags: deque[tuple[float, float]] = deque(maxlen=5000)  # (applied at, lag ms)
        self._lock = threading.Lock()

    def apply(self, e: schemas.Envelope) -> None:
        now = time.time()
        with self.db.transaction() as tx:
            if tx.one("SELECT 1 FROM applied WHERE event_id = ?", (e.id,)):
                return
            lag_ms = max(0, int(now * 1000) - e.at)
            tx.execute("INSERT INTO applied VALUES (?, ?)", (e.id, lag_ms))
            tx.execute(
                "INSERT OR IGNORE INTO order_view (order_id, updated_at) VALUES (?, ?)",
                (e.order_id, now),
            )
            if e.type == "OrderPlaced":
                tx.execute(
                    "UPDATE order_view SET customer = ?, amount_cents = ? WHERE order_id = ?",
                    (e.data["customer"], e.data["amount_cents"], e.order_id),
                )
            elif e.type == "OrderStatusChanged":
                tx.execute(
                    "UPDATE order_view SET state = ?, version = ?, reason = ?, updated_at = ? "
                    "WHERE order_id = ? AND version < ?",
                    (
                        e.data["state"],
                        e.data["version"],
                        e.data.get("reason", ""),
                        now,
                        e.order_id,
                        e.data["version"],
                    ),
                )
            elif e.type in FLAGS and not e.data.get("noop"):
                flag = FLAGS[e.type]  # a column name from the fixed table above
                tx.execute(
                    f"UPDATE order_view SET {flag} = 1, updated_at = ? WHERE order_id = ?",
                    (now, e.order_id),
                )
        with self._lock:
            self._lags.append((now, lag_ms))

    def route(self, method: str, path: str, _body: Any, _headers: Any) -> tuple[int, Any]:
        if method != "GET":
            return 405, {"error": "the view is read-only"}
        if path == "/stats":
            return 200, self.stats()
        if path == "/orders":
            return 200, [dict(r) for r in self.db.query("SELECT * FROM order_view")]
        found = re.fullmatch(r"/orders/([\w.:-]+)", path)
        if found:
            rows = self.db.query("SELECT * FROM order_view WHERE order_id = ?", (found[1],))
            return (200, dict(rows[0])) if rows else (404, {"error": "no such order (yet)"})
        return 404, {"error": f"no route {path}"}

    def stats(self) -> dict[str, Any]:
        rows = self.db.query("SELECT state, COUNT(*) FROM order_view GROUP BY state")
        by_state = {state: 0 for state in STATES} | {r[0] or "unknown": r[1] for r in rows}
        cutoff = time.time() - 30
        with self._lock:
            lags = sorted(lag for at, lag in self._lags if at >= cutoff)
        return {
            "by_state": by_state,
            "events_applied": self.db.query("SELECT COUNT(*) FROM applied")[0][0],
            "lag_ms_p95": lags[int(len(lags) * 0.95)] if lags else 0,
            "lag_ms_max": lags[-1] if lags else 0,
        }


def main() -> None:
    s = service.settings()
    view = View(Database(Path(s.workdir) / "view.db", SCHEMA))
    consumer = service.consumer(s, "order-view", retry_on=(sqlite3.OperationalError,))
    web.serve(s.http_port, view.route)
    service.ready(s, port=s.http_port)
    consumer.run(lambda msg: view.apply(msg.value()))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
