"""The toxics, with the exact semantics of Toxiproxy 2.x (``toxics/*.go``).

A toxic sees one direction of one proxied connection as a sequence of chunks (one socket read
each, stamped with the time the proxy read it) and passes them on delayed, throttled, sliced,
truncated, dropped, or followed by a close. Each toxic runs in a *stub*: the pair of channels
around it plus what it holds. Toxiproxy interrupts a stub whenever its toxic is updated or the
chain around it changes; here an interrupt is a task cancellation, and whatever the toxic had
taken from its input but not yet passed on (``Stub.held``) is flushed downstream at once, in
order. That is how a live connection never loses or reorders a byte while toxics change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

#: Bytes per socket read, as in Toxiproxy (``io.Copy``'s 32 KiB buffer).
CHUNK_SIZE = 32 * 1024

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"


@dataclass(slots=True)
class Chunk:
    """One socket read and when it happened (``time.monotonic()``), which latency counts from."""

    data: bytes
    timestamp: float


_T = TypeVar("_T")


class Channel(Generic[_T]):
    """A bounded FIFO between two stages, standing in for a Go channel.

    ``put`` waits while the channel is full, which is what gives back-pressure: a stalled toxic
    stops the socket reads behind it. ``force_put`` ignores the bound; interrupts use it to
    flush held data without ever blocking, so changing a toxic can never deadlock on a stage
    that is not reading (Toxiproxy's ``TestRemoveToxicWithBrokenConnection``).
    """

    def __init__(self, capacity: int) -> None:
        self._items: deque[_T] = deque()
        self._capacity = max(capacity, 1)
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> _T:
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        item = self._items.popleft()
        self._not_full.set()
        return item

    async def put(self, item: _T) -> None:
        while len(self._items) >= self._capacity:
            self._not_full.clear()
            await self._not_full.wait()
        self.force_put(item)

    def force_put(self, item: _T) -> None:
        self._items.append(item)
        self._not_empty.set()

    def take_all(self) -> list[_T]:
        items = list(self._items)
        self._items.clear()
        self._not_full.set()
        return items


class Stub:
    """One toxic's place in one link: its input and output channels and its in-flight data.

    ``held`` is the data taken from the input and not yet passed on; an interrupt flushes it
    downstream (``CREATING_TOXICS.md``: interrupted toxics must not drop data). ``state`` is the
    per-connection state of stateful toxics (``limit_data``'s byte counter), kept across runs.
    """

    def __init__(
        self,
        input: Channel[Chunk | None],
        output: Channel[Chunk | None],
        spec: ToxicSpec | None = None,
    ) -> None:
        self.input = input
        self.output = output
        self.spec = spec
        self.held: Chunk | None = None
        self.state: Any = None
        self.closed = False
        self.input_eof = False  # a Go channel stays closed: every later read sees EOF again
        self.dead = False  # the connection is gone: nothing may hold the task any more
        self.task: asyncio.Task[None] | None = None

    async def recv(self) -> Chunk | None:
        """The next chunk, or ``None`` at end of stream; the chunk becomes ``held``."""
        if self.input_eof:
            return None
        chunk = await self.input.get()
        if chunk is None:
            self.input_eof = True
        self.held = chunk
        return chunk

    async def emit(self, chunk: Chunk, rest: Chunk | None = None) -> None:
        """Pass ``chunk`` on; what is still held afterwards is ``rest``."""
        await self.output.put(chunk)
        self.held = rest

    def close(self) -> None:
        """End the stream here: held data is dropped, end-of-stream goes downstream.

        Like closing a Go channel, this never waits, even if the next stage is stalled.
        """
        self.held = None
        if not self.closed:
            self.closed = True
            self.output.force_put(None)

    def flush(self) -> None:
        """After an interrupt: pass on what was held, at once and in order."""
        if self.held is not None and not self.closed:
            self.output.force_put(self.held)
        self.held = None


async def _forever() -> NoReturn:
    await asyncio.Event().wait()
    raise AssertionError("an event nobody sets was set")


class Toxic:
    """A toxic type: its attributes (Go struct fields, all integers) and how it pipes data."""

    type_name: ClassVar[str] = ""
    go_name: ClassVar[str] = ""  # the Go struct, for error messages that match Toxiproxy's
    #: JSON attribute name -> Go integer type (``int64`` or ``int``), in struct order.
    fields: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Capacity of the channel in front of this toxic (Toxiproxy's ``GetBufferSize``).
    buffer_size: ClassVar[int] = 0
    #: Removing the toxic closes the connections it ran on (Toxiproxy's ``CleanupToxic``).
    closes_on_removal: ClassVar[bool] = False

    def __init__(self) -> None:
        self.values: dict[str, int] = {name: 0 for name, _ in self.fields}

    def copy(self) -> Toxic:
        clone = type(self)()
        clone.values = dict(self.values)
        return clone

    def attributes(self) -> dict[str, int]:
        return dict(self.values)

    def new_state(self) -> Any:
        return None

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        raise NotImplementedError


class NoopToxic(Toxic):
    """Passes data through; also what a stub runs when toxicity says "not this time"."""

    type_name = "noop"
    go_name = "NoopToxic"

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        while True:
            chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            await stub.emit(chunk)


NOOP = NoopToxic()


class LatencyToxic(Toxic):
    """Holds each chunk until ``latency ± jitter`` ms after the proxy read it.

    Measured from the read, so queued chunks do not add up and throughput is not throttled
    (1024-chunk input buffer); sequential, so order is kept even with jitter.
    """

    type_name = "latency"
    go_name = "LatencyToxic"
    fields = (("latency", "int64"), ("jitter", "int64"))
    buffer_size = 1024

    def _delay(self, rng: random.Random) -> float:
        delay = self.values["latency"]
        jitter = self.values["jitter"]
        if jitter > 0:
            delay += rng.randrange(2 * jitter) - jitter
        return delay / 1000

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        while True:
            chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            sleep = self._delay(rng) - (time.monotonic() - chunk.timestamp)
            if sleep > 0:
                await asyncio.sleep(sleep)
            chunk.timestamp += sleep  # as Go does: a second latency toxic counts from here
            await stub.emit(chunk)


class BandwidthToxic(Toxic):
    """Limits throughput to ``rate`` KB/s (1 KB = 1000 bytes); ``rate <= 0`` holds data forever.

    Sleep time accumulates per chunk (``len ms / rate``), with the oversleep subtracted; a
    chunk bigger than ``rate * 100`` bytes goes out in ``rate * 100``-byte pieces every 100 ms.
    """

    type_name = "bandwidth"
    go_name = "BandwidthToxic"
    fields = (("rate", "int64"),)

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        rate = self.values["rate"]
        sleep_ns = 0
        while True:
            chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            if rate <= 0:
                # Go loops forever emitting empty slices; nothing observable gets through, and
                # the chunk stays held until the toxic is updated or removed.
                await _forever()
            sleep_ns += len(chunk.data) * 1_000_000 // rate
            data = chunk.data
            piece = rate * 100
            while len(data) > piece:
                await asyncio.sleep(0.1)
                head, data = data[:piece], data[piece:]
                await stub.emit(Chunk(head, chunk.timestamp), Chunk(data, chunk.timestamp))
                sleep_ns -= 100_000_000
            start = time.monotonic_ns()
            if sleep_ns > 0:
                await asyncio.sleep(sleep_ns / 1e9)
            else:
                await asyncio.sleep(0)
            sleep_ns -= time.monotonic_ns() - start
            await stub.emit(Chunk(data, chunk.timestamp))


class SlowCloseToxic(Toxic):
    """Passes data untouched but delays the close of the stream by ``delay`` ms."""

    type_name = "slow_close"
    go_name = "SlowCloseToxic"
    fields = (("delay", "int64"),)

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        while True:
            chunk = await stub.recv()
            if chunk is None:
                await asyncio.sleep(max(self.values["delay"], 0) / 1000)
                stub.close()
                return
            await stub.emit(chunk)


class TimeoutToxic(Toxic):
    """Drops all data; closes the connection after ``timeout`` ms without data (0: never).

    Every arriving chunk restarts the timer (Go makes a new ``time.After`` per loop). Removing
    the toxic closes the connection, since the stream lost bytes (``Cleanup``, PR #168).
    """

    type_name = "timeout"
    go_name = "TimeoutToxic"
    fields = (("timeout", "int64"),)
    closes_on_removal = True

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        timeout = self.values["timeout"]
        while True:
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout / 1000):
                        chunk = await stub.recv()
                except TimeoutError:
                    stub.close()
                    return
            else:
                chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            stub.held = None  # dropped on the floor


class ResetPeerToxic(Toxic):
    """On the first chunk (or end of stream) it sees, waits ``timeout`` ms and closes.

    The chunk is dropped. Connections opened while the toxic exists have ``SO_LINGER=0`` on both
    sockets (set by the link), so that close is a TCP RST. Like Go's plain ``<-time.After``, the
    wait cannot be interrupted.
    """

    type_name = "reset_peer"
    go_name = "ResetToxic"
    fields = (("timeout", "int64"),)

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        await stub.recv()
        stub.held = None
        deadline = time.monotonic() + self.values["timeout"] / 1000
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.sleep(remaining)
            except asyncio.CancelledError:
                if stub.dead:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        stub.close()


class SlicerToxic(Toxic):
    """Splits each chunk into slices of ``average_size ± size_variation`` bytes, ``delay`` µs apart.

    The split is Toxiproxy's recursive halving around the middle, so slice sizes vary evenly;
    degenerate attributes (zero average, variation not below the average) still terminate.
    """

    type_name = "slicer"
    go_name = "SlicerToxic"
    fields = (("average_size", "int"), ("size_variation", "int"), ("delay", "int"))

    def _cuts(self, start: int, end: int, rng: random.Random, out: list[int]) -> None:
        average = self.values["average_size"]
        variation = self.values["size_variation"]
        if end - start <= 1 or (end - start) - average <= variation:
            out.append(end)
            return
        mid = start + (end - start) // 2
        if variation > 0:
            mid += rng.randrange(2 * variation) - variation
        mid = min(max(mid, start + 1), end - 1)
        self._cuts(start, mid, rng, out)
        self._cuts(mid, end, rng, out)

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        delay = max(self.values["delay"], 0) / 1_000_000
        while True:
            chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            cuts: list[int] = []
            self._cuts(0, len(chunk.data), rng, cuts)
            start = 0
            for end in cuts:
                rest = Chunk(chunk.data[end:], chunk.timestamp) if end < len(chunk.data) else None
                await stub.emit(Chunk(chunk.data[start:end], chunk.timestamp), rest)
                start = end
                await asyncio.sleep(delay)


@dataclass
class LimitState:
    """Bytes a ``limit_data`` toxic has let through on one connection, across updates."""

    transmitted: int = 0


class LimitDataToxic(Toxic):
    """Forwards ``bytes`` bytes per connection and direction, truncates, then closes."""

    type_name = "limit_data"
    go_name = "LimitDataToxic"
    fields = (("bytes", "int64"),)

    def new_state(self) -> Any:
        return LimitState()

    async def pipe(self, stub: Stub, rng: random.Random) -> None:
        state: LimitState = stub.state if stub.state is not None else LimitState()
        limit = self.values["bytes"]
        while True:
            chunk = await stub.recv()
            if chunk is None:
                stub.close()
                return
            remaining = max(limit - state.transmitted, 0)
            if remaining < len(chunk.data):
                chunk = Chunk(chunk.data[:remaining], chunk.timestamp)
                stub.held = chunk
            if chunk.data:
                state.transmitted += len(chunk.data)  # counted once committed: a flush sends it
                await stub.emit(chunk)
            else:
                stub.held = None
            if limit - state.transmitted <= 0:
                stub.close()
                return


#: Registered toxic types, as in Toxiproxy's ``init()`` ``Register`` calls.
TOXICS: dict[str, type[Toxic]] = {
    cls.type_name: cls
    for cls in (
        NoopToxic,
        LatencyToxic,
        BandwidthToxic,
        SlowCloseToxic,
        TimeoutToxic,
        ResetPeerToxic,
        SlicerToxic,
        LimitDataToxic,
    )
}


class ToxicSpec:
    """A toxic as the API knows it (Toxiproxy's ``ToxicWrapper``): name, stream, toxicity, type."""

    def __init__(
        self, name: str, stream: str, direction: str, toxicity: float, toxic: Toxic
    ) -> None:
        self.name = name
        self.stream = stream  # as the client sent it; ``direction`` is the parsed value
        self.direction = direction
        self.toxicity = toxicity
        self.toxic = toxic

    @property
    def type(self) -> str:
        return self.toxic.type_name

    def choose(self, rng: random.Random) -> Toxic:
        """The toxic for one run of a stub: the real one with probability ``toxicity``."""
        return self.toxic if rng.random() < self.toxicity else NOOP
