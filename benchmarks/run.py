"""``python -m benchmarks``: every case in one run on one embedded broker, a table, targets, a plot.

python -m benchmarks [--quick | --full] [--json FILE] [--out DIR] [--no-peers]
                     [-b BOOTSTRAP] [--messages N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import _workload, cases, concurrency
from benchmarks._workload import preload
from benchmarks.cases import Result, Setup
from benchmarks.report import render, targets, write_plot
from resilient_kafka.metrics import client_version


@dataclass(frozen=True)
class Profile:
    messages: int  # per throughput case
    reps: int  # throughput cases run this many times, interleaved; the best run counts
    rss_messages: int
    latency_rate: int
    latency_seconds: float
    quix_messages: int
    faststream_messages: int
    warmup: float  # seconds each case lets the client prefetch before timing (see _workload)


PROFILES = {
    "smoke": Profile(2_000, 1, 5_000, 200, 1.0, 0, 0, 0.0),
    "quick": Profile(100_000, 1, 200_000, 1000, 2.0, 100_000, 3_000, 1.0),
    "full": Profile(200_000, 3, 1_000_000, 1000, 10.0, 200_000, 10_000, 3.0),
}


@dataclass(frozen=True)
class ConcurrencyProfile:
    """The concurrent-handler cases (benchmarks/concurrency.py) in a profile."""

    seconds: float  # each case's timed window
    records: int  # in their topic (1,000 keys)
    hot_records: int  # in the hot-key topic
    rss_seconds: float  # the hot-key RSS run
    cases: tuple[str, ...]


_QUICK_CONCURRENCY = tuple(case.name for case in concurrency.CASES if case.quick)
CONCURRENCY_PROFILES = {
    "smoke": ConcurrencyProfile(1.0, 3_000, 6_000, 3.0, ("sequential", "threads_64")),
    "quick": ConcurrencyProfile(3.0, 100_000, 200_000, 15.0, _QUICK_CONCURRENCY),
    "full": ConcurrencyProfile(
        10.0, 300_000, 200_000, 30.0, tuple(case.name for case in concurrency.CASES)
    ),
}

THROUGHPUT: dict[str, Callable[[Setup], Result]] = {
    "raw_consume": cases.raw_consume,
    "raw_poll": cases.raw_poll,
    "resilient_run_metrics_off": cases.resilient_run_metrics_off,
    "resilient_run_metrics_on": cases.resilient_run_metrics_on,
    "resilient_run_batches": cases.resilient_run_batches,
    "resilient_run_tracing_on": cases.resilient_run_tracing_on,
    "resilient_run_tracing_unsampled": cases.resilient_run_tracing_unsampled,
    "resilient_poll_loop": cases.resilient_poll_loop,
    "resilient_run_dedup_memory": cases.resilient_run_dedup_memory,
    "resilient_run_dedup_sqlite": cases.resilient_run_dedup_sqlite,
    "resilient_run_dedup_redis": cases.resilient_run_dedup_redis,
    "resilient_run_batches_dedup_sqlite": cases.resilient_run_batches_dedup_sqlite,
    "resilient_run_batches_dedup_redis": cases.resilient_run_batches_dedup_redis,
    "resilient_run_with_output": cases.resilient_run_with_output,
    "resilient_run_exactly_once": cases.resilient_run_exactly_once,
}
REDIS_CASES = {"resilient_run_dedup_redis", "resilient_run_batches_dedup_redis"}
OTHER = ("retry_10pct", "dlq_publish", "produce", "latency", "rss_growth")
PEERS = ("quixstreams", "faststream_confluent", "faststream_aiokafka")
# the concurrent-handler cases, named "concurrency_<case>" here; "--only concurrency" picks the
# profile's share of them and the hot-key RSS run
CONCURRENCY = {f"concurrency_{case.name}": case for case in concurrency.CASES}
HOT_KEY_RSS = "concurrency_hot_key_rss"
CONCURRENCY_PEERS = {name for name, case in CONCURRENCY.items() if case.peer}
QUIX_VERSION = "3.28.1"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "resilient-kafka" / "bench"


def quix_python(status: Callable[[str], None]) -> str:
    """A virtualenv with quixstreams (it pins confluent-kafka < 2.13, so never ours)."""
    venv = _cache_dir() / f"quixstreams-{QUIX_VERSION}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        status(f"creating a virtualenv with quixstreams {QUIX_VERSION} (once): {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"quixstreams=={QUIX_VERSION}"],
            check=True,
            capture_output=True,
        )
        (venv / ".ready").touch()
    return str(python)


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[dict[str, Any]]:
    if bootstrap:
        yield {"bootstrap.servers": bootstrap}
        return
    from resilient_kafka.testing import EmbeddedKafka

    with EmbeddedKafka() as kafka:
        yield kafka.producer_config()


def _create(config: dict[str, Any], topics: dict[str, int]) -> None:
    from confluent_kafka.admin import AdminClient

    from resilient_kafka._admin import create_topics

    admin = AdminClient(config)  # must outlive its futures
    create_topics(admin, topics, where=config["bootstrap.servers"])


def _progress() -> Any:
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # plain output without rich
        return None
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _one(case: Callable[..., Result], *args: Any) -> list[Result]:
    return [case(*args)]


def _concurrency_share(profile: ConcurrencyProfile) -> set[str]:
    share = {f"concurrency_{name}" for name in profile.cases}
    return share | {HOT_KEY_RSS} if profile.rss_seconds else share


def _concurrency_case(
    case: concurrency.Case, config: dict[str, Any], topics: dict[str, str], seconds: float
) -> list[Result]:
    r = case.run(config, topics[case.topic], seconds)
    extra = {"group": "concurrency", "ours": case.ours}
    extra.update(reorders=r["reorders"], overlaps=r["overlaps"])
    return [Result(f"concurrency_{case.name}", r["count"], r["elapsed"], case.note, extra)]


def _hot_key_rss(config: dict[str, Any], topic: str, seconds: float) -> list[Result]:
    r = concurrency.hot_key_rss(config, topic, seconds)
    shown = ("count", "elapsed", "records_per_s", "us_per_record")
    extra = {"group": "concurrency_rss", **{k: v for k, v in r.items() if k not in shown}}
    note = concurrency.describe_hot_key_rss(r)
    return [Result(HOT_KEY_RSS, r["count"], r["elapsed"], note, extra)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = PROFILES[args.profile]
    if args.messages:
        profile = replace(profile, messages=args.messages)
    conc = CONCURRENCY_PROFILES[args.profile]
    known = {*THROUGHPUT, *OTHER, *PEERS, *CONCURRENCY, HOT_KEY_RSS}
    wanted = set(args.only or [*THROUGHPUT, *OTHER, *PEERS, *_concurrency_share(conc)])
    if "concurrency" in wanted:
        wanted = (wanted - {"concurrency"}) | _concurrency_share(conc)
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.no_peers or args.profile == "smoke":
        wanted -= {*PEERS, *CONCURRENCY_PEERS}
    results: dict[str, Result] = {}
    runs: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    progress = _progress()
    steps: list[tuple[str, Callable[[], list[Result]]]] = []
    started = time.monotonic()

    def log(text: str) -> None:
        if progress is not None:
            progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    if args.profile == "smoke":
        _workload.GROUP_TIMING.update({"session.timeout.ms": 2000, "heartbeat.interval.ms": 500})
    with _broker(args.bootstrap) as config, progress or contextlib.nullcontext():
        run_id = uuid.uuid4().hex[:6]
        partitions = args.partitions
        main = Setup(config, f"bench-{run_id}", profile.messages, partitions, profile.warmup)
        topics = {main.topic: partitions}
        rss = replace(main, topic=f"bench-rss-{run_id}", count=profile.rss_messages)
        if "rss_growth" in wanted:
            topics[rss.topic] = partitions
        sink, lat = f"bench-sink-{run_id}", f"bench-latency-{run_id}"
        topics[sink] = partitions
        topics[f"{lat}.raw_poll_latency"] = topics[f"{lat}.resilient_run_latency"] = 1
        _create(config, topics)
        log(f"preloading {main.count:,} records into {main.topic} ({partitions} partitions)")
        preload(config, main.topic, main.count, partitions)
        if "rss_growth" in wanted:
            log(f"preloading {rss.count:,} records into {rss.topic}")
            preload(config, rss.topic, rss.count, partitions)
        conc_topics: dict[str, str] = {}
        if wanted & {*CONCURRENCY, HOT_KEY_RSS}:
            conc_topics = concurrency.create_and_preload(
                config, conc.records, conc.hot_records, log
            )

        for _ in range(profile.reps):  # interleaved repetitions: drift hits every case alike
            for name, case in THROUGHPUT.items():
                if name in wanted:
                    steps.append((name, functools.partial(_one, case, main)))
        if "retry_10pct" in wanted:
            steps.append(("retry_10pct", lambda: cases.retry_10pct(main)))
        if "dlq_publish" in wanted:
            steps.append(("dlq_publish", lambda: [cases.dlq_publish(main)]))
        if "produce" in wanted:
            steps.append(("produce", lambda: cases.produce(main, sink)))
        if "latency" in wanted:
            steps.append(
                (
                    "latency",
                    lambda: cases.latency(
                        main,
                        lat,
                        rate=profile.latency_rate,
                        seconds=profile.latency_seconds,
                        # the smoke profile's groups join in about 1 s (GROUP_TIMING below):
                        # 4 s leave room for a loaded machine
                        **({"warmup": 0.5, "join": 4.0} if args.profile == "smoke" else {}),
                    ),
                )
            )
        if "rss_growth" in wanted:
            steps.append(("rss_growth", lambda: [cases.rss_growth(rss)]))
        if "quixstreams" in wanted:

            def quix() -> list[Result]:
                python = quix_python(log)
                return [cases.peer("quixstreams", python, [], main, profile.quix_messages)]

            steps.append(("quixstreams", quix))
        for flavour in ("confluent", "aiokafka"):
            name = f"faststream_{flavour}"
            if name not in wanted:
                continue
            if importlib.util.find_spec("faststream") is None:
                skipped[name] = "faststream not installed (pip install -e '.[bench]')"
                continue
            count = min(profile.faststream_messages, main.count)
            peer = functools.partial(cases.peer, name, sys.executable, [flavour], main, count)
            steps.append((name, functools.partial(_one, peer)))
        for conc_name, conc_case in CONCURRENCY.items():
            if conc_name not in wanted:
                continue
            missing = concurrency.missing_peer(conc_case)
            if missing:
                skipped[conc_name] = missing
                continue
            steps.append(
                (
                    conc_name,
                    functools.partial(
                        _concurrency_case, conc_case, config, conc_topics, conc.seconds
                    ),
                )
            )
        if HOT_KEY_RSS in wanted:
            seconds = conc.rss_seconds or 10.0  # asked for by name (--only)
            steps.append(
                (HOT_KEY_RSS, functools.partial(_hot_key_rss, config, conc_topics["hot"], seconds))
            )

        task = progress.add_task("benchmarks", total=len(steps)) if progress else None
        for name, step in steps:
            if progress is not None:
                progress.update(task, description=name)
            else:
                log(f"running {name}")
            try:
                for result in step():
                    runs.setdefault(result.name, []).append(result.msgs_per_s)
                    best = results.get(result.name)
                    if best is None or result.msgs_per_s > best.msgs_per_s:
                        results[result.name] = result
            except Exception as exc:  # one broken case must not hide the others
                skipped[name] = f"{type(exc).__name__}: {exc}"
                log(f"[red]{name} failed: {exc}" if progress else f"{name} failed: {exc}")
            if progress is not None:
                progress.advance(task)

    return _document(args, profile, results, runs, skipped, time.monotonic() - started)


def _document(
    args: argparse.Namespace,
    profile: Profile,
    results: dict[str, Result],
    runs: dict[str, list[float]],
    skipped: dict[str, str],
    seconds: float,
) -> dict[str, Any]:
    import confluent_kafka

    raw = results.get("raw_consume")
    ceiling = raw.msgs_per_s if raw else 0.0
    sequential = results.get("concurrency_sequential")
    slowest = sequential.msgs_per_s if sequential else 0.0
    doc_cases = []
    for result in results.values():
        entry: dict[str, Any] = {
            "name": result.name,
            "note": result.note,
            "messages": result.count,
            **result.extra,
        }
        if result.elapsed > 0:
            entry.update(
                msgs_per_s=round(result.msgs_per_s, 1),
                us_per_msg=round(result.us_per_msg, 3),
                ratio_vs_raw=round(result.msgs_per_s / ceiling, 3) if ceiling else None,
                runs_msgs_per_s=[round(r, 1) for r in runs.get(result.name, [])],
            )
            if entry.get("group"):  # a 10 ms handler: compared with sequential, not raw
                entry["ratio_vs_raw"] = None
            if entry.get("group") == "concurrency":
                entry["ratio_vs_sequential"] = (
                    round(result.msgs_per_s / slowest, 2) if slowest else None
                )
        doc_cases.append(entry)
    return {
        "profile": args.profile,
        "messages": profile.messages,
        "repetitions": profile.reps,
        "partitions": args.partitions,
        "broker": args.bootstrap or "embedded Tansu (memory)",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "confluent_kafka": client_version(),
            "librdkafka": confluent_kafka.libversion()[0],
        },
        "seconds": round(seconds, 1),
        "cases": doc_cases,
        "skipped": skipped,
        "targets": targets(doc_cases),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput, latency and memory of resilient-kafka against raw "
        "confluent-kafka and its Python peers, measured in one run on one broker.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const="quick",
        help="about 4 minutes (2 of them the concurrent-handler cases)",
    )
    group.add_argument(
        "--full", dest="profile", action="store_const", const="full", help="(default)"
    )
    group.add_argument(
        "--smoke", dest="profile", action="store_const", const="smoke", help=argparse.SUPPRESS
    )
    parser.set_defaults(profile="full")
    parser.add_argument("--json", metavar="FILE", help="write the results document here")
    parser.add_argument(
        "--out", metavar="DIR", default="benchmark-report", help="report.md and throughput.png"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="skip quixstreams, faststream and arroyo"
    )
    parser.add_argument(
        "-b", "--bootstrap", help="an existing cluster instead of the embedded broker"
    )
    parser.add_argument("--messages", type=int, help="records per throughput case")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these cases ('concurrency': the concurrent-handler ones)",
    )
    args = parser.parse_args(argv)
    doc = run(args)
    markdown = render(doc)
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    plot = write_plot(doc, out / "throughput.png")
    if plot:
        print(f"\nplot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    broken = set(doc["skipped"]) - REDIS_CASES  # need redis-server
    return 1 if broken and args.profile == "smoke" else 0
