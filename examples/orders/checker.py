"""The invariants a correct run of the system holds, checked from the services' own databases,
the gateway's ledger and the dead-letter topics (read-only; nothing here trusts a service's
report of itself).

- I1 every accepted order reaches COMPLETED or CANCELLED within the bound after the last fault;
- I2 stock is conserved (initial = available + reserved + shipped), never negative, nothing is
  left reserved, and shipped = what completed orders hold;
- I3 no order is charged twice;
- I4 every cancelled order that was charged is refunded exactly once; no other order is;
- I5 the read model converges to the services' own states;
- I6 the services agree: payments with the gateway, inventory and shipping with the saga;
- I7 nothing is left in a DLQ except records that must be there, each explained;
- I8 every fault injected acted (a new process, an open breaker, a restarted broker...).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders.db import read_only
from examples.orders.saga import TERMINAL


@dataclass
class Invariant:
    id: str
    name: str
    expected: str
    observed: str
    passed: bool
    details: list[str] = field(default_factory=list)  # the first violations, for the report

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Facts:
    """What the checker needs from a run besides the databases."""

    workdir: Path
    accepted: Mapping[str, float]  # order id -> when the API accepted it (epoch s)
    last_fault_end: float  # epoch s; 0 when no fault
    bound: float  # seconds after max(accepted, last fault end) to reach a terminal state
    poison: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # rk.id -> (topic, why)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # from read_dead_letters
    faults: list[dict[str, Any]] = field(default_factory=list)  # {label, acted, evidence}
    view_converged_after: float | None = None  # seconds, from wait_converged


def _rows(path: Path, sql: str) -> list[sqlite3.Row]:
    if not path.exists():
        return []
    conn = read_only(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _verdict(id_: str, name: str, expected: str, problems: list[str], observed: str) -> Invariant:
    return Invariant(id_, name, expected, observed, not problems, problems[:10])


def orders_by_id(workdir: Path) -> dict[str, sqlite3.Row]:
    return {r["order_id"]: r for r in _rows(workdir / "orders.db", "SELECT * FROM orders")}


def check_terminal(f: Facts, orders: Mapping[str, sqlite3.Row]) -> Invariant:
    problems, late = [], []
    if not f.accepted:
        problems.append("no accepted orders: nothing was tested")
    # every order the API stored counts, also one whose client gave up before hearing 201
    created = {o: r["created_at"] for o, r in orders.items() if o not in f.accepted}
    for order_id, accepted_at in {**created, **f.accepted}.items():
        row = orders.get(order_id)
        if row is None:
            problems.append(f"{order_id}: accepted but not in orders.db")
        elif row["state"] not in TERMINAL:
            problems.append(f"{order_id}: still {row['state']} (pending {row['pending']})")
        else:
            start = max(accepted_at, f.last_fault_end)
            late.append(row["terminal_at"] - start)
            if row["terminal_at"] > start + f.bound:
                problems.append(
                    f"{order_id}: terminal {row['terminal_at'] - start:.1f} s after "
                    f"the later of its acceptance and the last fault"
                )
    states = Counter(r["state"] for r in orders.values() if r["order_id"] in f.accepted)
    worst = max(late) if late else 0.0
    return _verdict(
        "I1",
        "accepted orders end, in time",
        f"{len(f.accepted)} terminal within {f.bound:.0f} s",
        problems,
        f"{states['COMPLETED']} completed, {states['CANCELLED']} cancelled, "
        f"{len(f.accepted) - states['COMPLETED'] - states['CANCELLED']} not; slowest "
        f"{worst:.1f} s after the later of acceptance and the last fault",
    )


def check_stock(f: Facts, orders: Mapping[str, sqlite3.Row]) -> Invariant:
    stock = _rows(f.workdir / "inventory.db", "SELECT * FROM stock")
    problems = []
    shipped_by_orders: Counter[str] = Counter()
    for row in orders.values():
        if row["state"] == "COMPLETED":
            for item in json.loads(row["items"]):
                shipped_by_orders[item["sku"]] += item["qty"]
    for s in stock:
        total = s["available"] + s["reserved"] + s["shipped"]
        if total != s["initial"]:
            problems.append(
                f"{s['sku']}: initial {s['initial']} != {total} "
                f"(available {s['available']} + reserved {s['reserved']} + "
                f"shipped {s['shipped']})"
            )
        if min(s["available"], s["reserved"], s["shipped"]) < 0:
            problems.append(f"{s['sku']}: negative stock {dict(s)}")
        if s["reserved"]:
            problems.append(f"{s['sku']}: {s['reserved']} still reserved after every order ended")
        if s["shipped"] != shipped_by_orders[s["sku"]]:
            problems.append(
                f"{s['sku']}: shipped {s['shipped']}, completed orders hold "
                f"{shipped_by_orders[s['sku']]}"
            )
    if not stock:
        problems.append("inventory.db has no stock table rows")
    shipped = sum(s["shipped"] for s in stock)
    initial = sum(s["initial"] for s in stock)
    return _verdict(
        "I2",
        "stock conserved, never negative",
        "initial = available + reserved + shipped; reserved 0; shipped = completed",
        problems,
        f"{len(stock)} skus, {initial} units, {shipped} shipped, {len(problems)} discrepancies",
    )


def _gateway(f: Facts) -> tuple[Counter[str], Counter[str], int]:
    ops = _rows(f.workdir / "gateway.db", "SELECT order_id, kind, status FROM ops")
    charges = Counter(r["order_id"] for r in ops if r["kind"] == "charge" and r["status"] == 200)
    refunds = Counter(r["order_id"] for r in ops if r["kind"] == "refund" and r["status"] == 200)
    replays = len(_rows(f.workdir / "gateway.db", "SELECT * FROM replays"))
    return charges, refunds, replays


def check_no_double_charge(f: Facts) -> Invariant:
    charges, _refunds, replays = _gateway(f)
    problems = [f"{o}: charged {n} times" for o, n in charges.items() if n > 1]
    return _verdict(
        "I3",
        "no order charged twice",
        "0 orders with 2+ successful charges",
        problems,
        f"{sum(charges.values())} charges for {len(charges)} orders; "
        f"{replays} repeated calls answered from the gateway's idempotency keys",
    )


def check_refunds(f: Facts, orders: Mapping[str, sqlite3.Row]) -> Invariant:
    charges, refunds, _ = _gateway(f)
    problems = []
    for order_id, row in orders.items():
        charged, refunded = charges[order_id] > 0, refunds[order_id]
        if row["state"] == "CANCELLED" and charged and refunded != 1:
            problems.append(f"{order_id}: cancelled and charged, refunded {refunded} times")
        if row["state"] == "COMPLETED" and (not charged or refunded):
            problems.append(f"{order_id}: completed, charged={charged}, refunded {refunded}")
        if refunded and not charged:
            problems.append(f"{order_id}: refunded without a charge")
    owed = sum(1 for o, r in orders.items() if r["state"] == "CANCELLED" and charges[o])
    return _verdict(
        "I4",
        "refund exactly once iff cancelled after a charge",
        "cancelled ∧ charged ⇒ 1 refund; otherwise 0",
        problems,
        f"{owed} cancelled orders had been charged; {sum(refunds.values())} refunds",
    )


def view_differences(workdir: Path) -> list[str]:
    """Where the read model disagrees with the services' own state (empty: converged)."""
    orders = orders_by_id(workdir)
    view = {r["order_id"]: r for r in _rows(workdir / "view.db", "SELECT * FROM order_view")}
    charges, refunds, _ = _gateway(Facts(workdir, {}, 0, 0))
    shipments = {
        r["order_id"]: r["outcome"]
        for r in _rows(workdir / "shipping.db", "SELECT order_id, outcome FROM shipments")
    }
    reservations = {
        r["order_id"]: r["state"]
        for r in _rows(workdir / "inventory.db", "SELECT order_id, state FROM reservations")
    }
    declined = {
        r["order_id"]
        for r in _rows(
            workdir / "payments.db",
            "SELECT order_id FROM payments WHERE charge_status = 'declined'",
        )
    }
    out = [
        f"{order_id}: in the view, unknown to the orders service"
        for order_id in sorted(set(view) - set(orders))
    ]
    for order_id, o in orders.items():
        v = view.get(order_id)
        if v is None:
            out.append(f"{order_id}: not in the view")
            continue
        expect = {
            "state": o["state"],
            "version": o["version"],
            "charged": int(charges[order_id] > 0),
            "refunded": int(refunds[order_id] > 0),
            "declined": int(order_id in declined),
            "shipped": int(shipments.get(order_id) == "OrderShipped"),
            "ship_failed": int(shipments.get(order_id) == "ShipmentFailed"),
            "released": int(reservations.get(order_id) == "released"),
            "committed": int(reservations.get(order_id) == "committed"),
            "rejected": int(reservations.get(order_id) == "rejected"),
            "customer": o["customer"],
            "amount_cents": o["amount_cents"],
        }
        wrong = {k: (v[k], want) for k, want in expect.items() if v[k] != want}
        if wrong:
            out.append(
                f"{order_id}: "
                + ", ".join(f"{k} {got!r} != {want!r}" for k, (got, want) in wrong.items())
            )
    return out


def wait_converged(
    workdir: Path, timeout: float, sleep: Callable[[float], None] = time.sleep
) -> tuple[float | None, list[str]]:
    """Seconds until the view agreed with the services (None if it did not in ``timeout``)."""
    start = time.monotonic()
    while True:
        diff = view_differences(workdir)
        if not diff:
            return time.monotonic() - start, []
        if time.monotonic() - start >= timeout:
            return None, diff
        sleep(0.5)


def check_view(f: Facts) -> Invariant:
    diff = view_differences(f.workdir)
    took = (
        f"converged {f.view_converged_after:.1f} s after the last order ended"
        if f.view_converged_after is not None
        else "did not converge"
    )
    return _verdict(
        "I5",
        "read model converges",
        "view = orders, gateway, shipping",
        diff,
        f"{took}; {len(diff)} orders differ",
    )


def check_agreement(f: Facts, orders: Mapping[str, sqlite3.Row]) -> Invariant:
    charges, _refunds, _ = _gateway(f)
    payments = {
        r["order_id"]: r for r in _rows(f.workdir / "payments.db", "SELECT * FROM payments")
    }
    reservations = {
        r["order_id"]: r["state"]
        for r in _rows(f.workdir / "inventory.db", "SELECT order_id, state FROM reservations")
    }
    shipments = {
        r["order_id"]: r["outcome"]
        for r in _rows(f.workdir / "shipping.db", "SELECT order_id, outcome FROM shipments")
    }
    problems = []
    for order_id in set(charges) | {
        o for o, p in payments.items() if p["charge_status"] == "charged"
    }:
        if (payments.get(order_id) or {"charge_status": None})["charge_status"] != "charged":
            problems.append(
                f"{order_id}: gateway charged {charges[order_id]}x, payments says "
                f"{payments.get(order_id) and payments[order_id]['charge_status']}"
            )
    for order_id, o in orders.items():
        want_res = {"COMPLETED": {"committed"}, "CANCELLED": {"released", "rejected"}}.get(
            o["state"]
        )
        if want_res and reservations.get(order_id) not in want_res:
            problems.append(f"{order_id}: {o['state']}, reservation {reservations.get(order_id)}")
        if o["state"] == "COMPLETED" and shipments.get(order_id) != "OrderShipped":
            problems.append(f"{order_id}: completed, shipping ledger {shipments.get(order_id)}")
        if o["reason"] == "shipping_failed" and shipments.get(order_id) != "ShipmentFailed":
            problems.append(f"{order_id}: shipping failed, ledger {shipments.get(order_id)}")
    return _verdict(
        "I6",
        "services agree",
        "payments = gateway; reservations and shipments match each order's end",
        problems,
        f"{len(payments)} payments, {len(reservations)} reservations, "
        f"{len(shipments)} shipments compared; {len(problems)} mismatches",
    )


def groups_reading(topic: str) -> list[str]:
    return [g for g, topics in c.GROUPS.items() if topic in topics]


def expected_dead_letters(poison: Mapping[str, tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``{(dlq topic, rk.id): why}``: each poison record, in the DLQ of every group reading it."""
    from resilient_kafka import DeadLetterPolicy

    return {
        (DeadLetterPolicy().topic(topic, group), record_id): f"{why} ({group})"
        for record_id, (topic, why) in poison.items()
        for group in groups_reading(topic)
    }


def read_dead_letters(config: Mapping[str, Any], topics: Iterable[str]) -> list[dict[str, Any]]:
    """Every record of the DLQs, decoded; one per (topic, rk.id): a read_committed reader on
    Tansu also sees copies from aborted transactions (docs/testing.md)."""
    from resilient_kafka import dlq

    found: dict[tuple[str, str], dict[str, Any]] = {}
    for topic in topics:
        try:
            letters = dlq.read({**config, "log_level": 0}, topic)
        except dlq.DLQError:  # a DLQ topic nobody created yet holds nothing
            continue
        for letter in letters:
            record_id = dict(letter.headers).get("rk.id", b"").decode(errors="replace")
            found.setdefault(
                (topic, record_id),
                {
                    "topic": topic,
                    "rk_id": record_id,
                    "reason": letter.reason,
                    "original_topic": letter.original_topic,
                    "group": letter.consumer_group,
                    "exception": letter.exception_message,
                    "offset": letter.offset,
                },
            )
    return list(found.values())


def check_dead_letters(f: Facts) -> Invariant:
    expected = expected_dead_letters(f.poison)
    found = {(d["topic"], d["rk_id"]): d for d in f.dead_letters}
    problems = []
    for key, d in found.items():
        if key not in expected:
            problems.append(
                f"unexplained: {d['topic']} rk.id={d['rk_id']} reason={d['reason']}"
                f" {d['exception']}"
            )
        elif d["reason"] != "deserialization":
            problems.append(f"{key[1]} in {key[0]} with reason {d['reason']}, not deserialization")
    for key, why in expected.items():
        if key not in found:
            problems.append(f"missing: {key[1]} ({why}) not in {key[0]}")
    return _verdict(
        "I7",
        "DLQs hold only explained records",
        f"{len(expected)} poison records, each in its group's DLQ",
        problems,
        f"{len(found)} found in {len({k[0] for k in found})} DLQs; "
        f"{sum(1 for k in found if k in expected)} explained",
    )


def check_faults(f: Facts) -> Invariant:
    problems = [f"{x['label']}: did not act ({x['evidence']})" for x in f.faults if not x["acted"]]
    return _verdict(
        "I8",
        "every fault acted",
        f"{len(f.faults)} faults with evidence",
        problems,
        "; ".join(f"{x['label']}: {x['evidence']}" for x in f.faults) or "no faults",
    )


def check(f: Facts) -> list[Invariant]:
    orders = orders_by_id(f.workdir)
    return [
        check_terminal(f, orders),
        check_stock(f, orders),
        check_no_double_charge(f),
        check_refunds(f, orders),
        check_view(f),
        check_agreement(f, orders),
        check_dead_letters(f),
        check_faults(f),
    ]


def table(invariants: list[Invariant]) -> str:
    lines = ["| invariant | expected | observed | result |", "|---|---|---|---|"]
    for inv in invariants:
        lines.append(
            f"| {inv.id} {inv.name} | {inv.expected} | {inv.observed} | "
            f"{'PASS' if inv.passed else 'FAIL'} |"
        )
    return "\n".join(lines)
