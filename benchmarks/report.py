"""The benchmark document as Markdown tables, the targets checked against it, and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PEER_NAMES = ("quixstreams", "faststream_confluent", "faststream_aiokafka")


def _rate(cases: list[dict[str, Any]], name: str) -> float | None:
    for case in cases:
        if case["name"] == name and case.get("msgs_per_s"):
            return float(case["msgs_per_s"])
    return None


def _field(cases: list[dict[str, Any]], name: str, key: str) -> Any:
    return next((case.get(key) for case in cases if case["name"] == name), None)


def targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmarks issue's targets; ``met`` is None when a case needed for one did not run."""
    on = _rate(cases, "resilient_run_metrics_on")
    off = _rate(cases, "resilient_run_metrics_off")
    raw = _rate(cases, "raw_consume")
    retry_main = _rate(cases, "retry_10pct_main_topic")
    peers = [r for r in (_rate(cases, name) for name in PEER_NAMES) if r]
    growth = _field(cases, "rss_growth", "rss_growth_mb")
    out = []

    def check(target: str, value: float | None, goal: float, unit: str = "x") -> None:
        met = None if value is None else value >= goal
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        out.append({"target": target, "measured": shown, "value": value, "met": met})

    check("run, metrics on ≥ 0.8 x raw consume(1000)", on / raw if on and raw else None, 0.8)
    check("metrics on ≥ 0.9 x metrics off", on / off if on and off else None, 0.9)
    check("≥ 3 x the fastest Python peer", on / max(peers) if on and peers else None, 3.0)
    check(
        "main topic with 10% failing ≥ 0.8 x with 0% failing",
        retry_main / on if retry_main and on else None,
        0.8,
    )
    out.append(
        {
            "target": "RSS growth over the run < 20 MB",
            "measured": "n/a" if growth is None else f"{growth:.1f} MB",
            "value": growth,
            "met": None if growth is None else growth < 20,
        }
    )
    for store in ("memory", "sqlite", "redis"):
        rate = _rate(cases, f"resilient_run_dedup_{store}")
        if rate and on:
            out.append(
                {
                    "target": f"dedup ({store}): cost per record (reported, no target)",
                    "measured": f"+{1e6 / rate - 1e6 / on:.1f} µs/record ({rate / on:.2f}x)",
                    "value": rate / on,
                    "met": "reported",
                }
            )
    output, exactly_once = (
        _rate(cases, "resilient_run_with_output"),
        _rate(cases, "resilient_run_exactly_once"),
    )
    if output and exactly_once:
        out.append(
            {
                "target": "exactly-once: cost per record over at-least-once (reported)",
                "measured": f"+{1e6 / exactly_once - 1e6 / output:.1f} µs/record "
                f"({exactly_once / output:.2f}x)",
                "value": exactly_once / output,
                "met": "reported",
            }
        )
    out.append(
        {
            "target": "tracing not configured costs nothing",
            "measured": "no tracing code runs without a provider (one `is None` check)",
            "value": None,
            "met": True,
        }
    )
    return out


def render(doc: dict[str, Any]) -> str:
    cases = doc["cases"]
    machine = doc["machine"]
    lines = [
        f"## Benchmarks ({doc['profile']} profile, {doc['seconds']:.0f} s)",
        "",
        f"{doc['messages']:,} x 100 B records per case over {doc['partitions']} partitions, "
        f"best of {doc['repetitions']}; broker: {doc['broker']}; Python {machine['python']}, "
        f"{machine['cpus']} CPUs, confluent-kafka {machine['confluent_kafka']} "
        f"(librdkafka {machine['librdkafka']}).",
        "",
        "| case | msgs/s | µs/msg | x raw_consume | what |",
        "|---|---:|---:|---:|---|",
    ]
    for case in cases:
        if not case.get("msgs_per_s"):
            continue
        ratio = case.get("ratio_vs_raw")
        lines.append(
            f"| `{case['name']}` | {case['msgs_per_s']:,.0f} | {case['us_per_msg']:.2f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {case['note']} |"
        )
    latency = [case for case in cases if "p50_ms" in case]
    if latency:
        lines += [
            "",
            "| latency case | p50 ms | p99 ms | samples | what |",
            "|---|---:|---:|---:|---|",
        ]
        for case in latency:
            lines.append(
                f"| `{case['name']}` | {case['p50_ms']:.1f} | {case['p99_ms']:.1f} | "
                f"{_field(cases, case['name'], 'messages') or ''} | {case['note']} |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in doc["targets"]:
        met = {True: "met", False: "**not met**", None: "not measured"}.get(
            target["met"], str(target["met"])
        )
        lines.append(f"| {target['target']} | {target['measured']} | {met} |")
    if doc["skipped"]:
        lines += ["", "Not measured:"]
        lines += [f"- `{name}`: {why}" for name, why in doc["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Horizontal throughput bars (log scale: the peers span two orders of magnitude)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = [case for case in doc["cases"] if case.get("msgs_per_s")]
    if not bars:
        return None
    bars.sort(key=lambda case: case["msgs_per_s"])
    colours = [
        "#888888"
        if case["name"].startswith("raw")
        else "#d62728"
        if case["name"] in PEER_NAMES
        else "#1f77b4"
        for case in bars
    ]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(bars) + 1.5))
    ax.barh([case["name"] for case in bars], [case["msgs_per_s"] for case in bars], color=colours)
    for y, case in enumerate(bars):
        ax.text(case["msgs_per_s"], y, f" {case['msgs_per_s']:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(
        "messages per second (log scale); grey raw confluent-kafka, blue resilient-kafka, red peers"
    )
    ax.set_title(f"Throughput, {doc['profile']} profile, {doc['broker']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
