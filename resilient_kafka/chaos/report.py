"""The chaos report: report.json, a Markdown summary and a PNG timeline per scenario."""

from __future__ import annotations

import json
import shutil
from collections import deque
from pathlib import Path
from typing import Any

from resilient_kafka.chaos.runner import Result

COLUMNS = (
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
)


def _recovery(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [
        "# Chaos report",
        "",
        f"{meta.get('topology', '')}; {meta.get('messages')} messages per scenario, load "
        f"{meta.get('duration')} s, seed {meta.get('seed')}.",
        "",
        "| scenario | produced | acked | processed | DLQ | lost | duplicates | reorders "
        "| producer reorders | recovery s | max stall s | partition stall s | elapsed s "
        "| result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        verdict = f"skipped: {r.skipped}" if r.skipped else ("PASS" if r.passed else "**FAIL**")
        lines.append(
            f"| `{r.name}` | {r.produced} | {r.acknowledged} | {r.processed} | {r.dead_lettered} "
            f"| {r.lost} | {r.duplicates} | {r.reorders} | {r.producer_reorders} "
            f"| {_recovery(r.recovery_seconds)} | {r.max_stall_seconds:.1f} "
            f"| {r.max_partition_stall_seconds:.1f} | {r.elapsed_seconds:.1f} | {verdict} |"
        )
    lines.append("")
    for r in results:
        if r.failures:
            lines.append(f"- `{r.name}`: " + "; ".join(r.failures))
        if r.downstream_duplicates:
            lines.append(
                f"- `{r.name}`: {r.downstream_duplicates} downstream call(s) repeated after a "
                "crash between the call and the dedup mark (dedup's documented window)"
            )
    lines += [
        "",
        "lost = acknowledged ids neither processed nor dead-lettered; duplicates = side effects "
        "beyond one per id (must be 0 with dedup on); reorders = records a consumer handled "
        "after a later record (higher offset) of their key, retried ones aside (must be 0 with "
        "ordering key or partition); producer reorders = records the load's producer put in "
        "the log after a later one of their key (re-sends after failed deliveries; reported); "
        "recovery = time from a fault's end until everything acknowledged by then is handled; "
        "max stall = the longest time no record was handled; partition stall = the longest "
        "time between two records of one partition handled (retried ones aside); "
        "elapsed = from the load's start until everything was handled; timelines in "
        "`timeline-<scenario>.png`.",
        "",
    ]
    return "\n".join(lines)


def plot(result: Result, path: Path) -> bool:
    """Processed and acknowledged messages per second, fault windows shaded; False without
    matplotlib (the ``chaos`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = result.timeline
    if len(points) < 2:
        return False
    times = [p[0] for p in points]

    def rate(i: int) -> list[float]:
        return [
            (points[k][i] - points[k - 1][i]) / max(1e-9, times[k] - times[k - 1])
            for k in range(1, len(points))
        ]

    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot(times[1:], rate(1), label="acknowledged by the broker /s", color="#999999")
    ax.plot(times[1:], rate(2), label="processed /s", color="#1f77b4", linewidth=2)
    for window in result.faults:
        end = window["end"] if window["end"] is not None else times[-1]
        ax.axvspan(window["start"], end, color="#d62728", alpha=0.15)
        ax.text(window["start"], ax.get_ylim()[1] * 0.92, " " + window["label"], fontsize=8)
    verdict = "PASS" if result.passed else ("skipped" if result.skipped else "FAIL")
    ax.set_title(
        f"{result.name}: {verdict} — lost {result.lost}, duplicates {result.duplicates}, "
        f"recovery {_recovery(result.recovery_seconds)} s"
    )
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("messages / s")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: list[Result], directory: Path, meta: dict[str, Any]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "scenarios": [{**{k: r.to_json()[k] for k in COLUMNS}, **r.to_json()} for r in results],
        **meta,
    }
    written = [directory / "report.json", directory / "report.md"]
    written[0].write_text(json.dumps(doc, indent=2) + "\n")
    written[1].write_text(markdown(results, meta))
    for r in results:
        png = directory / f"timeline-{r.name}.png"
        if plot(r, png):
            written.append(png)
    return written


def keep_evidence(workdir: Path, directory: Path, lines: int = 25) -> str:
    """A failed scenario's worker and producer logs, ledger and acknowledgements, copied to
    ``directory`` (emptied first; the workdir is deleted after the run); returns each log's
    last ``lines`` own lines (librdkafka's ``%`` lines left out), for a CI log that is all one
    gets to see. Nothing is copied when the scenario left no workdir."""
    if not workdir.is_dir():
        return ""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tails = []
    for path in sorted(workdir.iterdir()):
        if not path.is_file():
            continue
        shutil.copy2(path, directory / path.name)
        if path.suffix == ".log":
            own: deque[str] = deque(maxlen=lines)
            count = 0
            with path.open(errors="replace") as log:
                for line in log:
                    if line.strip() and not line.startswith("%"):
                        own.append(line.rstrip("\n"))
                        count += 1
            tails.append(f"--- {path.name} (last {len(own)} of {count} lines)")
            tails.extend(own)
    return "\n".join(tails)
