"""The benchmark harness runs end to end (a smoke profile: tiny counts, no peers). It checks
the harness, not speed: speed targets are ratios reported by `python -m benchmarks`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.run import REDIS_CASES
from resilient_kafka.testing import KafkaCluster

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {
    "raw_consume",
    "raw_poll",
    "resilient_run_metrics_off",
    "resilient_run_metrics_on",
    "resilient_run_batches",
    "resilient_run_tracing_on",
    "resilient_run_tracing_unsampled",
    "resilient_poll_loop",
    "retry_10pct_main_topic",
    "retry_10pct_retry_path",
    "dlq_publish",
    "raw_produce",
    "resilient_produce",
    "rss_growth",
}


def test_smoke_run_writes_the_json_document_table_and_plot(
    kafka: KafkaCluster, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "-b",
            kafka.bootstrap_servers,
            "--json",
            str(tmp_path / "bench.json"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    allowed = set() if os.environ.get("RK_REQUIRE_REDIS") else REDIS_CASES
    assert set(doc["skipped"]) <= allowed, doc["skipped"]
    by_name = {case["name"]: case for case in doc["cases"]}
    assert set(by_name) >= REQUIRED, REQUIRED - set(by_name)
    for name in REQUIRED:
        case = by_name[name]
        assert case["msgs_per_s"] > 0 and case["us_per_msg"] > 0, case
        assert case["ratio_vs_raw"] is not None
    assert by_name["raw_consume"]["ratio_vs_raw"] == 1.0
    assert {"p50_ms", "p99_ms"} <= set(by_name["resilient_run_latency"])
    assert by_name["resilient_run_latency"]["p50_ms"] > 0
    targets = {t["target"]: t for t in doc["targets"]}
    assert len(targets) >= 6 and all("measured" in t for t in targets.values())
    for name in (
        "batch handler ≥ 0.8 x raw consume(1000)",
        "dedup (sqlite) added ≤ 8.3 µs/record",
        "run(), metrics on, over raw consume(1000) ≤ 1.5 µs/record",
    ):
        assert targets[name]["value"] is not None, name
    floor = targets["tracing, a provider sampling nothing: added cost near the API's floor"]
    assert "floor: a bare unsampled span" in floor["measured"]
    report = (out / "report.md").read_text()
    assert "| `resilient_run_metrics_on` |" in report and "| target |" in report
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_case_names_are_rejected(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope", "-b", "127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "unknown case(s): nope" in done.stderr


def test_the_cli_runs_the_same_harness() -> None:
    import pytest

    from resilient_kafka.cli import main

    with pytest.raises(SystemExit, match="unknown case"):
        main(["bench", "--only", "nope", "-b", "127.0.0.1:1"])


def test_layer_profile_measures_each_case_in_the_tree_it_is_given() -> None:
    """`python -m benchmarks.layer` (no broker) prints one row per case with a time per
    record, measured with resilient_kafka imported from the tree named (a child checks)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.layer", "--repeat", "1", "--records", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "µs" in line]
    cases = [row.split("|")[1].strip() for row in rows]
    from benchmarks.layer import CASES

    assert cases == list(CASES) and "batches_metrics_on" in cases
    for row in rows:
        assert 0 < float(row.split("|")[2].split()[0]) < 1000, row
