"""Quix Streams with a no-op step over a preloaded topic; prints {"count", "elapsed"} as JSON.

Runs in its own virtualenv (quixstreams pins confluent-kafka < 2.13):
    python quixstreams_peer.py BOOTSTRAP TOPIC COUNT WARMUP
"""

import json
import sys
import time
import uuid

from quixstreams import Application


def main(bootstrap: str, topic: str, count: int, warmup: float) -> None:
    app = Application(
        broker_address=bootstrap,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        commit_interval=5.0,
        # (as benchmarks/_workload.py's PREFETCH: this runs in a virtualenv of its own)
        consumer_extra_config={"session.timeout.ms": 6000, "fetch.queue.backoff.ms": 10},
        loglevel="WARNING",
        auto_create_topics=False,
    )
    source = app.topic(topic, key_deserializer="bytes", value_deserializer="bytes")
    state = {"n": 0, "t0": 0.0, "t1": 0.0}

    def step(value: bytes) -> None:
        n = state["n"] = state["n"] + 1
        if n == 1:  # let the client prefetch, then time the records after this one
            time.sleep(warmup)
            state["t0"] = time.perf_counter()
        if n == count:
            state["t1"] = time.perf_counter()
            app.stop()

    app.dataframe(source).update(step)
    app.run()
    print(json.dumps({"count": count, "elapsed": state["t1"] - state["t0"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
