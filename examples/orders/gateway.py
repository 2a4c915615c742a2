"""The payment gateway: an external service the system does not own, slow and failing now and
then, run as its own process behind a Toxiproxy proxy (so a chaos run can take it away).

Charges and refunds take an ``idempotency_key`` (as Stripe's API does): the same key gives the
same answer and never a second charge, even when the first answer was lost on the way back.
Its ledger (``gateway.db``) is the truth the invariant checker counts charges against.

Run: ``python -m examples.orders.gateway '<settings JSON>'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import web
from examples.orders.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (
    idempotency_key TEXT PRIMARY KEY, order_id TEXT NOT NULL, kind TEXT NOT NULL,
    status INTEGER NOT NULL, body TEXT NOT NULL, amount_cents INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replays (idempotency_key TEXT NOT NULL, at REAL NOT NULL)
"""


class CardDeclined(Exception):
    """The card was declined: a business outcome. Retrying will not help, and it says nothing
    about the gateway's health (the breaker excludes it)."""


class GatewayUnavailable(Exception):
    """The gateway did not answer, or answered 5xx: try again later (the breaker counts it)."""


def declines(card: str, decline_pct: int) -> bool:
    digest = int(hashlib.sha256(card.encode()).hexdigest(), 16)
    return card.endswith("0002") or digest % 100 < decline_pct


class Gateway:
    def __init__(self, db: Database, profile: c.Profile, seed: int) -> None:
        self.db = db
        self.profile = profile
        self.random = random.Random(seed)

    def route(self, method: str, path: str, body: Any, _headers: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/health":
            return 200, {"ok": True}
        if method != "POST" or path not in ("/charges", "/refunds"):
            return 404, {"error": f"no route {method} {path}"}
        if not isinstance(body, dict) or not isinstance(body.get("idempotency_key"), str):
            return 400, {"error": "a JSON object with an idempotency_key is required"}
        low, high = self.profile.gateway_latency_ms
        time.sleep(self.random.uniform(low, high) / 1000)
        roll = self.random.uniform(0, 100)
        if roll < self.profile.gateway_error_pct / 2:
            return 503, {"error": "gateway busy"}  # before doing anything
        status, answer = self._apply(path.strip("/")[:-1], body)
        if roll < self.profile.gateway_error_pct:
            return 503, {"error": "gateway timeout"}  # after doing it: the answer is lost
        return status, answer

    def _apply(self, kind: str, body: dict[str, Any]) -> tuple[int, Any]:
        key = body["idempotency_key"]
        with self.db.transaction() as tx:
            row = tx.one("SELECT status, body FROM ops WHERE idempotency_key = ?", (key,))
            if row is not None:
                tx.execute("INSERT INTO replays VALUES (?, ?)", (key, time.time()))
                return int(row["status"]), {**json.loads(row["body"]), "replayed": True}
            amount = int(body.get("amount_cents", 0))
            answer: dict[str, Any]
            if kind == "charge" and declines(str(body.get("card", "")), self.profile.decline_pct):
                status, answer = 402, {"error": "card declined", "decline_code": "do_not_honor"}
            else:
                ref = f"{kind[:2]}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
                status, answer = 200, {"id": ref, "status": "succeeded", "amount_cents": amount}
            tx.execute(
                "INSERT INTO ops VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    str(body.get("order_id", "")),
                    kind,
                    status,
                    json.dumps(answer),
                    amount,
                    time.time(),
                ),
            )
            return status, answer


class GatewayClient:
    """What payments calls (through the breaker)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def charge(self, key: str, order_id: str, amount_cents: int, card: str) -> str:
        body = {
            "idempotency_key": key,
            "order_id": order_id,
            "amount_cents": amount_cents,
            "card": card,
        }
        return str(self._post("/charges", body)["id"])

    def refund(self, key: str, order_id: str, amount_cents: int) -> str:
        body = {"idempotency_key": key, "order_id": order_id, "amount_cents": amount_cents}
        return str(self._post("/refunds", body)["id"])

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return web.call("POST", self.url + path, body, timeout=self.timeout)
        except web.HttpError as exc:
            if exc.status == 402:
                raise CardDeclined(str(exc)) from None
            if exc.status == 0 or exc.status >= 500:
                raise GatewayUnavailable(str(exc)) from None
            raise  # 4xx: our request is wrong; not retried


def main() -> None:
    import signal
    import threading

    from examples.orders import service

    s = service.settings()
    gateway = Gateway(Database(Path(s.workdir) / "gateway.db", SCHEMA), s.profile, s.seed)
    server = web.serve(s.http_port, gateway.route)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    service.ready(s, port=s.http_port)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
