"""The commit barrier: an offset becomes committable only when everything below it is done.

"Done" means handled successfully, or its retry/DLQ copy acknowledged by the broker. Records can
complete out of order (a forward waiting for its acknowledgement, parallel handlers later), so
each partition keeps its outstanding offsets in arrival order and advances past a contiguous
done prefix.
"""

from __future__ import annotations

from collections import deque


class _Partition:
    __slots__ = ("done_early", "early_stored", "first", "outstanding", "safe", "stored")

    def __init__(self, first: int) -> None:
        self.first = first  # the first offset tracked: where a replay starts if none stored
        self.outstanding: deque[int] = deque()
        self.done_early: set[int] = set()
        self.safe = -1  # next offset to consume once everything before it is done; -1 unknown
        self.stored = -1  # the last safe offset handed to the offset store / commit
        self.early_stored = 0  # how many done-early offsets the last :meth:`completed` named


class CommitBarrier:
    """Per-partition completion tracking; keyed by ``(topic, partition)``."""

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[tuple[str, int], _Partition] = {}

    def outstanding(self) -> int:
        """Records handed out and not done yet, over every partition (a snapshot: any thread
        may ask)."""
        return sum(len(state.outstanding) for state in list(self._partitions.values()))

    def progress(self) -> int:
        """A number that changes whenever a partition's committable offset moves (or the
        partitions change): how a health check sees records being done (any thread)."""
        return sum(state.safe for state in list(self._partitions.values()))

    def track(self, topic: str, partition: int, offset: int) -> _Partition:
        """A record was handed out for processing: it holds the partition's offset until done.
        Returns the partition's progress, for :meth:`done` (no lookup when it completes)."""
        state = self._partitions.get((topic, partition))
        if state is None:
            state = self._partitions[(topic, partition)] = _Partition(offset)
        if state.outstanding and offset <= state.outstanding[-1]:
            return state  # a re-delivery (seek back) of a record already outstanding
        if not state.outstanding and offset < state.safe:
            return state  # re-delivery of a record already done
        state.outstanding.append(offset)
        return state

    def done_range(self, topic: str, partition: int, first: int, last: int) -> bool:
        """The records from ``first`` to ``last`` were handed out and are done (a batch
        handled whole, nothing run in between): the partition moves past them at once. False
        (nothing changed) when records before them are outstanding: track them one by one."""
        state = self._partitions.get((topic, partition))
        if state is None:
            state = self._partitions[(topic, partition)] = _Partition(first)
        elif state.outstanding:
            return False
        if last >= state.safe:
            state.safe = last + 1
        return True

    def complete(self, topic: str, partition: int, offset: int) -> None:
        """The record at ``offset`` is done."""
        state = self._partitions.get((topic, partition))
        if state is not None:
            self.done(state, offset)

    @staticmethod
    def done(state: _Partition, offset: int) -> None:
        """The record at ``offset`` of the partition whose progress :meth:`track` returned is
        done (after the partition was forgotten, this changes nothing that is still tracked)."""
        if not state.outstanding:
            return
        outstanding = state.outstanding
        if outstanding[0] != offset:
            if offset > outstanding[0]:
                state.done_early.add(offset)
            return
        last = outstanding.popleft()
        done_early = state.done_early
        while outstanding and outstanding[0] in done_early:
            last = outstanding.popleft()
            done_early.discard(last)
        state.safe = outstanding[0] if outstanding else last + 1

    def pending(self, topic: str, partition: int) -> int:
        """How many records of the partition are not done yet."""
        state = self._partitions.get((topic, partition))
        return len(state.outstanding) if state else 0

    def total_pending(self) -> int:
        return sum(len(state.outstanding) for state in self._partitions.values())

    def safe_offset(self, topic: str, partition: int) -> int:
        """The highest committable offset of the partition, or -1 if nothing is committable."""
        state = self._partitions.get((topic, partition))
        return state.safe if state else -1

    def advanced(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, offset)`` for partitions whose safe offset moved since last call."""
        moved = []
        for (topic, partition), state in self._partitions.items():
            if state.safe > state.stored:
                moved.append((topic, partition, state.safe))
                state.stored = state.safe
        return moved

    def completed(
        self, changed_only: bool, keys: set[tuple[str, int]] | None = None
    ) -> list[tuple[str, int, int, set[int]]]:
        """``(topic, partition, first offset not done, offsets done above it)``, for every
        partition (of ``keys``) with something to commit, or only for those where either changed
        since the last call (commits that carry completed offsets in their metadata). The set
        is the barrier's own: read it before anything completes."""
        out = []
        for (topic, partition), state in self._partitions.items():
            if keys is not None and (topic, partition) not in keys:
                continue
            outstanding = state.outstanding
            base = outstanding[0] if outstanding else state.safe
            if base < 0:
                continue
            early = len(state.done_early)
            if changed_only and base == state.stored and early == state.early_stored:
                continue
            state.stored, state.early_stored = base, early
            out.append((topic, partition, base, state.done_early))
        return out

    def ceiling(self, topic: str, partition: int) -> int | None:
        """The highest offset a commit of the partition may name: its first record not done,
        else the end of what was handed out; None for a partition not tracked."""
        state = self._partitions.get((topic, partition))
        if state is None:
            return None
        return state.outstanding[0] if state.outstanding else state.safe

    def committable(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, offset)`` for every partition with a committable offset."""
        return [
            (topic, partition, state.safe)
            for (topic, partition), state in self._partitions.items()
            if state.safe >= 0
        ]

    def replay_points(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, offset)`` to rewind to after an aborted transaction: the last
        offset handed to :meth:`advanced` (committed with a transaction), else the first
        record tracked."""
        return [
            (topic, partition, state.stored if state.stored >= 0 else state.first)
            for (topic, partition), state in self._partitions.items()
        ]

    def forget(self, topic: str, partition: int) -> None:
        self._partitions.pop((topic, partition), None)
