"""FastStream with a no-op subscriber over a preloaded topic; prints {"count", "elapsed"}.

    python faststream_peer.py confluent|aiokafka BOOTSTRAP TOPIC COUNT WARMUP

Default ack policy (ACK_FIRST, the framework's default) and ``logger=None``, as measured in the
field notes.
"""

import asyncio
import json
import sys
import time
import uuid


async def main(flavour: str, bootstrap: str, topic: str, count: int, warmup: float) -> None:
    if flavour == "confluent":
        from faststream.confluent import KafkaBroker
    else:
        from faststream.kafka import KafkaBroker

    broker = KafkaBroker(bootstrap, logger=None)
    done = asyncio.Event()
    state = {"n": 0, "t0": 0.0, "t1": 0.0}

    @broker.subscriber(
        topic, group_id=f"bench-fs-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest"
    )
    async def handle(body: bytes) -> None:
        n = state["n"] = state["n"] + 1
        if n == 1:  # let the client prefetch, then time the records after this one
            await asyncio.sleep(warmup)
            state["t0"] = time.perf_counter()
        if n == count:
            state["t1"] = time.perf_counter()
            done.set()

    async with broker:
        await broker.start()
        await done.wait()
    print(json.dumps({"count": count, "elapsed": state["t1"] - state["t0"]}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
