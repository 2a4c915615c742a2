"""The chaos suite: scenario files, the invariants, the command, and one scenario end to end on
the embedded broker behind the built-in Toxiproxy-API proxy (CI runs them all with
`resilient-kafka chaos run`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from resilient_kafka.chaos import builtin, parse, run_scenario
from resilient_kafka.chaos._stack import Stack
from resilient_kafka.chaos.report import write
from resilient_kafka.chaos.runner import (
    LedgerRow,
    Result,
    _Timeline,
    consumer_reorders,
    evaluate,
    producer_reorders,
)
from resilient_kafka.cli import main
from resilient_kafka.errors import ConfigurationError
from tests.helpers import wait_for

REPORT_FIELDS = {
    "name",
    "produced",
    "acknowledged",
    "processed",
    "dead_lettered",
    "lost",
    "duplicates",
    "reorders",
    "producer_reorders",
    "recovery_seconds",
    "passed",
}


def test_the_built_in_scenarios_cover_the_issue_list() -> None:
    names = [s.name for s in builtin()]
    assert names == [
        "broker-outage",
        "broker-kill",
        "latency",
        "bandwidth",
        "reset-peer",
        "timeout",
        "slow-close",
        "downstream-outage",
        "poison-pill",
        "consumer-crash",
        "consumer-restart",
        "consumer-restart-static",
        "rebalance-storm",
        "broker-kill-concurrent",
        "consumer-crash-concurrent",
        "rebalance-storm-concurrent",
        "leader-moves",
        "broker-down",
        "request-errors",
    ]
    latency = next(s for s in builtin() if s.name == "latency").scaled(20.0)
    assert (latency.faults[0].at, latency.faults[0].duration) == (4.0, 10.0)  # scaled from 10 s
    assert (latency.concurrency, latency.ordering) == (1, "key")


def test_the_concurrent_variants_are_their_siblings_with_concurrent_handlers() -> None:
    known = {s.name: s for s in builtin()}
    for name in ("broker-kill", "consumer-crash", "rebalance-storm"):
        sequential, concurrent = known[name], known[f"{name}-concurrent"].scaled(10.0)
        assert (concurrent.concurrency, concurrent.ordering) == (16, "key")
        assert concurrent.keeps_key_order
        assert concurrent.faults == sequential.faults
        assert (concurrent.workers, concurrent.dedup, concurrent.downstream_latency_ms) == (
            sequential.workers,
            sequential.dedup,
            sequential.downstream_latency_ms,
        )
    scaled = known["consumer-crash-concurrent"].scaled(20.0)
    assert (scaled.concurrency, scaled.ordering, scaled.duration) == (16, "key", 20.0)
    custom = parse("name = 'x'\nconcurrency = 4\nordering = 'unordered'", "my.toml")
    assert (custom.concurrency, custom.ordering, custom.keeps_key_order) == (4, "unordered", False)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name = 'x'\nfaults = 3", "array of tables"),
        ("name = 'x'\n[[faults]]\nkind = 'meteor'\nat = 1\nfor = 1", "fault kind must be one of"),
        ("name = 'x'\n[[faults]]\nkind = 'proxy-down'\nat = 9\nfor = 5", "after the load"),
        ("name = 'x'\n[[faults]]\nkind = 'proxy-down'\nat = 1", "positive `for`"),
        ("name = 'x'\n[[faults]]\nkind = 'toxic'\nat = 1\nfor = 1", "toxic.type"),
        ("name = 'x'\nworkerz = 2", "unknown keys ['workerz']"),
        ("name = 'x'\nworkers = 0", "workers must be a finite number >= 1"),
        ("name = 'x'\nduration = inf", "duration must be a finite number"),
        (
            "name = 'x'\n[[faults]]\nkind = 'toxic'\nat = 1\nfor = 1\n"
            "toxic = { type = 'latency', attributes = { latencyy = 5 } }",
            "latency toxics take ['jitter', 'latency'], not ['latencyy']",
        ),
        (
            "name = 'x'\n[[faults]]\nkind = 'toxic'\nat = 1\nfor = 1\n"
            "toxic = { type = 'timeout', toxicity = 2 }",
            "toxicity is a probability",
        ),
        ("name = 'x'\nconcurrency = 0", "concurrency must be a whole number >= 1"),
        ("name = 'x'\nconcurrency = 2.5", "concurrency must be a whole number >= 1"),
        ("name = 'x'\nconcurrency = true", "concurrency must be a whole number >= 1"),
        ("name = 'x'\nconcurrency = '8'", "concurrency must be a whole number >= 1"),
        (
            "name = 'x'\nordering = 'offset'",
            "ordering must be one of ['key', 'partition', 'unordered'], got 'offset'",
        ),
        ("name = 'x'\nordering = 1", "ordering must be one of"),
        ("name = 'has space'", "name must be"),
        ("name = 'x'\ncluster = 'kraft'", "cluster must be one of ['broker', 'mock']"),
        ("name = 'x'\nstatic_membership = 'yes'", "static_membership must be true or false"),
        ("name = 'x'\nsession_timeout_ms = 3000", "session_timeout_ms must be a whole number of"),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\nat = 1\n"
            "for = 1\nrequest = ['Produce']\nerrors = ['REQUEST_TIMED_OUT']",
            "request must be one of",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\nat = 1\n"
            "for = 1\nrequest = 'Fetch'\nerrors = ['_PARTITION_EOF']",
            "'_PARTITION_EOF' is not a Kafka error name",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n"
            "[[faults]]\nkind = 'broker-down'\nat = 1\nfor = 3\nbroker = 2\n"
            "[[faults]]\nkind = 'broker-down'\nat = 2\nfor = 3\nbroker = 2",
            "two broker 2 down faults overlap (1-4s and 2-5s)",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n"
            "[[faults]]\nkind = 'request-errors'\nat = 1\nfor = 3\nrequest = 'Fetch'\n"
            "errors = ['NOT_LEADER_FOR_PARTITION']\n"
            "[[faults]]\nkind = 'request-errors'\nat = 3\nfor = 3\nrequest = 'Fetch'\n"
            "errors = ['REQUEST_TIMED_OUT']",
            "two Fetch errors faults overlap",
        ),
        ("name = 'x'\nsession_timeout_ms = 6000.0", "session_timeout_ms must be a whole number"),
        (
            "name = 'x'\n[[faults]]\nkind = 'leader-move'\nat = 1\nfor = 1",
            "fault 'leader-move' needs cluster = \"mock\"",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'proxy-down'\nat = 1\nfor = 1",
            "no proxy stands in front of the mock cluster",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\nat = 1\n"
            "for = 1\nrequest = 'Produse'\nerrors = ['REQUEST_TIMED_OUT']",
            "request must be one of",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\nat = 1\n"
            "for = 1\nrequest = 'Produce'\nerrors = ['REQUEST_TIMED_OUTT']",
            "'REQUEST_TIMED_OUTT' is not a Kafka error name",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\nat = 1\n"
            "for = 1\nrequest = 'Produce'\nerrors = []",
            "needs errors, a non-empty list",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'broker-down'\nat = 1\n"
            "for = 1\nbroker = 4",
            "broker must be a broker id, 1 to 3, got 4",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'leader-move'\nat = 1\n"
            "for = 1\nbroker = 2",
            "only broker-down faults take broker",
        ),
        (
            "name = 'x'\ncluster = 'mock'\n[[faults]]\nkind = 'broker-down'\nat = 1\n"
            "for = 1\nerrors = ['REQUEST_TIMED_OUT']",
            "only request-errors faults take errors",
        ),
        ("name = ", "not valid TOML"),
    ],
)
def test_bad_scenario_files_get_specific_errors(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=r"scenario my\.toml: ") as caught:
        parse(text, "my.toml")
    assert problem in str(caught.value)


def _evaluate(**kwargs: object) -> Result:
    base: dict[str, object] = {
        "produced": 4,
        "acked": {"a", "b", "c", "d"},
        "rows": [("a", "k1", 0, "w1", 100.0, 0, 0), ("b", "k1", 1, "w1", 101.0, 0, 1)],
        "dead": {"c"},
        "poison": {"c"},
        "dedup": True,
        "started_at": 100.0,
        "fault_ends": [],
    }
    base.update(kwargs)
    return evaluate(Result("t"), **base)  # type: ignore[arg-type]


def test_invariants_count_loss_duplicates_reorders_and_recovery() -> None:
    lost = _evaluate(in_log={"a", "b", "c"})
    assert (lost.lost, lost.lost_by_broker, lost.passed) == (1, 1, False)  # d: not even in log
    assert "1 acknowledged message(s) lost: ['d']" in lost.failures[0]

    rows = [
        ("a", "k1", 1, "w1", 100.0, 0, 1),
        ("b", "k1", 0, "w2", 103.0, 0, 0),  # offset 0 after offset 1 of k1: a reorder
        ("b", "k1", 0, "w2", 104.0, 0, 0),  # twice: a duplicate side effect
        ("d", "k2", 0, "w1", 106.5, 1, 0),
    ]
    # acknowledged 3 by the fault's end (5 s), processed 2 (+1 dead letter) only at 7 s
    timeline = [(4.5, 3, 0), (5.0, 3, 1), (6.0, 4, 1), (7.0, 4, 2), (8.0, 4, 3)]
    calls = ["a", "b", "b", "d"]  # b's downstream call ran twice (the kill window of dedup)
    result = _evaluate(rows=rows, fault_ends=[5.0], timeline=timeline, calls=calls)
    assert (result.lost, result.duplicates, result.reorders, result.producer_reorders) == (
        0,
        1,
        1,
        0,  # the log holds k1's seq 0 (offset 0) before its seq 1: the producer kept order
    )
    assert result.downstream_duplicates == 1
    assert result.recovery_seconds == pytest.approx(2.0)
    assert result.max_stall_seconds == pytest.approx(3.0)
    never = _evaluate(rows=rows, fault_ends=[5.0], timeline=timeline[:2])
    assert never.recovery_seconds is None
    assert not result.passed and "duplicate side effect" in result.failures[0]
    assert "1 record(s) handled after a later record of their key (ordering='key')" in (
        result.failures
    )
    without_dedup = _evaluate(rows=rows, fault_ends=[5.0], dedup=False)
    assert without_dedup.failures == [
        "1 record(s) handled after a later record of their key (ordering='key')"
    ]
    partition = _evaluate(rows=rows, fault_ends=[5.0], dedup=False, ordering="partition")
    assert not partition.passed
    # no order promised: reported, not failed
    assert _evaluate(rows=rows, fault_ends=[5.0], dedup=False, ordering="unordered").passed

    unacked = _evaluate(acked={"a", "b", "c"}, rows=rows[:2] + rows[3:])
    assert "1 message(s) never acknowledged" in unacked.failures
    poison_processed = _evaluate(dead=set(), acked={"a", "b"})
    assert "1 poison message(s) not dead-lettered" in poison_processed.failures
    healthy_in_dlq = _evaluate(dead={"c", "d"})  # d is not poison: retries ran out
    assert healthy_in_dlq.lost == 0 and not healthy_in_dlq.passed
    assert "1 healthy message(s) dead-lettered: ['d']" in healthy_in_dlq.failures


def _row(
    msg: str, seq: int, offset: int, at: float, *, key: str = "k1", retried: bool = False
) -> LedgerRow:
    return LedgerRow(msg, key, seq, "w1", at, 0, offset, retried)


def test_a_partition_stall_shows_where_the_whole_load_kept_moving() -> None:
    # partition 0 waits 5 s (a crashed consumer's partition) while partition 1 flows
    rows = [
        ("a", "k1", 0, "w1", 100.0, 0, 0),
        ("b", "k1", 1, "w1", 101.0, 0, 1),
        ("c", "k2", 0, "w2", 102.0, 1, 0),
        ("d", "k2", 1, "w2", 103.0, 1, 1),
        ("e", "k2", 2, "w2", 104.0, 1, 2),
        ("f", "k2", 3, "w2", 105.0, 1, 3),
        ("g", "k1", 2, "w3", 106.0, 0, 2),
        ("g", "k1", 2, "w3", 108.0, 0, 2),  # handled again later: not new progress
        ("h", "k2", 4, "w2", 125.0, 1, 4, True),  # a retry copy: late by design
        ("p", "k2", 5, "w2", 115.0, 1, 5),  # poison (dead-lettered): aside
    ]
    acked = {row[0] for row in rows}
    result = _evaluate(rows=rows, acked=acked, produced=len(acked), dead={"p"}, poison={"p"})
    assert result.max_partition_stall_seconds == pytest.approx(5.0)
    assert result.max_stall_seconds == pytest.approx(10.0)  # 115 -> 125: the retry's wait


def test_reorders_count_the_consumer_against_the_log_and_the_producer_apart() -> None:
    # the producer's batch of a, b (seq 0, 1) failed while the broker was down and was sent
    # again after c (seq 2): the log holds c, a, b. Handling them in log order is no consumer
    # reorder; the producer's log has two.
    resent = [_row("c", 2, 10, 1.0), _row("a", 0, 11, 2.0), _row("b", 1, 12, 3.0)]
    assert (consumer_reorders(resent, set()), producer_reorders(resent, set())) == (0, 2)
    result = _evaluate(acked={"a", "b", "c"}, rows=resent, dead=set(), poison=set(), produced=3)
    assert (result.reorders, result.producer_reorders, result.passed) == (0, 2, True)

    # a consumer that handles offset 12 before 11 of the same key reorders; the producer did not
    swapped = [_row("a", 0, 10, 1.0), _row("c", 2, 12, 2.0), _row("b", 1, 11, 3.0)]
    assert (consumer_reorders(swapped, set()), producer_reorders(swapped, set())) == (1, 0)
    result = _evaluate(acked={"a", "b", "c"}, rows=swapped, dead=set(), poison=set(), produced=3)
    assert (result.reorders, result.passed) == (1, False)

    # other keys, other partitions: no order between them
    keys = [_row("a", 0, 11, 1.0, key="k1"), _row("b", 0, 10, 2.0, key="k2")]
    assert consumer_reorders(keys, set()) == 0
    # a record handled again later (a redelivery without dedup) is not a new record
    again = [_row("a", 0, 10, 1.0), _row("b", 1, 11, 2.0), _row("a", 0, 10, 3.0)]
    assert consumer_reorders(again, set()) == 0
    # the producer's duplicate of a (re-sent although stored) later in the log: handled there,
    # in order; its first place in the log is what the producer figure counts
    dup = [_row("a", 0, 10, 1.0), _row("b", 1, 11, 2.0), _row("a", 0, 12, 3.0)]
    assert (consumer_reorders(dup, set()), producer_reorders(dup, set())) == (0, 0)
    # a record that went through a retry tier comes after its successors by design
    retried = [_row("b", 1, 11, 1.0), _row("a", 0, 10, 2.0, retried=True)]
    assert (consumer_reorders(retried, set()), producer_reorders(retried, set())) == (0, 0)
    # rows in any order: the processing order is their time
    assert consumer_reorders(list(reversed(swapped)), set()) == 1


def test_the_report_has_the_contracted_fields(tmp_path: Path) -> None:
    result = _evaluate(rows=[("a", "k1", 0, "w1", 100.0, 0, 0), ("b", "k1", 1, "w1", 101.0, 0, 1)])
    result.timeline = [(0.0, 0, 0), (0.5, 2, 1), (1.0, 4, 2)]
    result.faults = [{"label": "proxy-down", "start": 0.2, "end": 0.6}]
    written = write([result], tmp_path, {"messages": 4, "duration": 1, "seed": 1})
    doc = json.loads((tmp_path / "report.json").read_text())
    assert set(doc["scenarios"][0]) >= REPORT_FIELDS
    assert "| `t` | 4 | 4 | 2 | 1 | 1 | 0 | 0 | 0 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "timeline-t.png").read_bytes()[:4] == b"\x89PNG"
    assert len(written) == 3


def test_chaos_list_and_bad_run_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "list"]) == 0
    listed = capsys.readouterr().out
    assert "broker-kill" in listed and "rebalance-storm" in listed
    assert main(["chaos", "run", "no-such-scenario"]) == 1
    assert "unknown scenario(s) ['no-such-scenario']" in capsys.readouterr().err


def test_a_failed_invariant_makes_the_command_fail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import resilient_kafka.chaos as chaos

    def fake_run_all(scenarios: list[object], **kwargs: object) -> list[Result]:
        return [Result("latency", lost=1, passed=False), Result("timeout", passed=True)]

    monkeypatch.setattr(chaos, "run_all", fake_run_all)
    assert main(["chaos", "run", "latency", "timeout", "--report", str(tmp_path)]) == 1


def _run_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names: tuple[str, ...], run: Any
) -> list[Result]:
    """``run_all`` over the built-in scenarios ``names`` with ``run`` in place of
    ``run_scenario`` and no broker; the report goes to ``tmp_path / "report"``."""
    import resilient_kafka.chaos as chaos
    from resilient_kafka.chaos import _stack

    class _NoStack:
        def close(self) -> None:
            pass

    monkeypatch.setattr(chaos, "run_scenario", run)
    monkeypatch.setattr(_stack.Stack, "embedded_stack", staticmethod(lambda *a, **k: _NoStack()))
    return chaos.run_all(
        [s for s in builtin() if s.name in names],
        messages=10,
        duration=2.0,
        drain_timeout=1.0,
        seed=1,
        report=tmp_path / "report",
        workdir=tmp_path / "work",
    )


def test_a_failed_scenario_keeps_its_logs_and_prints_their_tails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workdir is deleted after a run and CI shows only the console: a failed scenario's
    logs and ledger are copied next to the report, and the workers' own lines printed."""

    def failing(stack: object, scenario: Any, *, workdir: Path, **kwargs: object) -> Result:
        if scenario.name == "timeout":  # broke before its workdir existed
            return Result(scenario.name, passed=False)
        workdir.mkdir(parents=True)
        noise = [f"%6|1|FAIL|rdkafka#consumer-1| noise {i}" for i in range(40)]
        own = [f"worker-1 line {i}" for i in range(30)]
        (workdir / "rk-worker-1-x.log").write_text("\n".join(own[:5] + noise + own[5:]) + "\n")
        (workdir / "ledger.db").write_bytes(b"rows")
        return Result(scenario.name, lost=8, passed=scenario.name == "latency")

    names = ("latency", "timeout", "downstream-outage")
    results = _run_offline(monkeypatch, tmp_path, names, failing)
    report = tmp_path / "report"
    assert [r.passed for r in results] == [True, False, False]
    assert not (report / "evidence-timeout").exists()
    kept = report / "evidence-downstream-outage"
    assert (kept / "ledger.db").read_bytes() == b"rows"
    assert (kept / "rk-worker-1-x.log").exists()
    assert not (report / "evidence-latency").exists()  # a passing scenario keeps nothing
    err = capsys.readouterr().err
    assert "downstream-outage failed; its logs and ledger:" in err
    assert "rk-worker-1-x.log (last 25 of 30 lines)" in err
    assert "worker-1 line 29" in err and "worker-1 line 5\n" in err
    assert "worker-1 line 4\n" not in err and "noise" not in err


def test_evidence_that_cannot_be_kept_does_not_break_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resilient_kafka.chaos import report as chaos_report

    def failing(stack: object, scenario: Any, *, workdir: Path, **kwargs: object) -> Result:
        workdir.mkdir(parents=True)
        (workdir / "rk-worker-1-x.log").write_text("worker-1 line\n")
        return Result(scenario.name, lost=1, passed=False)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chaos_report.shutil, "copy2", no_space)
    results = _run_offline(monkeypatch, tmp_path, ("latency", "timeout"), failing)
    assert [r.name for r in results] == ["latency", "timeout"]  # both ran and are reported
    assert "latency failed; its logs could not be kept: [Errno 28]" in capsys.readouterr().err
    assert '"name": "timeout"' in (tmp_path / "report" / "report.json").read_text()


class _RecordingStack:
    """The mock stack's fault controls, recorded with their times."""

    mock = True

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, object]] = []
        self.started = time.monotonic()

    def _record(self, what: str, arg: object) -> None:
        self.calls.append((time.monotonic() - self.started, what, arg))

    def move_leaders(self, topics: dict[str, int]) -> None:
        self._record("move", dict(topics))

    def push_request_errors(self, request: str, errors: tuple[str, ...]) -> None:
        self._record("push", (request, errors))

    def clear_request_errors(self, request: str) -> None:
        self._record("clear", request)

    def broker_down(self, broker: int) -> None:
        self._record("down", broker)

    def broker_up(self, broker: int) -> None:
        self._record("up", broker)


def test_protocol_faults_act_on_the_mock_cluster_at_their_times(tmp_path: Path) -> None:
    scenario = parse(
        "name = 'x'\ncluster = 'mock'\nduration = 2\n"
        "[[faults]]\nkind = 'request-errors'\nat = 0.2\nfor = 1.0\nevery = 0.4\n"
        "request = 'OffsetCommit'\nerrors = ['REBALANCE_IN_PROGRESS', 'NOT_COORDINATOR']\n"
        "[[faults]]\nkind = 'leader-move'\nat = 0.2\nfor = 0.6\nevery = 0.3\n"
        "[[faults]]\nkind = 'broker-down'\nat = 0.5\nfor = 0.5\nbroker = 2",
        "my.toml",
    )
    stack = _RecordingStack()
    timeline = _Timeline(stack, None, scenario, tmp_path / "flag", seed=1)  # type: ignore[arg-type]
    timeline.topics = {"src": 4, "src.retry": 4}
    timeline.start(time.monotonic())
    wait_for(
        lambda: len(timeline.windows) == 3 and all(w["end"] for w in timeline.windows),
        10,
        "the three faults to begin and end",
    )
    timeline.stop()
    assert timeline.errors == []
    pushes = [t for t, what, _ in stack.calls if what == "push"]
    moves = [t for t, what, _ in stack.calls if what == "move"]
    assert len(pushes) == 3 and len(moves) == 2  # at 0.2, 0.6, 1.0 / at 0.2, 0.5
    # never early (a loaded machine may wake a thread late: no upper bound but the order)
    assert pushes[0] >= 0.2 and pushes[1] >= 0.6 and pushes[2] >= 1.0
    assert moves[0] >= 0.2 and moves[1] >= 0.5
    args = {what: arg for _, what, arg in stack.calls}
    assert args["push"] == ("OffsetCommit", ("REBALANCE_IN_PROGRESS", "NOT_COORDINATOR"))
    assert args["move"] == {"src": 4, "src.retry": 4}
    assert (args["down"], args["up"], args["clear"]) == (2, 2, "OffsetCommit")
    when = {what: t for t, what, _ in stack.calls}
    assert 0.5 <= when["down"] < when["up"] and when["up"] >= 1.0
    assert when["clear"] >= 1.2 and when["clear"] > max(pushes)


def test_a_fault_that_fails_while_repeating_fails_the_run(tmp_path: Path) -> None:
    scenario = parse(
        "name = 'x'\ncluster = 'mock'\nduration = 1\n"
        "[[faults]]\nkind = 'leader-move'\nat = 0.1\nfor = 0.3\nevery = 0.1",
        "my.toml",
    )

    class Broken(_RecordingStack):
        def move_leaders(self, topics: dict[str, int]) -> None:
            raise RuntimeError("no such broker")

    timeline = _Timeline(Broken(), None, scenario, tmp_path / "flag", seed=1)  # type: ignore[arg-type]
    timeline.start(time.monotonic())
    wait_for(lambda: timeline.windows and timeline.windows[0]["end"], 10, "the fault's end")
    timeline.stop()
    assert timeline.errors == ["leader-move: no such broker"]


class _FakeProcess:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.alive = True

    def running(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False


def test_a_replacement_worker_takes_the_identity_of_the_one_killed(tmp_path: Path) -> None:
    """Static membership: the worker started after a kill rejoins as the member it replaces
    (its group.instance.id slot); a worker started for churn gets a new one."""
    import json
    import random

    from resilient_kafka.chaos import runner

    procs = runner._Processes(tmp_path, {"static_membership": True})
    procs._spawn = lambda name, module, settings: _FakeProcess(settings)  # type: ignore[assignment,method-assign,return-value]
    first, second = procs.start_worker(), procs.start_worker()
    procs.kill_worker(random.Random(1))
    killed = next(w for w in (first, second) if not w.running())  # type: ignore[union-attr]
    extra = procs.start_worker()  # a churn worker meanwhile: a new identity
    replacement = procs.start_worker(replacing=True)
    slots = [w.settings["instance"] for w in (first, second, replacement, extra)]  # type: ignore[union-attr]
    assert replacement.settings["instance"] == killed.settings["instance"]  # type: ignore[union-attr]
    assert replacement.settings["worker"] == "worker-4"  # type: ignore[union-attr]
    assert extra.settings["instance"] == "worker-3"  # type: ignore[union-attr]
    assert len(set(slots)) == 3, json.dumps(slots)


def test_leaders_moving_on_three_brokers_lose_nothing(tmp_path: Path) -> None:
    """A protocol-fault scenario end to end on librdkafka's mock cluster: the leaders of the
    source, the retry tiers and the DLQ move while retry and DLQ copies are produced."""
    scenario = next(s for s in builtin() if s.name == "leader-moves")
    stack = Stack.mock_stack()
    try:
        result = run_scenario(
            stack, scenario, messages=400, seed=3, drain_timeout=30, workdir=tmp_path
        )
        # the moves reached the cluster: one more, and each partition is led by the broker
        # after the one three moves gave it (metadata from a fresh client)
        topics = dict.fromkeys({t for t, _ in _partitions(stack) if t.startswith("chaos-")}, 4)
        assert len(topics) == 4  # the source, two retry tiers, the DLQ
        stack.move_leaders(topics)
        leaders = {p: meta.leader for p, meta in _partitions(stack).items() if p[0] in topics}
    finally:
        stack.close()
    assert result.failures == []
    assert leaders == {(t, p): (p + 4) % 3 + 1 for t in topics for p in range(4)}
    assert (result.acknowledged, result.processed, result.lost, result.duplicates) == (
        400,
        390,
        0,
        0,
    )
    assert result.dead_lettered == 10
    assert [w["label"] for w in result.faults] == ["leader-move", "downstream-down"]
    assert result.passed


def test_maybe_stored_produce_errors_on_the_mock_lose_no_acknowledged_record(
    tmp_path: Path,
) -> None:
    """The mock checks no sequence numbers of an idempotent producer: with REQUEST_TIMED_OUT
    among the Produce errors, an idempotent load lost 2-3 acknowledged records of 400 (3 runs
    out of 3). The runner's load producer therefore runs without idempotence on the mock."""
    scenario = parse(
        "name = 'maybe-stored'\ncluster = 'mock'\n[[faults]]\nkind = 'request-errors'\n"
        "at = 2.0\nfor = 6.0\nevery = 1.0\nrequest = 'Produce'\n"
        "errors = ['NOT_LEADER_FOR_PARTITION', 'REQUEST_TIMED_OUT', 'NOT_ENOUGH_REPLICAS']",
        "my.toml",
    )
    result = _run_400(Stack.mock_stack(), scenario, seed=1, workdir=tmp_path)
    assert result.failures == []
    assert (result.acknowledged, result.processed, result.lost) == (400, 400, 0)
    assert result.passed


def _run_400(stack: Stack, scenario: Any, *, seed: int, workdir: Path) -> Any:
    """``scenario`` with 400 messages on ``stack``, which is closed afterwards."""
    try:
        return run_scenario(
            stack, scenario, messages=400, seed=seed, drain_timeout=30, workdir=workdir
        )
    finally:
        stack.close()


def _partitions(stack: Stack) -> dict[tuple[str, int], Any]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": stack.bootstrap, "log_level": 0})
    topics = admin.list_topics(timeout=10).topics
    return {(name, p): meta for name, t in topics.items() for p, meta in t.partitions.items()}


@pytest.mark.parametrize("name", ["consumer-crash", "consumer-crash-concurrent"])
def test_a_worker_sigkilled_mid_batch_loses_nothing(tmp_path: Path, name: str) -> None:
    scenario = next(s for s in builtin() if s.name == name).scaled(6.0)
    result = _run_400(Stack.embedded_stack(seed=3), scenario, seed=3, workdir=tmp_path)
    assert result.failures == []
    assert (result.acknowledged, result.processed, result.lost, result.duplicates) == (
        400,
        400,
        0,
        0,
    )
    assert result.reorders == 0
    assert [w["label"] for w in result.faults] == ["worker-kill"]
    assert result.concurrency == scenario.concurrency
    assert result.passed
