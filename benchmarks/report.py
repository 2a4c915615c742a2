"""The benchmark document as Markdown tables, the targets checked against it, and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PEER_NAMES = ("quixstreams", "faststream_confluent", "faststream_aiokafka")
# the concurrent-handler cases (benchmarks/concurrency.py) as the harness names them; their
# documents carry "group": "concurrency" (or "concurrency_rss") and stay out of the main table
CONCURRENT_PEERS_AT_64 = (
    "concurrency_faststream_64",
    "concurrency_faststream_aiokafka_64",
    "concurrency_arroyo_threads_64",
)
# 64 handlers that each wait 10 ms handle at most 6,400 records/s, whoever dispatches them
CONCURRENT_CEILING = 64 / 0.010
RSS_GROWTH_LIMIT_MB = 20.0
# µs a record each dedup store may add to run(): the memory store's target, and a tenth of what
# SQLite (83 µs) and Redis (226 µs) added before claims were batched
DEDUP_LIMITS_US = {"memory": 1.5, "sqlite": 8.3, "redis": 22.6}


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

    batches = _rate(cases, "resilient_run_batches")
    raw_poll, poll_loop = _rate(cases, "raw_poll"), _rate(cases, "resilient_poll_loop")
    check(
        "batch handler ≥ 0.8 x raw consume(1000)", batches / raw if batches and raw else None, 0.8
    )
    check(
        "run(), metrics on ≥ 3 x the fastest Python peer",
        on / max(peers) if on and peers else None,
        3.0,
    )
    check("metrics on ≥ 0.9 x metrics off", on / off if on and off else None, 0.9)
    _at_most(out, "run(), metrics on, over raw consume(1000)", on, raw, 1.5)
    _at_most(out, "drop-in poll() loop over raw poll()", poll_loop, raw_poll, 2.0)
    check(
        "main topic with 10% failing ≥ 0.8 x with 0% failing",
        retry_main / on if retry_main and on else None,
        0.8,
    )
    out.append(
        {
            "target": f"RSS growth over the run < {RSS_GROWTH_LIMIT_MB:.0f} MB",
            "measured": "n/a" if growth is None else f"{growth:.1f} MB",
            "value": growth,
            "met": None if growth is None else growth < RSS_GROWTH_LIMIT_MB,
        }
    )
    _concurrency_targets(cases, out)
    for store, limit in DEDUP_LIMITS_US.items():
        _at_most(
            out, f"dedup ({store}) added", _rate(cases, f"resilient_run_dedup_{store}"), on, limit
        )
    unsampled = _rate(cases, "resilient_run_tracing_unsampled")
    floor = _field(cases, "resilient_run_tracing_unsampled", "floor_us")
    if unsampled and on:
        added = 1e6 / unsampled - 1e6 / on
        out.append(
            {
                "target": "tracing, a provider sampling nothing: added cost near the API's floor",
                "measured": f"+{added:.2f} µs/record"
                + (f" (floor: a bare unsampled span, {floor:.2f} µs)" if floor else ""),
                "value": added,
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


def _at_most(
    out: list[dict[str, Any]], what: str, rate: float | None, base: float | None, limit: float
) -> None:
    """A target on the µs a record costs over another case's."""
    added = 1e6 / rate - 1e6 / base if rate and base else None
    out.append(
        {
            "target": f"{what} ≤ {limit:g} µs/record",
            "measured": "n/a" if added is None else f"+{added:.2f} µs",
            "value": added,
            "met": None if added is None else added <= limit,
        }
    )


def _concurrency_targets(cases: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    """The concurrency issue's targets, when its cases ran."""
    threads = _rate(cases, "concurrency_threads_64")
    peers = {name: _rate(cases, name) for name in CONCURRENT_PEERS_AT_64}
    ran = {name: rate for name, rate in peers.items() if rate}
    if threads and ran:
        faster = max(ran, key=lambda name: ran[name])
        ratio = threads / ran[faster]
        share, peer_share = threads / CONCURRENT_CEILING, ran[faster] / CONCURRENT_CEILING
        out.append(
            {
                "target": "run(), 64 threads ≥ 2 x the faster peer at 64 (handler waits 10 ms)",
                "measured": f"{ratio:.2f}x ({faster.removeprefix('concurrency_')}); "
                f"of the {CONCURRENT_CEILING:,.0f}/s ceiling: threads_64 {share:.0%}, "
                f"the peer {peer_share:.0%}",
                "value": ratio,
                "met": ratio >= 2.0,
            }
        )
    ours = [c for c in cases if c.get("group") == "concurrency" and c.get("ours")]
    if ours:
        reorders = sum(c.get("reorders", 0) for c in ours)
        overlaps = sum(c.get("overlaps", 0) for c in ours)
        records = sum(c.get("messages", 0) for c in ours)
        out.append(
            {
                "target": "concurrent run() keeps key order (0 reorders, 0 same-key overlaps)",
                "measured": f"{reorders} reorders, {overlaps} overlaps in {records:,} records",
                "value": reorders + overlaps,
                "met": reorders == 0 and overlaps == 0,
            }
        )
    growth = _field(cases, "concurrency_hot_key_rss", "rss_growth_mb")
    if growth is not None:
        held = _field(cases, "concurrency_hot_key_rss", "held_max")
        out.append(
            {
                "target": f"hot key, default bounds: RSS growth < {RSS_GROWTH_LIMIT_MB:.0f} MB "
                "(median, second half - first half)",
                "measured": f"{growth:+.1f} MB, at most {held:,} records held",
                "value": growth,
                "met": growth < RSS_GROWTH_LIMIT_MB,
            }
        )


def concurrency_markdown(cases: list[dict[str, Any]], work_ms: float = 10.0) -> list[str]:
    """The concurrent-handler cases as a Markdown table (and the hot-key RSS as a line), from
    entries with name, note, msgs_per_s, us_per_msg, ratio_vs_sequential, reorders, overlaps."""
    rows = [c for c in cases if c.get("group") == "concurrency" and c.get("msgs_per_s")]
    rss = [c for c in cases if c.get("group") == "concurrency_rss"]
    if not rows and not rss:
        return []
    lines = [
        f"Concurrent handlers (`python -m benchmarks.concurrency`): each handler waits "
        f"{work_ms:.0f} ms; 1,000 keys over 4 partitions; records handled in a fixed window "
        "after the first; reorders: a key's records reaching the handler's end out of offset "
        "order; overlaps: a record starting while another of its key runs.",
        "",
        "| case | records/s | x sequential | µs/record | reorders | overlaps | what |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in rows:
        ratio = case.get("ratio_vs_sequential")
        lines.append(
            f"| `{case['name']}` | {case['msgs_per_s']:,.0f} | "
            f"{'' if ratio is None else f'{ratio:,.1f}'} | {case['us_per_msg']:,.1f} | "
            f"{case.get('reorders', '')} | {case.get('overlaps', '')} | {case['note']} |"
        )
    for case in rss:
        lines += ["", f"Hot key, RSS (`{case['name']}`): {case['note']}."]
    return lines


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
        if not case.get("msgs_per_s") or case.get("group"):
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
    concurrency = concurrency_markdown(cases)
    if concurrency:
        lines += ["", *concurrency]
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
    bars = [case for case in doc["cases"] if case.get("msgs_per_s") and not case.get("group")]
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
