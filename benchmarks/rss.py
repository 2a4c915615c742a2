"""RSS over one long ``ResilientConsumer.run`` in a fresh process (no other case's garbage):

python -m benchmarks.rss CONFIG_JSON TOPIC COUNT   → {"rss_warm", "rss_end", "elapsed"}
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks._workload import Counter, consumer_config, rss_bytes
from resilient_kafka import ResilientConsumer


def main(config: dict[str, Any], topic: str, count: int) -> None:
    consumer = ResilientConsumer(consumer_config(config), registry=CollectorRegistry())
    counter = Counter(count)
    counter.stop = consumer.stop
    marks: dict[str, int] = {}
    warm_at = max(1, count // 10)

    def handler(msg: Any) -> None:
        counter(msg)
        if counter.count == warm_at:
            gc.collect()
            marks["warm"] = rss_bytes()
        elif counter.count == count:
            gc.collect()
            marks["end"] = rss_bytes()  # before close() releases anything

    consumer.subscribe([topic])
    consumer.run(handler)
    print(
        json.dumps({"rss_warm": marks["warm"], "rss_end": marks["end"], "elapsed": counter.elapsed})
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
