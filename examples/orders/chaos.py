"""A chaos run of the whole system: load, poison records and a fault plan, then the invariants.

A plan (``scenarios/*.toml``) names the profile, the load and the faults, one at a time so each
is attributable. Fault kinds:

- ``kill`` (``target``): SIGKILL of one service (or the gateway); started again on the same
  files and ports after ``duration``;
- ``gateway-down``: the gateway's proxy refuses connections (the breaker should open);
- ``broker-kill``: SIGKILL of the broker (needs ``durable = true``), restarted on the same port;
- ``latency`` (``latency_ms``): every Kafka byte delayed (a Toxiproxy latency toxic).
"""

from __future__ import annotations

import itertools
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.orders import checker, web
from examples.orders import config as c
from examples.orders.db import read_only
from examples.orders.loadgen import LoadGenerator, inject_poison
from examples.orders.system import GATEWAY_PROXY, KAFKA_PROXY, MODULES, System

SCENARIOS = Path(__file__).parent / "scenarios"
KINDS = ("kill", "gateway-down", "broker-kill", "latency")


class PlanError(ValueError):
    """A fault plan that cannot run as written."""


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    duration: float
    target: str = ""
    latency_ms: int = 300

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}".strip()


@dataclass(frozen=True)
class Plan:
    name: str
    profile: c.Profile
    orders: int
    rate: float
    bound: float
    durable: bool
    faults: tuple[Fault, ...]


def load_plan(name_or_path: str) -> Plan:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        known = ", ".join(p.stem for p in sorted(SCENARIOS.glob("*.toml")))
        raise PlanError(f"no plan {name_or_path!r} (built in: {known})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: not TOML: {exc}") from None
    return parse_plan(data, path.stem)


def parse_plan(data: dict[str, Any], name: str) -> Plan:
    unknown = set(data) - {"profile", "orders", "rate", "bound", "durable", "fault"}
    if unknown:
        raise PlanError(f"plan {name}: unknown settings {sorted(unknown)}")
    profile = data.get("profile", "short")
    if profile not in c.PROFILES:
        raise PlanError(f"plan {name}: profile {profile!r} is not one of {sorted(c.PROFILES)}")
    faults = tuple(_fault(name, n, f) for n, f in enumerate(data.get("fault", []), 1))
    durable = bool(data.get("durable", False))
    if any(f.kind == "broker-kill" for f in faults) and not durable:
        raise PlanError(
            f"plan {name}: broker-kill needs durable = true (in-memory storage "
            "loses every record with the broker)"
        )
    ordered = sorted(faults, key=lambda f: f.at)
    for before, after in itertools.pairwise(ordered):
        if after.at < before.at + before.duration:
            raise PlanError(
                f"plan {name}: {after.label} at {after.at} s starts before "
                f"{before.label} ends ({before.at + before.duration} s): one fault "
                "at a time, so each is attributable"
            )
    orders, rate, bound = data.get("orders", 60), data.get("rate", 6.0), data.get("bound", 45.0)
    if not (isinstance(orders, int) and orders > 0 and rate > 0 and bound > 0):
        raise PlanError(f"plan {name}: orders, rate and bound must be positive")
    return Plan(
        name, c.PROFILES[profile], orders, float(rate), float(bound), durable, tuple(ordered)
    )


def _fault(plan: str, n: int, f: dict[str, Any]) -> Fault:
    where = f"plan {plan}, fault {n}"
    unknown = set(f) - {"at", "kind", "duration", "target", "latency_ms"}
    if unknown:
        raise PlanError(f"{where}: unknown settings {sorted(unknown)}")
    kind = f.get("kind")
    if kind not in KINDS:
        raise PlanError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    target = f.get("target", "")
    if (kind == "kill") != bool(target) or (target and target not in MODULES):
        raise PlanError(
            f"{where}: {kind} takes "
            + (f"a target, one of {', '.join(MODULES)}" if kind == "kill" else "no target")
        )
    at, duration = f.get("at"), f.get("duration")
    if not all(isinstance(x, int | float) and x >= 0 for x in (at, duration)) or not duration:
        raise PlanError(f"{where}: at >= 0 and duration > 0 (seconds) are required")
    return Fault(float(at), kind, float(duration), target, int(f.get("latency_ms", 300)))  # type: ignore[arg-type]


# -- watching the system ------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    accepted: int
    by_state: dict[str, int]
    view_by_state: dict[str, int]
    steps_in_flight: dict[str, int]
    resends: int
    outbox_backlog: int
    breaker: str
    paused_for_breaker: int
    view_lag_ms_p95: int
    up: dict[str, bool]
    dead_letters: dict[str, int] = field(default_factory=dict)  # by group, since its start
    orders: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw /stats answers
    view: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def divergence(self) -> int:
        """Orders the view shows in another state than the orders service (a lower bound)."""
        keys = set(self.by_state) | set(self.view_by_state)
        return sum(abs(self.by_state.get(k, 0) - self.view_by_state.get(k, 0)) for k in keys) // 2


def scrape(url: str) -> list[Any]:
    """The samples of a service's /metrics (none while it is down)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def breaker_state(samples: list[Any]) -> tuple[str, int]:
    """The payment gateway breaker's state and the partitions paused for it."""
    state, paused = "?", 0
    for s in samples:
        if s.name == "resilient_kafka_circuitbreaker_state" and s.value == 1:
            state = s.labels.get("state", "?")
        if (
            s.name == "resilient_kafka_consumer_paused_partitions"
            and s.labels.get("reason") == "circuit_open"
        ):
            paused += int(s.value)
    return state, paused


def dead_lettered(samples: list[Any]) -> dict[str, int]:
    """Records each consumer group sent to its DLQs since its process started."""
    counts: dict[str, int] = {}
    for s in samples:
        if (
            s.name == "resilient_kafka_messages_handled_total"
            and s.labels.get("outcome") == "dead_lettered"
        ):
            group = s.labels.get("messaging_consumer_group_name", "?")
            counts[group] = counts.get(group, 0) + int(s.value)
    return counts


class Sampler:
    """Samples the system every ``interval`` seconds, for the live view and the timeline."""

    def __init__(self, system: System, load: LoadGenerator | None, interval: float = 0.5) -> None:
        self.system = system
        self.load = load
        self.interval = interval
        self.samples: list[Sample] = []
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.samples.append(self.sample())  # the end state, for the report's last point

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def sample(self) -> Sample:
        # a service that is down (killed by a fault) keeps its last figures: a gap, not a drop
        last = self.latest
        orders = _get(self.system.url("orders") + "/stats") or (last and last.orders) or {}
        view = _get(self.system.url("view") + "/stats") or (last and last.view) or {}
        scraped = {n: scrape(self.system.metrics_url(n)) for n in c.SERVICES}
        breaker, paused = breaker_state(scraped["payments"])
        dead: dict[str, int] = {}
        for samples in scraped.values():
            dead.update(dead_lettered(samples))
        return Sample(
            t=time.time() - self.t0,
            accepted=len(self.load.accepted) if self.load else 0,
            by_state=orders.get("by_state", {}),
            view_by_state=view.get("by_state", {}),
            steps_in_flight=orders.get("steps_in_flight", {}),
            resends=orders.get("resends", 0),
            outbox_backlog=orders.get("outbox_backlog", 0),
            breaker=breaker,
            paused_for_breaker=paused,
            view_lag_ms_p95=view.get("lag_ms_p95", 0),
            up={n: p.running for n, p in self.system.processes.items()},
            orders=orders,
            view=view,
            dead_letters=dead,
        )


def _get(url: str) -> dict[str, Any]:
    try:
        answer = web.call("GET", url, timeout=1)
    except web.HttpError:
        return {}
    return answer if isinstance(answer, dict) else {}


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    workdir: Path
    invariants: list[checker.Invariant]
    faults: list[dict[str, Any]]
    samples: list[Sample]
    dead_letters: list[dict[str, Any]]
    self_exits: list[str] = field(default_factory=list)
    poison: dict[str, tuple[str, str]] = field(default_factory=dict)
    accepted: int = 0
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return all(inv.passed for inv in self.invariants)


class _Faults:
    """Applies the plan's faults in order on a thread of its own; records what each did."""

    def __init__(self, system: System, plan: Plan, t0: float) -> None:
        self.system, self.plan, self.t0 = system, plan, t0
        self.records: list[dict[str, Any]] = []
        self.down: set[str] = set()  # processes a fault is holding down
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> _Faults:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def last_end(self) -> float:
        return max((self.t0 + r["end"] for r in self.records), default=0.0)

    def _run(self) -> None:
        try:
            for fault in self.plan.faults:
                pause = self.t0 + fault.at - time.time()
                if pause > 0:
                    time.sleep(pause)
                self.records.append(self._apply(fault))
        except BaseException as exc:  # surfaces in the report and fails the run
            self.error = exc

    def _apply(self, f: Fault) -> dict[str, Any]:
        s = self.system
        start = time.time() - self.t0
        record: dict[str, Any] = {
            "label": f.label,
            "kind": f.kind,
            "target": f.target,
            "start": start,
        }
        if f.kind in ("kill", "broker-kill"):
            name = f.target or "broker"
            old = s.broker.pid if name == "broker" else s.processes[name].popen.pid  # type: ignore[union-attr]
            self.down.add(name)
            s.kill(name)
            time.sleep(f.duration)
            restarted = time.time()
            s.restart(name)
            self.down.discard(name)
            new = s.broker.pid if name == "broker" else s.processes[name].popen.pid  # type: ignore[union-attr]
            record["acted"] = new != old
            record["evidence"] = (
                f"pid {old} killed, {new} "
                f"{'serving' if name == 'broker' else 'ready'} "
                f"{time.time() - restarted:.1f} s after the restart"
            )
        elif f.kind == "gateway-down":
            s.toxiproxy.disable_proxy(GATEWAY_PROXY)  # type: ignore[union-attr]
            time.sleep(f.duration)
            s.toxiproxy.enable_proxy(GATEWAY_PROXY)  # type: ignore[union-attr]
        elif f.kind == "latency":
            toxic = s.toxiproxy.add_toxic(  # type: ignore[union-attr]
                KAFKA_PROXY,
                "latency",
                {"latency": f.latency_ms, "jitter": f.latency_ms // 6},
                name="orders-chaos-latency",
            )
            time.sleep(f.duration)
            present = any(t.name == toxic.name for t in s.toxiproxy.toxics(KAFKA_PROXY))  # type: ignore[union-attr]
            s.toxiproxy.remove_toxic(KAFKA_PROXY, toxic.name)  # type: ignore[union-attr]
            record["acted"] = present
            record["evidence"] = (
                f"{f.latency_ms} ms latency on every Kafka connection for {f.duration:.0f} s"
            )
        record["end"] = time.time() - self.t0
        return record


def _breaker_evidence(record: dict[str, Any], samples: list[Sample], reset: float) -> None:
    window = [x for x in samples if record["start"] <= x.t <= record["end"] + reset + 2]
    opened = [x for x in window if x.breaker in ("open", "half-open")]
    paused = max((x.paused_for_breaker for x in window), default=0)
    record["acted"] = bool(opened)
    record["evidence"] = (
        f"breaker open or half-open in {len(opened)} of {len(window)} samples, "
        f"up to {paused} partitions paused for it"
        if opened
        else f"breaker never seen open in {len(window)} samples"
    )


def run(
    plan: Plan,
    workdir: str | Path,
    *,
    seed: int = 7,
    on_sample: Callable[[Sample | None, str], None] = lambda _s, _m: None,
) -> Result:
    """Start the system, run the load and the faults, wait for the end, check, report."""
    from examples.orders import report

    workdir = Path(workdir)
    clear_previous_run(workdir)
    run_id = f"s{seed}"  # every run has a broker of its own: the same ids, the same outcomes
    system = System(workdir, plan.profile, durable=plan.durable, seed=seed)
    started = time.monotonic()
    system.start(lambda step: on_sample(None, f"starting {step}"))
    self_exits: list[str] = []
    try:
        # one order through every step first: every consumer group has joined before the clock
        # of the fault plan starts (a join takes seconds on Tansu)
        on_sample(None, "warming up: one order through every service")
        warm = _warm_up(system, run_id, timeout=90.0)
        load = LoadGenerator(
            system.url("orders"), rate=plan.rate, orders=plan.orders, run_id=run_id, seed=seed
        )
        sampler = Sampler(system, load).start()
        t0 = sampler.t0
        poison = inject_poison(system.client_config(), run_id)
        load.start()
        faults = _Faults(system, plan, t0).start()

        def watch(message: str) -> None:
            for name in system.exited():
                if name not in faults.down:  # exited by itself: a supervisor restarts it
                    self_exits.append(
                        f"{name} exited by itself at {time.time() - t0:.1f} s "
                        f"(code {system.processes[name].popen.returncode}); "  # type: ignore[union-attr]
                        "restarted"
                    )
                    system.restart(name, wait=False)
            on_sample(sampler.latest, message)

        while not (load.done and faults.done):
            watch("load and faults running")
            time.sleep(0.5)
        if faults.error is not None:
            raise faults.error
        end_of_faults = max(faults.last_end, load.finished_at)
        deadline = end_of_faults + plan.bound
        while time.time() < deadline and not _all_terminal(workdir, load.accepted):
            watch("waiting for every accepted order to end")
            time.sleep(0.5)
        watch("waiting for the read model to converge")
        converged, _diff = checker.wait_converged(workdir, 30.0)
        sampler.stop()
        for record in faults.records:
            if record["kind"] == "gateway-down":
                _breaker_evidence(record, sampler.samples, plan.profile.breaker_reset)
        on_sample(sampler.latest, "reading the dead-letter topics")
        dead = checker.read_dead_letters(
            system.client_config(), c.derived_topics(plan.profile)["dlq"]
        )
        facts = checker.Facts(
            workdir=workdir,
            accepted={**warm, **load.accepted},
            last_fault_end=faults.last_end,
            bound=plan.bound,
            poison=poison,
            dead_letters=dead,
            faults=faults.records,
            view_converged_after=converged,
        )
        result = Result(
            plan,
            workdir,
            checker.check(facts),
            faults.records,
            sampler.samples,
            dead,
            self_exits,
            poison,
            len(load.accepted),
            time.monotonic() - started,
        )
        if load.refused:
            result.invariants[0].passed = False
            result.invariants[0].details[:0] = [f"the API refused: {r}" for r in load.refused[:5]]
    finally:
        system.stop()
    report.write(result)
    return result


RUN_FILES = ("*.db", "*.db-wal", "*.db-shm", "*.log", "report.json", "report.md", "timeline.png")


def clear_previous_run(workdir: Path) -> list[Path]:
    """Remove a previous run's databases, logs and report from ``workdir`` (and nothing else):
    a fresh broker with old dedup stores and orders would make the run meaningless."""
    removed = [p for pattern in RUN_FILES for p in workdir.glob(pattern) if p.is_file()]
    for path in removed:
        path.unlink()
    return removed


def _warm_up(system: System, run_id: str, timeout: float) -> dict[str, float]:
    answer = web.call(
        "POST",
        system.url("orders") + "/orders",
        {"customer": "warm-up", "items": [{"sku": "apple", "qty": 1}], "card": "4000000000000077"},
        headers={"Idempotency-Key": f"{run_id}-warm-up"},
    )
    accepted = {answer["order_id"]: time.time()}
    deadline = time.monotonic() + timeout
    while not _all_terminal(system.workdir, accepted):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the warm-up order did not end within {timeout:.0f} s; "
                f"see the logs in {system.workdir}"
            )
        time.sleep(0.2)
    return accepted


def _all_terminal(workdir: Path, accepted: dict[str, float]) -> bool:
    conn = read_only(workdir / "orders.db")
    try:
        done = {
            r[0]
            for r in conn.execute(
                "SELECT order_id FROM orders WHERE state IN ('COMPLETED', 'CANCELLED')"
            )
        }
    finally:
        conn.close()
    return set(accepted) <= done
