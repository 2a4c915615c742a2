"""sentry-arroyo's ``RunTaskInThreads`` with THREADS threads whose task waits ``WORK`` seconds
(``time.sleep``), then ``CommitOffsets`` (arroyo's commit step, committing once a second), over
the concurrency benchmark's topic; prints {"count", "elapsed", "reorders", "overlaps"} for the
records handled in SECONDS after the first (see _window.py).

    python arroyo_peer.py BOOTSTRAP TOPIC SECONDS THREADS WORK [MAX_PENDING]

``RunTaskInThreads`` runs every record in a thread pool as soon as it is submitted and hands
results to the next step in offset order; two records of a key can run at once, so it keeps no
key order while handling. MAX_PENDING (``max_pending_futures``, default 1,000: what
resilient-kafka buffers at concurrency 64) bounds the records held before back-pressure.
"""

import json
import sys
import time
import uuid
from collections.abc import Mapping

from _window import Window
from arroyo.backends.kafka import KafkaConsumer, KafkaPayload, build_kafka_consumer_configuration
from arroyo.commit import ONCE_PER_SECOND
from arroyo.processing import StreamProcessor
from arroyo.processing.strategies import (
    CommitOffsets,
    ProcessingStrategy,
    ProcessingStrategyFactory,
    RunTaskInThreads,
)
from arroyo.types import BrokerValue, Commit, Message, Partition, Topic


class Factory(ProcessingStrategyFactory[KafkaPayload]):
    def __init__(self, window: Window, threads: int, work: float, max_pending: int) -> None:
        self.window = window
        self.threads = threads
        self.work = work
        self.max_pending = max_pending

    def handle(self, message: Message[KafkaPayload]) -> None:
        value = message.value
        assert isinstance(value, BrokerValue)
        partition, key = value.partition.index, value.payload.key
        self.window.begin(partition, key)
        time.sleep(self.work)
        self.window.handled(partition, key, value.offset)

    def create_with_partitions(
        self, commit: Commit, partitions: Mapping[Partition, int]
    ) -> ProcessingStrategy[KafkaPayload]:
        return RunTaskInThreads(
            self.handle,
            concurrency=self.threads,
            max_pending_futures=self.max_pending,
            next_step=CommitOffsets(commit),
        )


def main(
    bootstrap: str, topic: str, seconds: float, threads: int, work: float, max_pending: int
) -> None:
    consumer = KafkaConsumer(
        build_kafka_consumer_configuration(
            {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000},
            group_id=f"bench-arroyo-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
        )
    )
    stop: list[StreamProcessor[KafkaPayload]] = []
    window = Window(seconds, lambda: stop[0].signal_shutdown())
    processor = StreamProcessor(
        consumer,
        Topic(topic),
        Factory(window, threads, work, max_pending),
        commit_policy=ONCE_PER_SECOND,
    )
    stop.append(processor)
    processor.run()
    print(json.dumps(window.result()))


if __name__ == "__main__":
    bootstrap, topic, seconds, threads, work = sys.argv[1:6]
    max_pending = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
    main(bootstrap, topic, float(seconds), int(threads), float(work), max_pending)
