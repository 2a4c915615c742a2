"""FastStream with ``max_workers`` concurrent handlers that each wait ``WORK`` seconds
(``asyncio.sleep``), over the concurrency benchmark's topic; prints {"count", "elapsed",
"reorders", "overlaps"} for the records handled in SECONDS after the first (see _window.py).

    python faststream_concurrent_peer.py confluent|aiokafka BOOTSTRAP TOPIC SECONDS WORKERS WORK

``max_workers`` > 1 gives FastStream's concurrent subscriber: one polling task feeds a bounded
in-memory stream, and up to ``max_workers`` handler tasks run at once under a semaphore, in no
particular order (FastStream keeps no key or partition order there, by design). It only allows
the default ack policy (ACK_FIRST: offsets are auto-committed by the client). An ``async def``
handler, as FastStream users write it; a plain one would run in anyio's worker threads
(40 by default), not ``max_workers`` of them.
"""

import asyncio
import json
import sys
import uuid
from typing import Any

from _window import Window


async def main(
    flavour: str, bootstrap: str, topic: str, seconds: float, workers: int, work: float
) -> None:
    if flavour == "confluent":
        from faststream.confluent import KafkaBroker, KafkaMessage
    else:
        from faststream.kafka import KafkaBroker, KafkaMessage

    broker = KafkaBroker(bootstrap, logger=None)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    window = Window(seconds, lambda: loop.call_soon_threadsafe(done.set))

    @broker.subscriber(
        topic,
        group_id=f"bench-fs-conc-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        max_workers=workers,
    )
    async def handle(body: bytes, message: KafkaMessage) -> None:
        raw: Any = message.raw_message  # one record (not a batch subscriber)
        if flavour == "confluent":
            partition, key, offset = raw.partition(), raw.key(), raw.offset()
        else:  # aiokafka's ConsumerRecord
            partition, key, offset = raw.partition, raw.key, raw.offset
        window.begin(partition, key)
        await asyncio.sleep(work)
        window.handled(partition, key, offset)

    async with broker:
        await broker.start()
        await done.wait()
    print(json.dumps(window.result()))


if __name__ == "__main__":
    flavour, bootstrap, topic, seconds, workers, work = sys.argv[1:7]
    asyncio.run(main(flavour, bootstrap, topic, float(seconds), int(workers), float(work)))
