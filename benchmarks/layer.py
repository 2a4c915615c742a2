"""The consumer's own per-record cost, without a broker: ``python -m benchmarks.layer``.

A scripted native consumer hands out ready-made records (and a scripted producer acknowledges
every forward at its next poll), so what is measured is only the Python layer (admission,
hand-out, settlement, barrier, metrics, forwards) of the drop-in ``poll()`` loop and of
``run()``. Wall-clock times are noisy on shared machines; ``--instructions`` counts instructions
under callgrind instead (repeatable), as the difference between two record counts. ``--tree``
compares source trees (e.g. a checkout of an older commit) in one sitting, interleaved.

    python -m benchmarks.layer                       # this tree, wall clock, best of 7
    python -m benchmarks.layer --instructions --tree /path/to/old/checkout .
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CASES = (
    "poll_metrics_off",
    "poll_metrics_on",
    "run_metrics_off",
    "run_metrics_on",
    "batches_metrics_on",
    "run_dedup_memory_on",
    "run_fail_10pct_on",
)


def _measure(case: str, count: int) -> float:
    """Seconds per record of ``case`` (runs in a process of its own: it replaces confluent's
    Consumer class before resilient_kafka is imported)."""
    import confluent_kafka
    from confluent_kafka import Message

    records = [
        Message(topic="t", partition=i % 4, offset=i // 4, value=b"x" * 100, key=b"k")
        for i in range(count)
    ]

    class ScriptedConsumer:
        def __init__(self, conf: object) -> None:
            self._next = 0

        def poll(self, timeout: float | None = None) -> Message | None:
            i = self._next
            if i >= count:
                return None
            self._next = i + 1
            return records[i]

        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
            batch = records[self._next : self._next + num_messages]
            self._next += len(batch)
            return batch

        def assignment(self) -> list[object]:
            return []

        def _nothing(self, *args: object, **kwargs: object) -> None:
            return None

        pause = resume = seek = store_offsets = commit = close = unassign = _nothing

    class ScriptedProducer:
        """Acknowledges every record at the next poll() or flush(), as a broker would."""

        def __init__(self, conf: object) -> None:
            self._pending: list[tuple[Any, Message]] = []

        def produce(
            self,
            topic: str,
            value: Any = None,
            key: Any = None,
            partition: int = -1,
            on_delivery: Any = None,
            timestamp: int = 0,
            headers: Any = None,
        ) -> None:
            acked = Message(topic=topic, partition=max(partition, 0), value=value, key=key)
            self._pending.append((on_delivery, acked))

        def poll(self, timeout: float | None = None) -> int:
            pending, self._pending = self._pending, []
            for callback, msg in pending:
                if callback is not None:
                    callback(None, msg)
            return len(pending)

        def flush(self, timeout: float | None = None) -> int:
            self.poll()
            return 0

        def __len__(self) -> int:
            return len(self._pending)

        def close(self, *args: object) -> None:
            return None

    confluent_kafka.Consumer = ScriptedConsumer  # type: ignore[misc,assignment]
    confluent_kafka.Producer = ScriptedProducer  # type: ignore[misc,assignment]
    from prometheus_client import CollectorRegistry

    from resilient_kafka import ResilientConsumer

    options: dict[str, Any] = {}
    if "dedup_memory" in case:
        from resilient_kafka.dedup import MemoryStore

        options["dedup"] = MemoryStore(max_entries=count + 10)
    if "fail_10pct" in case:
        from resilient_kafka import RetryPolicy

        options["retry"] = RetryPolicy(delays=(1.0,))
        options["forward_timeout"] = 0.1  # the close does not wait for a broker
    consumer = ResilientConsumer(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "layer", "log_level": 0},
        metrics=case.endswith("_on"),
        registry=CollectorRegistry(),
        **options,
    )
    if "fail_10pct" in case:  # no broker: the tier topics are taken to exist
        consumer._topics._prepared.add("t")
    if case.startswith("poll"):
        started = time.perf_counter()
        for _ in range(count):
            consumer.poll(1.0)
        elapsed = time.perf_counter() - started
        consumer.close()
        return elapsed / count
    seen = [0]
    if case.startswith("batches"):

        def batch_handler(msgs: list[Message]) -> None:
            for msg in msgs:
                msg.value()
            seen[0] += len(msgs)
            if seen[0] >= count:
                consumer.stop()

        started = time.perf_counter()
        consumer.run_batches(batch_handler)
        return (time.perf_counter() - started) / count

    failing = "fail_10pct" in case

    ended = [0.0]
    done = threading.Event()

    def handler(msg: Message) -> None:
        seen[0] += 1
        if seen[0] == count:
            ended[0] = time.perf_counter()  # not the close: forwards wait for a broker there
            consumer.stop()
            done.set()
        elif failing and seen[0] % 10 == 0:
            raise TimeoutError("downstream timed out")

    started = time.perf_counter()
    threading.Thread(target=consumer.run, args=(handler,), daemon=True).start()
    done.wait()
    return (ended[0] - started) / count


def _child(tree: str, case: str, count: int, callgrind: bool) -> float:
    """Run one measurement in a fresh interpreter importing resilient_kafka from ``tree``."""
    env = {**os.environ, "PYTHONPATH": tree}
    command = [sys.executable, __file__, "--child", case, str(count), tree]
    if callgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    if callgrind:
        line = next(x for x in done.stderr.splitlines() if "Collected" in x)
        return float(line.split()[-1])
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", nargs="+", default=["."], help="source trees to compare")
    parser.add_argument("--instructions", action="store_true", help="count under callgrind")
    parser.add_argument("--repeat", type=int, default=7, help="wall clock: best of this many")
    parser.add_argument("--records", type=int, default=200_000, help="wall clock: per run")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, count, tree = args.child
        per_record = _measure(case, int(count))
        import resilient_kafka

        assert resilient_kafka.__file__.startswith(tree), resilient_kafka.__file__
        print(per_record, flush=True)
        os._exit(0)  # not waiting for the consumer's close (no broker to flush forwards to)
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (Debian package valgrind)")
    trees = [str(Path(t).resolve()) for t in args.tree]
    print("| case | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for case in args.cases:
        cells = []
        if args.instructions:  # per record: the difference between two record counts
            for tree in trees:
                low, high = (_child(tree, case, n, True) for n in (20_000, 40_000))
                cells.append(f"{(high - low) / 20_000:,.0f} instructions")
        else:  # the trees interleaved, best of --repeat each
            runs: dict[str, list[float]] = {tree: [] for tree in trees}
            for _ in range(args.repeat):
                for tree in trees:
                    runs[tree].append(_child(tree, case, args.records, False))
            cells = [f"{min(runs[tree]) * 1e6:.2f} µs" for tree in trees]
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
