"""examples/orders: the saga, schemas and services' logic without a broker, then the whole
system under the short chaos plan on the embedded broker, and the invariant checker shown to
catch each broken invariant on copies of that run's databases."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.serialization import MessageField, SerializationContext

from examples.orders import chaos, checker, dashboard, saga, schemas, web
from examples.orders import config as c
from examples.orders.db import Database
from examples.orders.gateway import SCHEMA as GATEWAY_SCHEMA
from examples.orders.gateway import CardDeclined, Gateway, GatewayClient, GatewayUnavailable
from examples.orders.services.inventory import SCHEMA as INVENTORY_SCHEMA
from examples.orders.services.inventory import Inventory, SagaContractBroken
from examples.orders.services.orders import SCHEMA as ORDERS_SCHEMA
from examples.orders.services.orders import Orders
from examples.orders.services.payments import SCHEMA as PAYMENTS_SCHEMA
from examples.orders.services.payments import Payments
from resilient_kafka import CircuitBreaker, CircuitBreakerError

PROFILE = c.PROFILES["short"]


def reply(type_: str, order_id: str = "o-1", step: str | None = None) -> schemas.Envelope:
    step = step or saga.REPLIES[type_]
    data = {
        "StockRejected": {"reason": "insufficient stock: fig"},
        "StockReleased": {"noop": False},
        "PaymentCharged": {"amount_cents": 240, "gateway_ref": "ch_1"},
        "PaymentDeclined": {"reason": "card declined"},
        "PaymentRefunded": {"amount_cents": 240, "noop": False},
        "OrderShipped": {"tracking": "TRK1"},
        "ShipmentFailed": {"reason": "no"},
    }.get(type_, {})
    cmd = schemas.Envelope("", 1, "", order_id, f"{order_id}:{step}", 0, {})  # its ids
    return schemas.parse(schemas.reply(cmd, type_, data))


def new_order(**changes: Any) -> saga.Order:
    from dataclasses import replace

    order = saga.Order("o-1", "ann", (("apple", 2),), 240, "4000000000000077")
    return replace(order, **changes)


# -- the saga ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "pending", "event", "to", "sends", "reason"),
    [
        ("RESERVING", {"reserve"}, "StockReserved", "CHARGING", ["ChargePayment"], ""),
        ("RESERVING", {"reserve"}, "StockRejected", "CANCELLED", [], "out_of_stock"),
        ("CHARGING", {"charge"}, "PaymentCharged", "SHIPPING", ["ShipOrder"], ""),
        (
            "CHARGING",
            {"charge"},
            "PaymentDeclined",
            "COMPENSATING",
            ["ReleaseStock"],
            "payment_declined",
        ),
        ("SHIPPING", {"ship"}, "OrderShipped", "FINALIZING", ["CommitStock"], ""),
        (
            "SHIPPING",
            {"ship"},
            "ShipmentFailed",
            "COMPENSATING",
            ["RefundPayment", "ReleaseStock"],
            "shipping_failed",
        ),
        ("FINALIZING", {"commit"}, "StockCommitted", "COMPLETED", [], ""),
    ],
)
def test_saga_moves_on_each_reply_and_sends_the_next_step(
    state: str, pending: set[str], event: str, to: str, sends: list[str], reason: str
) -> None:
    order = new_order(state=state, pending=frozenset(pending), version=3, attempt=2)
    out = saga.transition(order, reply(event))
    assert (out.order.state, out.changed, out.ignored) == (to, True, "")
    assert out.order.version == 4 and out.order.attempt == 0
    assert [cmd.type for cmd in out.commands] == sends
    assert out.order.reason == reason
    for cmd in out.commands:  # a first send: the record id is the command id
        assert cmd.record_id == cmd.command_id == f"o-1:{cmd.step}"
        assert cmd.topic == saga.COMMANDS[cmd.step][1]
    if event == "PaymentCharged":
        assert out.order.charged


def test_compensation_ends_only_when_every_compensating_step_answered() -> None:
    order = new_order(
        state="COMPENSATING",
        pending=frozenset({"refund", "release"}),
        version=5,
        reason="shipping_failed",
        charged=True,
    )
    half = saga.transition(order, reply("StockReleased"))
    assert (half.order.state, half.changed, half.commands) == ("COMPENSATING", False, [])
    assert half.order.pending == {"refund"}
    done = saga.transition(half.order, reply("PaymentRefunded"))
    assert (done.order.state, done.order.version, done.order.reason) == (
        "CANCELLED",
        6,
        "shipping_failed",
    )
    assert done.order.pending == frozenset()


@pytest.mark.parametrize(
    ("state", "pending", "event"),
    [
        ("CHARGING", {"charge"}, "StockReserved"),  # a duplicate of the previous step's reply
        ("COMPLETED", set(), "StockCommitted"),  # after the end
        ("SHIPPING", {"ship"}, "PaymentDeclined"),  # a late reply to a step already answered
        ("COMPENSATING", {"refund"}, "StockReleased"),  # a second copy of a compensation reply
    ],
)
def test_saga_ignores_replies_to_steps_it_does_not_await(
    state: str, pending: set[str], event: str
) -> None:
    order = new_order(state=state, pending=frozenset(pending))
    out = saga.transition(order, reply(event))
    assert out.order == order and out.commands == [] and not out.changed
    assert "not awaited" in out.ignored


def test_a_resend_keeps_the_command_id_and_gets_a_new_record_id() -> None:
    order = new_order(state="COMPENSATING", pending=frozenset({"refund", "release"}))
    again, commands = saga.resend(order)
    assert again.attempt == 1
    assert [(x.command_id, x.record_id) for x in commands] == [
        ("o-1:refund", "o-1:refund#1"),
        ("o-1:release", "o-1:release#1"),
    ]
    _, commands = saga.resend(again)
    assert commands[0].record_id == "o-1:refund#2"


def test_the_step_timeout_doubles_per_attempt_up_to_its_cap_spread_per_order() -> None:
    for order_id in ("o-1", "o-2", "o-3"):
        waits = [saga.next_deadline(100.0, n, PROFILE, order_id) - 100.0 for n in range(5)]
        for wait, base in zip(waits, [6.0, 12.0, 20.0, 20.0, 20.0], strict=True):
            assert base <= wait <= base * 1.25, (order_id, waits)
    spread = {saga.next_deadline(0.0, 0, PROFILE, f"o-{n}") for n in range(20)}
    assert len(spread) > 10  # stalled orders do not all ask again at the same moment
    assert saga.next_deadline(0.0, 1, PROFILE, "o-1") == saga.next_deadline(0.0, 1, PROFILE, "o-1")


# -- schemas ----------------------------------------------------------------------------------


def ctx(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


def test_every_schema_round_trips_and_exports_a_json_schema() -> None:
    assert len(schemas.SCHEMAS) == 18
    for (type_, v), schema in schemas.SCHEMAS.items():
        doc = schemas.json_schema(type_, v)
        assert doc["properties"]["type"] == {"const": type_}
        assert set(doc["properties"]["data"]["properties"]) == set(schema.fields)
    raw = schemas.encode(
        "PaymentCharged",
        id="x",
        order_id="o-1",
        command_id="o-1:charge",
        data={"amount_cents": 5, "gateway_ref": "r"},
    )
    env = schemas.deserialize(raw, ctx(c.PAYMENT_EVENTS))
    assert (env.type, env.v, env.step, env.data["amount_cents"]) == (
        "PaymentCharged",
        1,
        "charge",
        5,
    )


def test_a_retry_copy_is_checked_against_its_source_topic() -> None:
    raw = schemas.encode("ReleaseStock", id="x", order_id="o-1", data={})
    assert schemas.deserialize(raw, ctx("orders.inventory-commands.inventory.retry.2")).type == (
        "ReleaseStock"
    )
    with pytest.raises(schemas.SchemaError, match=r"does not belong on orders\.payment-commands"):
        schemas.deserialize(raw, ctx("orders.payment-commands.payments.retry.1"))


def test_an_old_version_is_upcast_to_the_newest() -> None:
    body = {
        "type": "ShipOrder",
        "v": 1,
        "id": "x",
        "order_id": "o-1",
        "command_id": "o-1:ship",
        "at": 1,
        "data": {"items": [{"sku": "fig", "qty": 1}]},
    }
    env = schemas.parse(json.dumps(body).encode(), c.SHIPPING_COMMANDS)
    assert (env.v, env.data["address"]) == (2, "on file")


@pytest.mark.parametrize(
    ("raw", "error", "match"),
    [
        (None, schemas.SchemaError, "tombstone"),
        (b"\xff\xfe", schemas.SchemaError, "not a JSON envelope"),
        (b"[1]", schemas.SchemaError, "must be a JSON object"),
        (
            b'{"type": "ShipOrder", "v": 3, "id": "x", "order_id": "o", "at": 1, "data": {}}',
            schemas.UnknownSchemaVersion,
            r"unknown schema version ShipOrder v3 \(this consumer "
            r"knows v1, v2\)",
        ),
        (
            b'{"type": "Nope", "v": 1, "id": "x", "order_id": "o", "at": 1, "data": {}}',
            schemas.UnknownSchemaVersion,
            "knows no version of it",
        ),
        (
            b'{"type": "ShipOrder", "v": true, "id": "x", "order_id": "o", "at": 1, "data": {}}',
            schemas.SchemaError,
            "'v' missing or not int",
        ),
        (
            b'{"type": "ShipOrder", "v": 2, "id": "x", "order_id": "o", "at": 1, "data": '
            b'{"items": [{"sku": "a", "qty": 0}], "address": "x"}}',
            schemas.SchemaError,
            "'items' is not a valid items",
        ),
        (
            b'{"type": "ShipOrder", "v": 2, "id": "x", "order_id": "o", "at": 1, "data": '
            b'{"items": [{"sku": "a", "qty": 1}]}}',
            schemas.SchemaError,
            "missing field 'address'",
        ),
    ],
)
def test_a_record_no_schema_matches_is_refused_with_the_reason(
    raw: bytes | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        schemas.parse(raw)


def test_fields_a_consumer_does_not_know_are_ignored() -> None:
    """A producer that added an optional field, deployed before its consumers, is still read."""
    raw = (
        b'{"type": "PaymentDeclined", "v": 1, "id": "x", "order_id": "o", "at": 1, '
        b'"data": {"reason": "no", "decline_code": "do_not_honor"}}'
    )
    assert schemas.parse(raw, c.PAYMENT_EVENTS).data["reason"] == "no"


def test_a_producer_cannot_write_what_no_schema_allows() -> None:
    with pytest.raises(schemas.SchemaError, match="missing field 'card'"):
        schemas.encode("ChargePayment", id="x", order_id="o", data={"amount_cents": 1})
    with pytest.raises(schemas.SchemaError, match="no schema for type"):
        schemas.encode("Refund", id="x", order_id="o", data={})


# -- inventory, payments and the gateway, without Kafka ---------------------------------------


def command(type_: str, order_id: str, step: str, **data: Any) -> schemas.Envelope:
    raw = schemas.encode(
        type_,
        id=f"{order_id}:{step}",
        order_id=order_id,
        command_id=f"{order_id}:{step}",
        data=data,
    )
    return schemas.parse(raw)


def stock(inv: Inventory) -> dict[str, tuple[int, int, int]]:
    return {
        r["sku"]: (r["available"], r["reserved"], r["shipped"])
        for r in inv.db.query("SELECT * FROM stock")
    }


def test_inventory_reserves_all_or_nothing_and_answers_a_repeat_from_its_table(
    tmp_path: Path,
) -> None:
    inv = Inventory(Database(tmp_path / "inventory.db", INVENTORY_SCHEMA))
    inv.seed({"apple": 5, "fig": 1})
    too_much = command(
        "ReserveStock",
        "o-1",
        "reserve",
        items=[{"sku": "apple", "qty": 2}, {"sku": "fig", "qty": 2}],
    )
    first = inv.reply_for(too_much)
    assert schemas.parse(first).data == {"reason": "insufficient stock: fig"}
    assert stock(inv) == {"apple": (5, 0, 0), "fig": (1, 0, 0)}  # nothing half-reserved
    ok = command("ReserveStock", "o-2", "reserve", items=[{"sku": "apple", "qty": 2}])
    reserved = inv.reply_for(ok)
    assert schemas.parse(reserved).type == "StockReserved"
    assert inv.reply_for(ok) == reserved  # byte for byte: a replay re-emits the same record
    assert stock(inv)["apple"] == (3, 2, 0)
    inv.reply_for(command("CommitStock", "o-2", "commit"))
    assert stock(inv)["apple"] == (3, 0, 2)
    with pytest.raises(SagaContractBroken, match="whose stock has shipped"):
        inv.reply_for(command("ReleaseStock", "o-2", "release"))


def test_inventory_release_returns_stock_and_refuses_a_late_reservation(tmp_path: Path) -> None:
    inv = Inventory(Database(tmp_path / "inventory.db", INVENTORY_SCHEMA))
    inv.seed({"plum": 4})
    inv.reply_for(command("ReserveStock", "o-1", "reserve", items=[{"sku": "plum", "qty": 3}]))
    released = schemas.parse(inv.reply_for(command("ReleaseStock", "o-1", "release")))
    assert (released.type, released.data) == ("StockReleased", {"noop": False})
    assert stock(inv)["plum"] == (4, 0, 0)
    # a release that overtook its reservation leaves a tombstone: the reservation is refused
    noop = schemas.parse(inv.reply_for(command("ReleaseStock", "o-9", "release")))
    assert noop.data == {"noop": True}
    late = inv.reply_for(
        command("ReserveStock", "o-9", "reserve", items=[{"sku": "plum", "qty": 1}])
    )
    assert schemas.parse(late).data == {"reason": "order closed"}
    with pytest.raises(SagaContractBroken, match="commit of o-9"):
        inv.reply_for(command("CommitStock", "o-9", "commit"))
    assert stock(inv)["plum"] == (4, 0, 0)


@pytest.fixture
def gateway(tmp_path: Path) -> Any:
    from dataclasses import replace

    profile = replace(PROFILE, gateway_error_pct=0, gateway_latency_ms=(0, 1), decline_pct=0)
    gw = Gateway(Database(tmp_path / "gateway.db", GATEWAY_SCHEMA), profile, seed=1)
    server = web.serve(0, gw.route)
    yield gw, GatewayClient(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def test_the_gateway_charges_once_per_idempotency_key_and_declines_by_card(gateway: Any) -> None:
    gw, client = gateway
    first = client.charge("o-1:charge", "o-1", 500, "4000000000000077")
    assert client.charge("o-1:charge", "o-1", 500, "4000000000000077") == first
    with pytest.raises(CardDeclined, match="card declined"):
        client.charge("o-2:charge", "o-2", 500, "4000000000000002")
    ops = gw.db.query("SELECT order_id, kind, status FROM ops ORDER BY order_id")
    assert [tuple(r) for r in ops] == [("o-1", "charge", 200), ("o-2", "charge", 402)]
    assert len(gw.db.query("SELECT * FROM replays")) == 1


def test_the_gateway_client_turns_5xx_and_refused_connections_into_unavailable(
    gateway: Any,
) -> None:
    gw, client = gateway
    gw.profile = __import__("dataclasses").replace(gw.profile, gateway_error_pct=100)
    with pytest.raises(GatewayUnavailable, match="HTTP 503"):
        client.charge("o-1:charge", "o-1", 500, "4000000000000077")
    with pytest.raises(GatewayUnavailable, match=r"POST http://127\.0\.0\.1:1/charges"):
        GatewayClient("http://127.0.0.1:1").charge("k", "o", 1, "4000000000000077")


class FakeGateway:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def charge(self, key: str, order_id: str, amount: int, card: str) -> str:
        self.calls.append(("charge", key))
        if self.fail:
            raise self.fail
        return f"ch_{order_id}"

    def refund(self, key: str, order_id: str, amount: int) -> str:
        self.calls.append(("refund", key))
        return f"re_{order_id}"


def test_payments_declines_without_tripping_the_breaker_and_reuses_stored_replies(
    tmp_path: Path,
) -> None:
    breaker = CircuitBreaker("gw", fail_max=1, exclude=[CardDeclined])
    fake = FakeGateway(CardDeclined("card declined"))
    pay = Payments(Database(tmp_path / "payments.db", PAYMENTS_SCHEMA), fake, breaker)  # type: ignore[arg-type]
    charge = command("ChargePayment", "o-1", "charge", amount_cents=9, card="4000000000000002")
    declined = pay.reply_for(charge)
    assert schemas.parse(declined).type == "PaymentDeclined"
    assert breaker.current_state == "closed"
    assert pay.reply_for(charge) == declined and len(fake.calls) == 1  # from the table
    refund = schemas.parse(pay.reply_for(command("RefundPayment", "o-1", "refund", amount_cents=9)))
    assert refund.data == {"amount_cents": 0, "noop": True} and len(fake.calls) == 1


def test_payments_lets_an_unavailable_gateway_fail_the_record_and_counts_it(
    tmp_path: Path,
) -> None:
    breaker = CircuitBreaker("gw", fail_max=1, exclude=[CardDeclined])
    pay = Payments(
        Database(tmp_path / "payments.db", PAYMENTS_SCHEMA),
        FakeGateway(GatewayUnavailable("503")),
        breaker,
    )  # type: ignore[arg-type]
    charge = command("ChargePayment", "o-1", "charge", amount_cents=9, card="4000000000000077")
    with pytest.raises(CircuitBreakerError):  # the failure that trips it says so
        pay.reply_for(charge)
    assert breaker.current_state == "open"
    assert pay.db.query("SELECT COUNT(*) FROM commands")[0][0] == 0  # nothing stored: retried


def test_the_view_ends_the_same_whatever_order_the_events_arrive_in(tmp_path: Path) -> None:
    import itertools

    from examples.orders.services.view import SCHEMA as VIEW_SCHEMA
    from examples.orders.services.view import View

    def event(type_: str, id_: str, data: dict[str, Any]) -> schemas.Envelope:
        return schemas.parse(schemas.encode(type_, id=id_, order_id="o-1", data=data))

    events = [
        event(
            "OrderPlaced",
            "p",
            {"customer": "ann", "items": [{"sku": "fig", "qty": 1}], "amount_cents": 300},
        ),
        event("OrderStatusChanged", "v2", {"state": "CHARGING", "version": 2}),
        event("StockReserved", "r", {}),
        event("PaymentCharged", "c", {"amount_cents": 300, "gateway_ref": "x"}),
        event("OrderStatusChanged", "v3", {"state": "SHIPPING", "version": 3}),
    ]
    finals = set()
    for n, order in enumerate(itertools.permutations(events)):
        view = View(Database(tmp_path / f"view-{n}.db", VIEW_SCHEMA))
        for e in [*order, order[0]]:  # and a duplicate
            view.apply(e)
        row = dict(view.db.query("SELECT * FROM order_view")[0])
        finals.add(tuple((k, v) for k, v in sorted(row.items()) if k != "updated_at"))
    assert len(finals) == 1
    final = dict(finals.pop())
    assert (final["state"], final["version"], final["charged"], final["customer"]) == (
        "SHIPPING",
        3,
        1,
        "ann",
    )


# -- the orders API and saga, without Kafka ---------------------------------------------------


@pytest.fixture
def orders(tmp_path: Path) -> Orders:
    return Orders(Database(tmp_path / "orders.db", ORDERS_SCHEMA), None, PROFILE)


GOOD = {"customer": "ann", "items": [{"sku": "apple", "qty": 2}], "card": "4000000000000077"}


@pytest.mark.parametrize(
    ("key", "body", "match"),
    [
        ("", GOOD, "Idempotency-Key header"),
        ("k 1", GOOD, "Idempotency-Key header"),
        ("k1", [], "JSON object"),
        ("k1", {**GOOD, "customer": ""}, "customer"),
        ("k1", {**GOOD, "card": "4000-0000"}, "card: 12 to 19 digits"),
        ("k1", {**GOOD, "items": []}, "items: a non-empty list"),
        ("k1", {**GOOD, "items": [{"sku": "kiwi", "qty": 1}]}, "unknown sku kiwi"),
    ],
)
def test_the_api_refuses_a_bad_order_with_the_reason_and_stores_nothing(
    orders: Orders, key: str, body: Any, match: str
) -> None:
    status, answer = orders.route("POST", "/orders", body, {"Idempotency-Key": key})
    assert status == 400 and match in answer["error"]
    assert orders.db.query("SELECT COUNT(*) FROM outbox")[0][0] == 0


def test_the_api_takes_an_order_once_per_key_and_writes_its_records_in_the_same_commit(
    orders: Orders,
) -> None:
    status, first = orders.route("POST", "/orders", GOOD, {"idempotency-key": "k1"})
    assert status == 201 and first["state"] == "RESERVING" and first["amount_cents"] == 240
    assert first["card"] == "•••• 0077"
    status, again = orders.route("POST", "/orders", GOOD, {"Idempotency-Key": "k1"})
    assert status == 200 and again["order_id"] == first["order_id"]
    rows = orders.db.query("SELECT topic, record_id FROM outbox ORDER BY seq")
    assert [tuple(r) for r in rows] == [
        (c.ORDER_EVENTS, "o-k1:placed"),
        (c.ORDER_EVENTS, "o-k1:v1"),
        (c.INVENTORY_COMMANDS, "o-k1:reserve"),
    ]
    assert orders.route("GET", "/orders/o-k1", None, {})[1]["pending"] == ["reserve"]
    assert orders.route("GET", "/orders/nope", None, {})[0] == 404
    other = {**GOOD, "items": [{"sku": "fig", "qty": 1}]}
    status, answer = orders.route("POST", "/orders", other, {"Idempotency-Key": "k1"})
    assert status == 422 and "used for another request" in answer["error"]
    assert orders.db.query("SELECT COUNT(*) FROM orders")[0][0] == 1


def test_a_reply_applies_once_and_a_missing_reply_is_asked_for_again(orders: Orders) -> None:
    orders.route("POST", "/orders", GOOD, {"Idempotency-Key": "k1"})
    reserved = reply("StockReserved", "o-k1")
    orders.on_reply(reserved)
    orders.on_reply(reserved)  # a redelivery: the inbox row stops it
    assert orders.get("o-k1")["state"] == "CHARGING"  # type: ignore[index]
    assert orders.db.query("SELECT COUNT(*) FROM outbox WHERE record_id = 'o-k1:charge'")[0][0] == 1
    with orders.db.transaction() as tx:
        tx.execute("UPDATE orders SET deadline = 0")
    assert orders.resend_due() == 1
    assert (
        orders.db.query("SELECT COUNT(*) FROM outbox WHERE record_id = 'o-k1:charge#1'")[0][0] == 1
    )
    assert orders.stats()["resends"] == 1


# -- plans and the live view ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"fault": [{"at": 1, "kind": "explode", "duration": 1}]}, "kind 'explode' is not one"),
        ({"fault": [{"at": 1, "kind": "kill", "duration": 1}]}, "kill takes a target"),
        ({"fault": [{"at": 1, "kind": "kill", "target": "db", "duration": 1}]}, "kill takes"),
        (
            {"fault": [{"at": 1, "kind": "latency", "target": "orders", "duration": 1}]},
            "latency takes no target",
        ),
        ({"fault": [{"at": 1, "kind": "gateway-down", "duration": 0}]}, "duration > 0"),
        ({"fault": [{"at": 1, "kind": "broker-kill", "duration": 2}]}, "needs durable = true"),
        (
            {
                "fault": [
                    {"at": 1, "kind": "gateway-down", "duration": 5},
                    {"at": 3, "kind": "kill", "target": "view", "duration": 1},
                ]
            },
            "starts before gateway-down ends",
        ),
        ({"profile": "huge"}, "profile 'huge' is not one of"),
        ({"orders": 0}, "must be positive"),
        ({"speed": 3}, "unknown settings"),
    ],
)
def test_a_plan_that_cannot_run_as_written_is_refused(plan: dict[str, Any], match: str) -> None:
    with pytest.raises(chaos.PlanError, match=match):
        chaos.parse_plan(plan, "t")


def test_the_built_in_plans_parse_and_the_full_one_has_every_fault_the_issue_names() -> None:
    assert chaos.load_plan("short").faults
    full = chaos.load_plan("full")
    assert {f.target for f in full.faults if f.kind == "kill"} == set(c.SERVICES)
    assert {f.kind for f in full.faults} == set(chaos.KINDS) and full.durable
    with pytest.raises(chaos.PlanError, match="built in: full, short"):
        chaos.load_plan("nope")


def test_a_chaos_run_starts_from_an_empty_workdir_but_keeps_other_files(tmp_path: Path) -> None:
    for name in (
        "orders.db",
        "orders.db-wal",
        "view.log",
        "report.md",
        "timeline.png",
        "notes.txt",
    ):
        (tmp_path / name).write_text("x")
    removed = chaos.clear_previous_run(tmp_path)
    assert len(removed) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_live_view_renders_a_sample() -> None:
    from rich.console import Console

    sample = chaos.Sample(
        t=3.0,
        accepted=10,
        by_state={"COMPLETED": 6, "CHARGING": 4},
        view_by_state={"COMPLETED": 5, "CHARGING": 5},
        steps_in_flight={"charge": 4},
        resends=2,
        outbox_backlog=1,
        breaker="open",
        paused_for_breaker=2,
        view_lag_ms_p95=40,
        up={"orders": True, "payments": False},
        dead_letters={"payments": 1, "order-view": 2, "inventory": 0},
    )
    console = Console(width=150, record=True)
    console.print(dashboard.render(sample, "hello", "up"))
    text = console.export_text()
    for expected in (
        "COMPLETED",
        "re-sends",
        "open",
        "view behind by   1 orders",
        "down",
        "3 (order-view 2, payments 1)",
    ):
        assert expected in text, text


# -- the whole system under chaos (embedded broker) -------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> chaos.Result:
    import os

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("the chaos run needs the embedded broker behind its own proxies")
    return chaos.run(chaos.load_plan("short"), tmp_path_factory.mktemp("orders-chaos"))


@pytest.mark.timeout(240)
def test_the_short_chaos_run_holds_every_invariant(short_run: chaos.Result) -> None:
    failed = {i.id: (i.observed, i.details) for i in short_run.invariants if not i.passed}
    assert not failed, failed
    assert [i.id for i in short_run.invariants] == [f"I{n}" for n in range(1, 9)]
    assert short_run.accepted == 60 and not short_run.self_exits
    assert {f["label"] for f in short_run.faults} == {
        "gateway-down",
        "kill payments",
        "kill orders",
        "latency",
    }
    assert len(short_run.dead_letters) == 4  # the four poison records, one DLQ each
    report = (short_run.workdir / "report.md").read_text()
    assert "| I7 DLQs hold only explained records |" in report and "PASS" in report
    assert (short_run.workdir / "timeline.png").stat().st_size > 10_000
    data = json.loads((short_run.workdir / "report.json").read_text())
    assert data["passed"] and len(data["timeline"]) > 20


def _corrupt(run: chaos.Result, tmp_path: Path, db: str, sql: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run.workdir, copy, ignore=shutil.ignore_patterns("*.log", "*.png"))
    conn = sqlite3.connect(copy / db)
    conn.execute(sql)
    conn.commit()
    conn.close()
    return copy


def _facts(run: chaos.Result, workdir: Path, **changes: Any) -> checker.Facts:
    accepted = {r["order_id"]: r["created_at"] for r in checker.orders_by_id(workdir).values()}
    facts = checker.Facts(
        workdir,
        accepted,
        0.0,
        1e9,
        run.poison,
        list(run.dead_letters),
        [dict(f) for f in run.faults],
        0.0,
    )
    for name, value in changes.items():
        setattr(facts, name, value)
    return facts


ONE = "(SELECT order_id FROM orders WHERE state = 'COMPLETED' LIMIT 1)"


@pytest.mark.parametrize(
    ("broken", "db", "sql"),
    [
        ("I1", "orders.db", f"UPDATE orders SET state = 'SHIPPING' WHERE order_id = {ONE}"),
        ("I2", "inventory.db", "UPDATE stock SET available = available + 1 WHERE sku = 'fig'"),
        (
            "I3",
            "gateway.db",
            "INSERT INTO ops SELECT idempotency_key || '#2', order_id, kind, "
            "status, body, amount_cents, at FROM ops WHERE kind = 'charge' "
            "AND status = 200 LIMIT 1",
        ),
        ("I4", "gateway.db", "DELETE FROM ops WHERE kind = 'refund'"),
        ("I5", "view.db", "UPDATE order_view SET state = 'CHARGING' WHERE rowid = 1"),
        ("I6", "payments.db", "UPDATE payments SET charge_status = 'declined' WHERE rowid = 1"),
    ],
)
def test_the_checker_catches_each_broken_invariant(
    short_run: chaos.Result, tmp_path: Path, broken: str, db: str, sql: str
) -> None:
    clean = checker.check(_facts(short_run, short_run.workdir))
    assert all(i.passed for i in clean), [i for i in clean if not i.passed]
    orders = checker.orders_by_id(short_run.workdir).values()
    # each mutation needs something to break: a refund (I4) and a shipped order (I1, I2)
    assert any(o["state"] == "CANCELLED" and o["charged"] for o in orders)
    assert any(o["state"] == "COMPLETED" for o in orders)
    copy = _corrupt(short_run, tmp_path, db, sql)
    results = {i.id: i for i in checker.check(_facts(short_run, copy))}
    assert not results[broken].passed and results[broken].details
    assert results["I7"].passed and results["I8"].passed


def test_the_checker_catches_an_unexplained_or_missing_dead_letter_and_a_fault_that_did_not_act(
    short_run: chaos.Result,
) -> None:
    stray = {
        "topic": "orders.payment-commands.payments.dlq",
        "rk_id": "o-1:charge",
        "reason": "retries-exhausted",
        "exception": "GatewayUnavailable",
    }
    facts = _facts(short_run, short_run.workdir, dead_letters=[*short_run.dead_letters[1:], stray])
    results = {i.id: i for i in checker.check(facts)}
    assert any(d.startswith("unexplained: orders.payment-commands") for d in results["I7"].details)
    assert any(d.startswith("missing:") for d in results["I7"].details)
    facts.faults[0]["acted"] = False
    assert not checker.check_faults(facts).passed


def test_the_orders_api_and_view_answered_over_http_during_the_run(
    short_run: chaos.Result,
) -> None:
    # the sampler read both /stats endpoints throughout; the view's lag was measured
    seen = [s for s in short_run.samples if s.by_state and s.view_by_state]
    assert len(seen) > len(short_run.samples) // 2
    last = short_run.samples[-1]  # taken after every order ended and the view converged
    ended = last.by_state.get("COMPLETED", 0) + last.by_state.get("CANCELLED", 0)
    assert ended == short_run.accepted + 1  # the load's orders and the warm-up order
    assert last.view_by_state == last.by_state and last.divergence == 0
    # poison records read by groups whose process was not killed (payments' counter restarted)
    assert last.dead_letters["inventory"] == last.dead_letters["shipping"] == 1
    assert last.dead_letters["order-view"] == 1
    assert any(s.breaker == "open" for s in short_run.samples)
    assert threading.active_count() < 50


# -- publishing: the outbox relay and a reply's own acknowledgement ----------------------------


def test_the_outbox_relay_survives_an_error_and_goes_on_publishing(tmp_path: Path) -> None:
    from examples.orders import outbox
    from examples.orders.services.orders import SCHEMA as ORDERS_SCHEMA
    from tests.helpers import wait_for

    relay = outbox.Relay(
        Database(tmp_path / "orders.db", ORDERS_SCHEMA), {"bootstrap.servers": "127.0.0.1:1"}
    )
    calls: list[int] = []

    def publish_once() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return 0

    relay._publish_once = publish_once  # type: ignore[method-assign]
    relay.start()
    try:
        wait_for(lambda: len(calls) >= 2, 10, "the relay to try again after the error")
    finally:
        relay.stop(timeout=5)


class _Reports:
    """A producer stand-in whose delivery report says ``error`` (or never comes)."""

    def __init__(self, error: Any = None, report: bool = True) -> None:
        self.error, self.report, self.pending = error, report, []

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any, on_delivery: Any) -> None:
        self.pending.append(on_delivery)

    def poll(self, timeout: float) -> int:
        while self.report and self.pending:
            self.pending.pop()(self.error, None)
        return 0


def test_a_reply_counts_as_sent_only_once_its_own_delivery_report_says_so() -> None:
    from examples.orders import service

    service.produce_acknowledged(_Reports(), "t", b"v", "o-1", "o-1:charge:reply")
    with pytest.raises(service.NotAcknowledged, match="o-1:charge:reply not delivered: boom"):
        service.produce_acknowledged(_Reports(error="boom"), "t", b"v", "o-1", "o-1:charge:reply")
    with pytest.raises(service.NotAcknowledged, match="not acknowledged within 0 s"):
        service.produce_acknowledged(_Reports(report=False), "t", b"v", "o-1", "r", timeout=0.2)
