"""RSS of one ``ResilientConsumer.run(handler, concurrency=N)`` in a fresh process, over a topic
where one key carries half the records, every handler waiting WORK seconds, with the default
bounds (``max_buffered``, ``max_buffered_per_partition``): the hot key's records run one at a
time, in order, while the other keys go past them, so the records queued behind it must stay
bounded. From the first record, every 0.25 s for SECONDS, it samples the RSS, the records
run() holds (its ``records_buffered`` gauge), the partitions' ``fetchq_size`` in librdkafka's
statistics (every 0.5 s; its own count of prefetched bytes) and the blocks Python's allocator
holds:

python -m benchmarks.hot_key_rss CONFIG_JSON TOPIC SECONDS CONCURRENCY WORK
    → {"samples": [[seconds, rss_bytes, buffered, fetchq_bytes, python_blocks], ...],
       "count", "elapsed", "reorders", "overlaps", "hot"}
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks._workload import consumer_config, rss_bytes
from benchmarks.peers._window import Window
from resilient_kafka import ResilientConsumer

INTERVAL = 0.25


def main(config: dict[str, Any], topic: str, seconds: float, concurrency: int, work: float) -> None:
    fetchq = [0]

    def stats(text: str) -> None:
        total = 0
        for t in json.loads(text).get("topics", {}).values():
            for p in t.get("partitions", {}).values():
                total += max(0, int(p.get("fetchq_size", 0)))
        fetchq[0] = total

    registry = CollectorRegistry()
    consumer = ResilientConsumer(
        consumer_config(config, **{"statistics.interval.ms": 500, "stats_cb": stats}),
        registry=registry,
    )
    samples: list[tuple[float, int, int, int, int]] = []
    finished = threading.Event()
    hot = [0]

    def buffered() -> int:
        total = 0.0
        for metric in registry.collect():
            if metric.name.endswith("_consumer_records_buffered"):
                total += sum(sample.value for sample in metric.samples)
        return int(total)

    def take() -> None:
        now = time.perf_counter() - window.started
        samples.append((now, rss_bytes(), buffered(), fetchq[0], sys.getallocatedblocks()))

    def stop() -> None:
        take()  # before close() releases anything
        finished.set()
        consumer.stop()

    window = Window(seconds, stop)

    def handler(msg: Any) -> None:
        key = msg.key()
        window.begin(msg.partition(), key)
        time.sleep(work)
        if window.handled(msg.partition(), key, msg.offset()) and key == b"hot":
            hot[0] += 1  # the hot key's records never run at once (ordering="key")

    def sample() -> None:
        while not window.started:
            if finished.wait(0.01):
                return
        take()
        while not finished.wait(INTERVAL):
            take()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    consumer.subscribe([topic])
    consumer.run(handler, concurrency=concurrency)
    finished.set()
    sampler.join()
    samples.sort()
    print(json.dumps({"samples": samples, "hot": hot[0], **window.result()}))


if __name__ == "__main__":
    main(
        json.loads(sys.argv[1]),
        sys.argv[2],
        float(sys.argv[3]),
        int(sys.argv[4]),
        float(sys.argv[5]),
    )
