"""``python -m benchmarks.concurrency``: run() with concurrent handlers, against sequential and
against the peers' concurrent consumers.

Every case reads the same preloaded topic (1,000 keys over 4 partitions) with a fresh group,
and a handler that waits 10 ms (``time.sleep``, or ``asyncio.sleep`` for the ``async def``
cases). Each case counts the records handled in a fixed window after its first one; the
table gives records/s and the ratio to sequential in the same run, and checks key order:
reorders (a key's records must reach the handler's end in offset order) and overlaps (a record
must not start while another of its key runs; reorders alone miss order kept by luck of
timing). ``noop_threads_64`` has a handler that does nothing: its µs/record against
``raw_consume`` is the cost of dispatch.

The peers do the same job in processes of their own (``peers/``): FastStream's concurrent
subscriber (``max_workers=64``, an ``async def`` handler; confluent and aiokafka) and
sentry-arroyo's ``RunTaskInThreads`` (64 threads, then its ``CommitOffsets`` step). Their
reorders and overlaps are counted by the same code (``peers/_window.py``); on the 1,000-key
topic a key comes back only every ~250 records of its partition, so a peer that keeps no order
can still show none there: the ``*_hot_key_64`` rows (one key carries half the records) are
the ones that can show it. ``hot_key_rss`` runs ``run(handler, concurrency=64)`` with the
default bounds in a fresh process over the hot-key topic and samples its RSS
(``benchmarks/hot_key_rss.py``).

``python -m benchmarks`` runs these cases too, named ``concurrency_<case>`` (``--quick``: a
share of them, 3 s each, and a 15 s RSS run; ``--only concurrency``: just them).

python -m benchmarks.concurrency [-b BOOTSTRAP] [--seconds S] [--rss-seconds S] [--no-peers]
                                 [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from benchmarks._workload import consumer_config
from benchmarks.peers._window import Window
from benchmarks.report import concurrency_markdown
from resilient_kafka import ResilientConsumer

KEYS = 1000
PARTITIONS = 4
WORK = 0.010  # seconds each handler waits
PEER_CONCURRENCY = 64  # the peers' concurrency, and the target's (threads_64 ≥ 2 x the peers)
RECORDS = 100_000  # in the main topic
HOT_RECORDS = 200_000  # in the hot-key topic, half of them key "hot"
PEERS_DIR = Path(__file__).parent / "peers"
ROOT = Path(__file__).resolve().parent.parent


def preload(config: dict[str, Any], topic: str, count: int, hot_share: float = 0.0) -> None:
    """``count`` 100-byte records over ``KEYS`` keys (partitioned by key); with ``hot_share``,
    that share of them has the key ``hot``."""
    producer = Producer({**config, "linger.ms": 20, "acks": "all"})
    hot_every = int(1 / hot_share) if hot_share else 0
    failures: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err)

    for i in range(count):
        key = "hot" if hot_every and i % hot_every == 0 else f"key-{i % KEYS}"
        while True:
            try:
                producer.produce(topic, b"v" * 100, key.encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) or failures:
        raise RuntimeError(f"preloading {topic} failed: {failures[:3] or 'flush timed out'}")


class _Window(Window):
    """The shared window, plus this process's RSS every 500 counted records."""

    def __init__(self, seconds: float, stop: Callable[[], None]) -> None:
        super().__init__(seconds, stop)
        self.rss_kb: list[int] = []

    def begin_msg(self, msg: Any) -> None:
        self.begin(msg.partition(), msg.key())

    def handled_msg(self, msg: Any) -> None:
        if self.handled(msg.partition(), msg.key(), msg.offset()) and self.count % 500 == 0:
            self.rss_kb.append(_rss_kb())


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _figures(count: int, elapsed: float, reorders: int, overlaps: int = 0) -> dict[str, Any]:
    rate = count / elapsed if elapsed > 0 else 0.0
    return {
        "count": count,
        "elapsed": elapsed,
        "records_per_s": rate,
        "us_per_record": 1e6 / rate if rate else 0.0,
        "reorders": reorders,
        "overlaps": overlaps,
    }


def resilient(
    config: dict[str, Any],
    topic: str,
    seconds: float,
    *,
    asynchronous: bool,
    work: float = WORK,
    **run: Any,
) -> dict[str, Any]:
    consumer = ResilientConsumer(consumer_config(config), registry=CollectorRegistry())
    window = _Window(seconds, consumer.stop)
    if asynchronous:

        async def handler(msg: Any) -> None:
            window.begin_msg(msg)
            await asyncio.sleep(work)
            window.handled_msg(msg)

        run_handler: Any = handler
    else:

        def plain(msg: Any) -> None:
            window.begin_msg(msg)
            if work:
                time.sleep(work)
            window.handled_msg(msg)

        run_handler = plain
    consumer.subscribe([topic])
    consumer.run(run_handler, **run)
    rss = window.rss_kb
    return {
        **_figures(window.count, window.elapsed, window.reorders, window.overlaps),
        "rss_growth_mb": (max(rss) - rss[0]) / 1024 if len(rss) > 1 else 0.0,
    }


def raw_consume(config: dict[str, Any], topic: str, seconds: float) -> dict[str, Any]:
    consumer = Consumer(consumer_config(config))
    consumer.subscribe([topic])
    count, started, last = 0, 0.0, 0.0
    try:
        while not started or (time.perf_counter() - started < seconds):
            batch = consumer.consume(1000, 1.0)
            if not batch and started:
                break  # the topic is read to its end
            for msg in batch:
                if msg.error() is not None:
                    continue
                now = time.perf_counter()
                if not started:
                    started = now
                elif now - started <= seconds:
                    count += 1
                    last = now
    finally:
        consumer.close()
    return _figures(count, last - started if last > started else 0.0, 0)


def _child(command: list[str], what: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def faststream(
    config: dict[str, Any],
    topic: str,
    seconds: float,
    workers: int = PEER_CONCURRENCY,
    flavour: str = "confluent",
) -> dict[str, Any]:
    """FastStream (``confluent`` or ``aiokafka``) with ``max_workers``, in its own process."""
    out = _child(
        [
            sys.executable,
            str(PEERS_DIR / "faststream_concurrent_peer.py"),
            flavour,
            config["bootstrap.servers"],
            topic,
            str(seconds),
            str(workers),
            str(WORK),
        ],
        f"faststream ({flavour})",
        timeout=seconds + 120,
    )
    return _figures(out["count"], out["elapsed"], out["reorders"], out["overlaps"])


def arroyo(
    config: dict[str, Any], topic: str, seconds: float, threads: int = PEER_CONCURRENCY
) -> dict[str, Any]:
    """sentry-arroyo's RunTaskInThreads + CommitOffsets, in its own process."""
    out = _child(
        [
            sys.executable,
            str(PEERS_DIR / "arroyo_peer.py"),
            config["bootstrap.servers"],
            topic,
            str(seconds),
            str(threads),
            str(WORK),
        ],
        "arroyo",
        timeout=seconds + 120,
    )
    return _figures(out["count"], out["elapsed"], out["reorders"], out["overlaps"])


def hot_key_rss(
    config: dict[str, Any], topic: str, seconds: float, concurrency: int = PEER_CONCURRENCY
) -> dict[str, Any]:
    """RSS of a fresh process running ``run(handler, concurrency=64)`` with the default bounds
    over the hot-key topic (``benchmarks/hot_key_rss.py``), sampled every 0.25 s.

    librdkafka's fetch responses come and go (tens of MB for a moment, when a paused partition
    resumes), so single samples are noisy: the figures are the median RSS over the first and the
    second half of the window after its first 10% (``rss_early_mb``, ``rss_late_mb``; growth is
    their difference), the highest sample, the records run() held (highest) and the blocks
    Python's allocator held (median, early and late). Every sample is kept as [seconds, RSS MB,
    records held, librdkafka fetchq MB, Python blocks]."""
    out = _child(
        [
            sys.executable,
            "-m",
            "benchmarks.hot_key_rss",
            json.dumps(config),
            topic,
            str(seconds),
            str(concurrency),
            str(WORK),
        ],
        "hot_key_rss",
        timeout=seconds + 180,
    )
    samples = [
        (t, rss / 2**20, held, fetchq / 2**20, blocks)
        for t, rss, held, fetchq, blocks in out["samples"]
    ]
    warm = max(1.0, seconds / 10)
    middle = (warm + seconds) / 2
    early = [s for s in samples if warm <= s[0] < middle]
    late = [s for s in samples if s[0] >= middle]
    if not early or not late:
        raise RuntimeError(f"hot_key_rss: too few RSS samples ({len(samples)})")
    rss_early = statistics.median(s[1] for s in early)
    rss_late = statistics.median(s[1] for s in late)
    return {
        **_figures(out["count"], out["elapsed"], out["reorders"], out["overlaps"]),
        "hot_records": out["hot"],
        "seconds": seconds,
        "rss_first_mb": round(samples[0][1], 1),
        "rss_early_mb": round(rss_early, 1),
        "rss_late_mb": round(rss_late, 1),
        "rss_max_mb": round(max(s[1] for s in samples), 1),
        "rss_growth_mb": round(rss_late - rss_early, 2),
        "held_max": max(s[2] for s in samples),
        # librdkafka's own count (fetchq_size over the partitions): a trend, not resident bytes
        "fetchq_max_mb": round(max(s[3] for s in samples), 1),
        "python_blocks_early": int(statistics.median(s[4] for s in early)),
        "python_blocks_late": int(statistics.median(s[4] for s in late)),
        "samples": [[round(s[0], 2), round(s[1], 1), s[2], round(s[3], 1), s[4]] for s in samples],
    }


def describe_hot_key_rss(r: dict[str, Any]) -> str:
    """One sentence for the tables."""
    seconds = r["seconds"]
    warm = max(1.0, seconds / 10)
    middle = (warm + seconds) / 2
    return (
        f"run(handler, concurrency={PEER_CONCURRENCY}), default bounds, {seconds:.0f} s: "
        f"{r['count']:,} records ({r['hot_records']:,} of the hot key), {r['reorders']} "
        f"reorders, {r['overlaps']} overlaps; RSS median {r['rss_early_mb']:.1f} MB over "
        f"{warm:.0f}-{middle:.0f} s, {r['rss_late_mb']:.1f} MB over {middle:.0f}-{seconds:.0f} s "
        f"({r['rss_growth_mb']:+.1f} MB; highest {r['rss_max_mb']:.1f} MB), at most "
        f"{r['held_max']:,} records held by run(), Python allocator blocks "
        f"{r['python_blocks_early']:,} → {r['python_blocks_late']:,} (medians)"
    )


@dataclass(frozen=True)
class Case:
    name: str
    topic: str  # "main" or "hot"
    note: str
    run: Callable[[dict[str, Any], str, float], dict[str, Any]]
    peer: bool = False
    ours: bool = True  # resilient-kafka's run(): its key order is checked
    quick: bool = True  # in `python -m benchmarks --quick`


def _ours(**options: Any) -> Callable[[dict[str, Any], str, float], dict[str, Any]]:
    return lambda config, topic, seconds: resilient(config, topic, seconds, **options)


CASES = (
    Case(
        "raw_consume",
        "main",
        "Consumer.consume(1000), no handler",
        raw_consume,
        ours=False,
        quick=False,
    ),
    Case("sequential", "main", "run(handler), time.sleep", _ours(asynchronous=False)),
    Case(
        "threads_16",
        "main",
        "concurrency=16, threads",
        _ours(asynchronous=False, concurrency=16),
        quick=False,
    ),
    Case(
        "threads_64", "main", "concurrency=64, threads", _ours(asynchronous=False, concurrency=64)
    ),
    Case(
        "asyncio_64",
        "main",
        "concurrency=64, async def, asyncio.sleep",
        _ours(asynchronous=True, concurrency=64),
    ),
    Case(
        "asyncio_100",
        "main",
        "concurrency=100, async def, asyncio.sleep",
        _ours(asynchronous=True, concurrency=100),
        quick=False,
    ),
    Case(
        "asyncio_1000",
        "main",
        "concurrency=1000, async def, asyncio.sleep",
        _ours(asynchronous=True, concurrency=1000),
    ),
    Case(
        "hot_key_threads_64",
        "hot",
        "concurrency=64, threads; one key carries half the records",
        _ours(asynchronous=False, concurrency=64),
    ),
    Case(
        "noop_threads_64",
        "main",
        "concurrency=64, threads, handler does nothing",
        _ours(asynchronous=False, work=0.0, concurrency=64),
    ),
    Case(
        "faststream_64",
        "main",
        "FastStream (confluent) max_workers=64, async def, asyncio.sleep; own process",
        faststream,
        peer=True,
        ours=False,
    ),
    Case(
        "faststream_aiokafka_64",
        "main",
        "FastStream (aiokafka) max_workers=64, async def, asyncio.sleep; own process",
        functools.partial(faststream, flavour="aiokafka"),
        peer=True,
        ours=False,
    ),
    Case(
        "arroyo_threads_64",
        "main",
        "sentry-arroyo RunTaskInThreads(concurrency=64) + CommitOffsets, time.sleep; own process",
        arroyo,
        peer=True,
        ours=False,
    ),
    Case(
        "faststream_hot_key_64",
        "hot",
        "faststream_64 over the hot-key topic",
        faststream,
        peer=True,
        ours=False,
    ),
    Case(
        "arroyo_hot_key_64",
        "hot",
        "arroyo_threads_64 over the hot-key topic",
        arroyo,
        peer=True,
        ours=False,
        quick=False,
    ),
)
PEER_MODULES = {  # what each peer case imports
    "faststream_64": ("faststream", "confluent_kafka"),
    "faststream_aiokafka_64": ("faststream", "aiokafka"),
    "arroyo_threads_64": ("arroyo",),
    "faststream_hot_key_64": ("faststream", "confluent_kafka"),
    "arroyo_hot_key_64": ("arroyo",),
}
# the target: threads_64 ≥ 2 x the faster of these (same topic, same concurrency)
PEERS_AT_64 = ("faststream_64", "faststream_aiokafka_64", "arroyo_threads_64")


def missing_peer(case: Case) -> str | None:
    """Why a peer case cannot run here (its package is not installed), else None."""
    for module in PEER_MODULES.get(case.name, ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install -e '.[bench]')"
    return None


def create_and_preload(
    config: dict[str, Any], records: int, hot_records: int, log: Callable[[str], None]
) -> dict[str, str]:
    """The two topics (``records`` over 1,000 keys; ``hot_records``, half of them one key),
    created and preloaded; returns {"main": topic, "hot": topic}."""
    from confluent_kafka.admin import AdminClient

    from resilient_kafka._admin import create_topics

    run_id = uuid.uuid4().hex[:6]
    topics = {"main": f"bench-conc-{run_id}", "hot": f"bench-conc-hot-{run_id}"}
    admin = AdminClient({"bootstrap.servers": config["bootstrap.servers"]})
    create_topics(admin, dict.fromkeys(topics.values(), PARTITIONS), where="the benchmark broker")
    started = time.monotonic()
    log(f"preloading {records:,} + {hot_records:,} records (concurrency topics)")
    preload(config, topics["main"], records)
    preload(config, topics["hot"], hot_records, hot_share=0.5)
    log(f"preloaded in {time.monotonic() - started:.0f}s")
    return topics


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[dict[str, Any]]:
    if bootstrap:
        yield {"bootstrap.servers": bootstrap}
        return
    from resilient_kafka.testing import EmbeddedKafka

    with EmbeddedKafka() as kafka:
        yield kafka.producer_config()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrency")
    parser.add_argument("-b", "--bootstrap", help="an existing cluster")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed window per case")
    parser.add_argument(
        "--rss-seconds", type=float, default=15.0, help="the hot-key RSS run (0: skip it)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip FastStream and arroyo")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the table here (as in the harness's report)")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with _broker(args.bootstrap) as config:
        topics = create_and_preload(
            config, RECORDS, HOT_RECORDS, lambda text: console.print(f"[dim]{text}[/dim]")
        )
        for case in CASES:
            why = "--no-peers" if case.peer and args.no_peers else missing_peer(case)
            if why:
                skipped[case.name] = why
                continue
            console.print(f"[dim]running {case.name}…[/dim]")
            try:
                results[case.name] = {
                    **case.run(config, topics[case.topic], args.seconds),
                    "note": case.note,
                }
            except Exception as exc:  # one broken case must not hide the others
                skipped[case.name] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{case.name} failed: {exc}")
        rss: dict[str, Any] = {}
        if args.rss_seconds:
            console.print(f"[dim]running hot_key_rss ({args.rss_seconds:.0f} s)…[/dim]")
            try:
                rss = hot_key_rss(config, topics["hot"], args.rss_seconds)
            except Exception as exc:
                skipped["hot_key_rss"] = f"{type(exc).__name__}: {exc}"
    sequential = results.get("sequential", {}).get("records_per_s", 0.0)
    table = Table(title=f"run() concurrency, handler waits {WORK * 1000:.0f} ms")
    columns = ("case", "records/s", "x sequential", "µs/record", "reorders", "overlaps", "RSS +MB")
    for column in columns:
        table.add_column(column, justify="right" if column != "case" else "left", no_wrap=True)
    for name, r in results.items():
        ratio = r["records_per_s"] / sequential if sequential else 0.0
        r["vs_sequential"] = ratio
        table.add_row(
            name,
            f"{r['records_per_s']:,.0f}",
            f"{ratio:,.1f}",
            f"{r['us_per_record']:,.1f}",
            str(r["reorders"]),
            str(r["overlaps"]),
            f"{r['rss_growth_mb']:.1f}" if "rss_growth_mb" in r else "",
        )
    console.print(table)
    peers = {n: results[n]["records_per_s"] for n in PEERS_AT_64 if n in results}
    verdict = ""
    if "threads_64" in results and peers:
        faster = max(peers, key=lambda n: peers[n])
        verdict = (
            f"threads_64 / the faster peer at {PEER_CONCURRENCY} ({faster}): "
            f"{results['threads_64']['records_per_s'] / peers[faster]:.2f}x (target ≥ 2x)"
        )
        console.print(verdict)
    if rss:
        results["hot_key_rss"] = rss
        console.print(f"hot_key_rss: {describe_hot_key_rss(rss)}")
    for name, why in skipped.items():
        console.print(f"[yellow]not measured: {name}: {why}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**results, "skipped": skipped}, out, indent=2)
    if args.markdown:
        entries = [
            {
                "name": name,
                "note": r["note"],
                "group": "concurrency",
                "msgs_per_s": r["records_per_s"],
                "us_per_msg": r["us_per_record"],
                "ratio_vs_sequential": r["vs_sequential"],
                "reorders": r["reorders"],
                "overlaps": r["overlaps"],
            }
            for name, r in results.items()
            if name != "hot_key_rss"
        ]
        if rss:
            note = describe_hot_key_rss(rss)
            entries.append({"name": "hot_key_rss", "group": "concurrency_rss", "note": note})
        lines = concurrency_markdown(entries, WORK * 1000)
        if verdict:
            lines += ["", verdict + "."]
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
