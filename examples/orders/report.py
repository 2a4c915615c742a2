"""The chaos run's report, in the chaos suite's spirit: ``report.json`` for machines,
``report.md`` with the invariant table for people, and ``timeline.png``: orders accepted and
ended, sagas in flight and read-model divergence over time, with every fault window shaded and
a band while the payment breaker was open."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from examples.orders import checker
from examples.orders.saga import IN_FLIGHT

if TYPE_CHECKING:
    from examples.orders.chaos import Result, Sample


def write(result: Result) -> Path:
    out = result.workdir
    (out / "report.json").write_text(
        json.dumps(
            {
                "plan": {
                    "name": result.plan.name,
                    "orders": result.plan.orders,
                    "rate": result.plan.rate,
                    "bound": result.plan.bound,
                    "durable": result.plan.durable,
                    "faults": [asdict(f) for f in result.plan.faults],
                },
                "passed": result.passed,
                "accepted": result.accepted,
                "duration_s": result.duration,
                "invariants": [i.to_json() for i in result.invariants],
                "faults": result.faults,
                "self_exits": result.self_exits,
                "dead_letters": result.dead_letters,
                "timeline": [
                    {**asdict(s), "divergence": s.divergence, "orders": None, "view": None}
                    for s in result.samples
                ],
            },
            indent=1,
            default=str,
        )
    )
    (out / "report.md").write_text(markdown(result))
    plot(result, out / "timeline.png")
    return out / "report.md"


def markdown(result: Result) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    lines = [
        f"# Orders chaos run `{result.plan.name}`: {verdict}",
        "",
        f"{result.accepted} orders accepted at {result.plan.rate:g}/s, {len(result.faults)} "
        f"faults, {result.duration:.0f} s in all. Timeline: `timeline.png`.",
        "",
        checker.table(result.invariants),
        "",
    ]
    failing = [i for i in result.invariants if not i.passed]
    for inv in failing:
        lines += [f"**{inv.id} failed:**", *[f"- {d}" for d in inv.details], ""]
    lines += [
        "## Faults",
        "",
        "| fault | from s | to s | acted | evidence |",
        "|---|---|---|---|---|",
    ]
    for f in result.faults:
        lines.append(
            f"| {f['label']} | {f['start']:.1f} | {f['end']:.1f} | "
            f"{'yes' if f.get('acted') else 'NO'} | {f.get('evidence', '')} |"
        )
    lines += [
        "",
        "## Dead letters",
        "",
        "| DLQ | rk.id | reason | why it is there |",
        "|---|---|---|---|",
    ]
    expected = checker.expected_dead_letters(result.poison)
    for d in sorted(result.dead_letters, key=lambda d: (d["topic"], d["rk_id"])):
        why = expected.get((d["topic"], d["rk_id"]), d.get("exception") or "")
        lines.append(f"| {d['topic']} | {d['rk_id']} | {d['reason']} | {str(why)[:120]} |")
    if result.self_exits:
        lines += [
            "",
            "## Services that exited by themselves",
            "",
            *[f"- {e}" for e in result.self_exits],
        ]
    return "\n".join(lines) + "\n"


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    if not samples:
        return
    t = [s.t for s in samples]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    top.plot(t, [s.accepted for s in samples], label="accepted", color="#444")
    top.plot(
        t, [s.by_state.get("COMPLETED", 0) for s in samples], label="completed", color="#2a9d4b"
    )
    top.plot(
        t, [s.by_state.get("CANCELLED", 0) for s in samples], label="cancelled", color="#d62728"
    )
    top.set_ylabel("orders")
    bottom.plot(
        t,
        [sum(s.by_state.get(k, 0) for k in IN_FLIGHT) for s in samples],
        label="sagas in flight",
        color="#1f77b4",
    )
    bottom.plot(t, [s.divergence for s in samples], label="view behind (orders)", color="#ff7f0e")
    bottom.plot(
        t,
        [s.outbox_backlog for s in samples],
        label="outbox backlog",
        color="#9467bd",
        linewidth=0.8,
    )
    bottom.set_ylabel("orders / records")
    bottom.set_xlabel("seconds since the load started")
    for axis in (top, bottom):
        for f in result.faults:
            axis.axvspan(f["start"], f["end"], color="#f4a261", alpha=0.25)
        for a, b in _runs(samples, lambda s: s.breaker in ("open", "half-open")):
            axis.axvspan(a, b, ymin=0, ymax=0.04, color="#d62728", alpha=0.9)
    for f in result.faults:
        top.annotate(
            f["label"],
            (f["start"], top.get_ylim()[1]),
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
        )
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="upper right", fontsize=8, title="red band: breaker open", title_fontsize=7)
    top.set_title(
        f"orders chaos run {result.plan.name}: "
        f"{'PASS' if result.passed else 'FAIL'} (faults shaded)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _runs(samples: list[Sample], predicate: Callable[[Sample], bool]) -> list[tuple[float, float]]:
    """(start, end) of each run of consecutive samples for which ``predicate`` holds."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for s in samples:
        if predicate(s) and start is None:
            start = s.t
        elif not predicate(s) and start is not None:
            out.append((start, s.t))
            start = None
    if start is not None:
        out.append((start, samples[-1].t))
    return out
