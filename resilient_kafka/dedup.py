"""Dedup stores: remember which messages were processed, so a redelivery skips the handler.

At-least-once delivery means a handler can see a message twice (a crash between the side effect
and the commit, a producer retry, a replay). A store keeps one entry per message identity:

- ``claim(key, owner, lease)`` before the handler runs: ``NEW`` (go ahead; the claim is yours
  for ``lease`` seconds), ``DONE`` (processed before: skip it) or ``BUSY`` (another consumer
  holds a live claim: do not run the side effect twice). Claiming again with the same owner
  renews the lease: the consumer does that while a handler runs longer than a third of it;
- ``complete(key, owner)`` after the handler succeeded: the entry is kept for ``ttl`` seconds.
  It returns False when another owner held a live claim on the key (this owner's lease had run
  out, so the other may be running the side effect too);
- ``release(key, owner)`` after it failed: the message stays retryable.

Every store is bounded (``max_entries``: the oldest *done* entries go first; live claims are
never evicted) and expires entries after ``ttl``. Errors are raised as :class:`DedupStoreError`,
never swallowed; the consumer decides what a failing store means (``on_dedup_error``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from resilient_kafka.errors import ConfigurationError, ResilientKafkaError

NEW = "new"
DONE = "done"
BUSY = "busy"

DEFAULT_TTL = 7 * 24 * 3600.0  # a week: longer than any retry budget or replay window
DEFAULT_MAX_ENTRIES = 1_000_000

_T = TypeVar("_T")


class DedupStoreError(ResilientKafkaError):
    """The dedup store could not be read or written."""


class DedupStore(Protocol):
    """What a consumer needs from a dedup store."""

    def claim(self, key: str, owner: str, lease: float) -> str: ...

    def complete(self, key: str, owner: str) -> bool | None: ...

    def release(self, key: str, owner: str) -> None: ...

    def close(self) -> None: ...


class BatchDedupStore(DedupStore, Protocol):
    """A store that can claim and complete many keys in one round trip (all built-in stores
    do; the consumer uses these per fetched batch when a store has them)."""

    def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]: ...

    def complete_many(self, keys: list[str], owner: str) -> list[bool]: ...


def _check(ttl: float, max_entries: int) -> None:
    if ttl <= 0:
        raise ConfigurationError(f"ttl must be positive seconds, got {ttl}")
    if max_entries < 1:
        raise ConfigurationError(f"max_entries must be >= 1, got {max_entries}")


class MemoryStore:
    """In-process store: fast, bounded, gone with the process (protects against producer retries
    and replays within one run, not against crashes)."""

    durable = False  # gone with the process: the consumer may write a batch's completions late

    def __init__(self, *, ttl: float = DEFAULT_TTL, max_entries: int = 100_000) -> None:
        _check(ttl, max_entries)
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> (state, owner, expires); insertion/refresh order = age
        self._entries: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: str, owner: str, lease: float) -> str:
        now = time.time()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[2] > now:
                state, holder, _ = entry
                if state == DONE:
                    return DONE
                if holder != owner:
                    return BUSY
            self._entries[key] = ("claimed", owner, now + lease)
            self._entries.move_to_end(key)
            self._bound()
            return NEW

    def complete(self, key: str, owner: str) -> bool:
        now = time.time()
        with self._lock:
            entry = self._entries.get(key)
            ours = entry is None or entry[0] == DONE or entry[1] == owner or entry[2] <= now
            self._entries[key] = (DONE, owner, now + self.ttl)
            self._entries.move_to_end(key)
            self._bound()
            return ours

    def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]:
        """:meth:`claim` for each key, under one lock."""
        now = time.time()
        entries = self._entries
        get, move = entries.get, entries.move_to_end
        claimed = ("claimed", owner, now + lease)
        out = []
        with self._lock:
            for key in keys:
                entry = get(key)
                if entry is not None and entry[2] > now:
                    if entry[0] == DONE:
                        out.append(DONE)
                        continue
                    if entry[1] != owner:
                        out.append(BUSY)
                        continue
                entries[key] = claimed
                move(key)
                out.append(NEW)
            if len(entries) > self.max_entries:
                self._bound()
        return out

    def complete_many(self, keys: list[str], owner: str) -> list[bool]:
        """:meth:`complete` for each key, under one lock."""
        now = time.time()
        entries = self._entries
        get, move = entries.get, entries.move_to_end
        done = (DONE, owner, now + self.ttl)
        out = []
        with self._lock:
            for key in keys:
                entry = get(key)
                out.append(
                    entry is None or entry[0] == DONE or entry[1] == owner or entry[2] <= now
                )
                entries[key] = done
                move(key)
            if len(entries) > self.max_entries:
                self._bound()
        return out

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] != DONE and entry[1] == owner:
                del self._entries[key]

    def _bound(self) -> None:
        entries = self._entries
        if len(entries) <= self.max_entries:
            return
        now = time.time()
        passed = 0  # live claims are moved behind, never evicted
        while len(entries) > self.max_entries and passed < len(entries):
            key, (state, _, expires) = next(iter(entries.items()))
            if state != DONE and expires > now:
                entries.move_to_end(key)
                passed += 1
            else:
                del entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        pass


def _set_up(db: sqlite3.Connection, deadline: float, *statements: str) -> None:
    """Run set-up statements, retrying "database is locked" until ``deadline``: SQLite answers
    the switch to WAL with SQLITE_BUSY at once, without waiting out the busy timeout, when
    another process is setting up the same new file (consumers started together)."""
    for statement in statements:
        pause = 0.005
        while True:
            try:
                db.execute(statement)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.1)


class SQLiteStore:
    """A SQLite file: survives crashes and restarts of one machine's consumers (the default for
    one host). WAL journal; every claim is one short write transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        timeout: float = 10.0,
    ) -> None:
        _check(ttl, max_entries)
        self.ttl = ttl
        self.max_entries = max_entries
        self.path = str(path)
        self._lock = threading.Lock()
        self._writes = 0
        try:
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            _set_up(
                self._db,
                time.monotonic() + timeout,
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",  # a process crash loses nothing
                "CREATE TABLE IF NOT EXISTS rk_dedup (key TEXT PRIMARY KEY, state TEXT NOT NULL,"
                " owner TEXT NOT NULL, expires REAL NOT NULL)",
                "CREATE INDEX IF NOT EXISTS rk_dedup_expires ON rk_dedup(expires)",
            )
        except sqlite3.Error as exc:
            raise DedupStoreError(f"cannot open dedup store {self.path}: {exc}") from exc

    def _transaction(self, body: Callable[[], _T]) -> _T:
        """``body()`` in one write transaction (rolled back if anything fails, so the connection
        is never left inside a transaction that every later BEGIN would trip over)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = body()
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._writes += 1
                if self._writes % 1000 == 0:
                    self._prune()
                return result
            except sqlite3.Error as exc:
                raise DedupStoreError(f"dedup store {self.path}: {exc}") from exc

    def _row(self, key: str) -> tuple[str, str, float] | None:
        return self._db.execute(  # type: ignore[no-any-return]
            "SELECT state, owner, expires FROM rk_dedup WHERE key = ?", (key,)
        ).fetchone()

    def claim(self, key: str, owner: str, lease: float) -> str:
        def body() -> str:
            now = time.time()
            row = self._row(key)
            if row is not None and row[2] > now:
                if row[0] == DONE:
                    return DONE
                if row[1] != owner:
                    return BUSY
            self._db.execute(
                "INSERT OR REPLACE INTO rk_dedup VALUES (?, 'claimed', ?, ?)",
                (key, owner, now + lease),
            )
            return NEW

        return self._transaction(body)

    def complete(self, key: str, owner: str) -> bool:
        return self._transaction(lambda: self._mark_done(key, owner))

    def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]:
        """:meth:`claim` for each key, in one transaction."""

        def body() -> list[str]:
            now = time.time()
            known = self._rows(keys)
            out, writes = [], []
            for key in keys:
                row = known.get(key)
                if row is not None and row[2] > now:
                    if row[0] == DONE:
                        out.append(DONE)
                        continue
                    if row[1] != owner:
                        out.append(BUSY)
                        continue
                writes.append((key, owner, now + lease))
                out.append(NEW)
            self._db.executemany(
                "INSERT OR REPLACE INTO rk_dedup VALUES (?, 'claimed', ?, ?)", writes
            )
            return out

        return self._transaction(body)

    def complete_many(self, keys: list[str], owner: str) -> list[bool]:
        """:meth:`complete` for each key, in one transaction (a subclass that writes a side
        effect in :meth:`_mark_done` gets it called per key)."""
        if type(self)._mark_done is not SQLiteStore._mark_done:
            return self._transaction(lambda: [self._mark_done(key, owner) for key in keys])

        def body() -> list[bool]:
            now = time.time()
            known = self._rows(keys)
            out = []
            for key in keys:
                row = known.get(key)
                out.append(row is None or row[0] == DONE or row[1] == owner or row[2] <= now)
            self._db.executemany(
                "INSERT OR REPLACE INTO rk_dedup VALUES (?, 'done', ?, ?)",
                [(key, owner, now + self.ttl) for key in keys],
            )
            return out

        return self._transaction(body)

    def _rows(self, keys: list[str]) -> dict[str, tuple[str, str, float]]:
        """key -> (state, owner, expires) of those of ``keys`` with a row."""
        found: dict[str, tuple[str, str, float]] = {}
        for i in range(0, len(keys), 500):  # under SQLite's limit of bound parameters
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for key, state, holder, expires in self._db.execute(
                f"SELECT key, state, owner, expires FROM rk_dedup WHERE key IN ({marks})", chunk
            ):
                found[key] = (state, holder, expires)
        return found

    def _mark_done(self, key: str, owner: str) -> bool:
        """The done entry, inside a transaction (a subclass can write its side effect in the
        same one); False if another owner's live claim was there."""
        now = time.time()
        row = self._row(key)
        ours = row is None or row[0] == DONE or row[1] == owner or row[2] <= now
        self._db.execute(
            "INSERT OR REPLACE INTO rk_dedup VALUES (?, 'done', ?, ?)",
            (key, owner, now + self.ttl),
        )
        return ours

    def release(self, key: str, owner: str) -> None:
        self._transaction(
            lambda: self._db.execute(
                "DELETE FROM rk_dedup WHERE key = ? AND owner = ? AND state != 'done'",
                (key, owner),
            )
        )

    def _prune(self) -> None:
        """Expired entries, then the oldest done entries beyond ``max_entries`` (live claims
        stay: evicting one would let a second consumer run the side effect at the same time).
        Called under the lock."""
        self._db.execute("DELETE FROM rk_dedup WHERE expires <= ?", (time.time(),))
        (count,) = self._db.execute("SELECT COUNT(*) FROM rk_dedup").fetchone()
        if count > self.max_entries:
            self._db.execute(
                "DELETE FROM rk_dedup WHERE key IN (SELECT key FROM rk_dedup WHERE state = 'done'"
                " ORDER BY expires LIMIT ?)",
                (count - self.max_entries,),
            )

    def prune(self) -> None:
        """Drop expired entries and enforce ``max_entries`` now (also every 1000 writes)."""
        with self._lock:
            try:
                self._prune()
            except sqlite3.Error as exc:
                raise DedupStoreError(f"dedup store {self.path}: {exc}") from exc

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rk_dedup").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


_RELEASE = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# one round trip, atomic: a new claim, a renewal of our own, or what is there
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'new'
end
if value == 'done' then return 'done' end
if value == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'new'
end
return 'busy'
"""

# mark done; 0 when another owner's live claim was there (our lease had run out)
_COMPLETE = """
local value = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
if value and value ~= 'done' and value ~= ARGV[1] then return 0 end
return 1
"""

_VERDICTS = {b"new": NEW, b"done": DONE, b"busy": BUSY, NEW: NEW, DONE: DONE, BUSY: BUSY}


class RedisStore:
    """Redis: shared by every consumer instance of a group, on any host. Claims are
    ``SET NX PX`` with the lease; entries expire after ``ttl`` (Redis bounds memory with its own
    ``maxmemory`` policy; ``max_entries`` is not enforced here)."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float = DEFAULT_TTL,
        prefix: str = "rk:dedup:",
        socket_timeout: float = 5.0,
    ) -> None:
        _check(ttl, 1)
        from resilient_kafka._extras import require

        redis = require("redis", extra="redis", purpose="RedisStore")
        self.ttl = ttl
        self.prefix = prefix
        self._errors = (redis.RedisError,)
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._where = url.split("@")[-1]  # never the password
        # EVALSHA, falling back to EVAL once per connection when the script is not cached
        self._claim = self._client.register_script(_CLAIM)
        self._complete = self._client.register_script(_COMPLETE)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def claim(self, key: str, owner: str, lease: float) -> str:
        try:
            verdict = self._claim(
                keys=[self._key(key)], args=[f"c:{owner}", max(1, int(lease * 1000))]
            )
        except self._errors as exc:
            raise DedupStoreError(f"dedup store redis://{self._where}: {exc}") from exc
        return _VERDICTS[verdict]

    def complete(self, key: str, owner: str) -> bool:
        try:
            ours = self._complete(
                keys=[self._key(key)], args=[f"c:{owner}", max(1, int(self.ttl * 1000))]
            )
        except self._errors as exc:
            raise DedupStoreError(f"dedup store redis://{self._where}: {exc}") from exc
        return bool(ours)

    def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]:
        """:meth:`claim` for each key, in one round trip (a pipeline)."""
        args = [f"c:{owner}", max(1, int(lease * 1000))]
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                self._claim(keys=[self._key(key)], args=args, client=pipe)
            return [_VERDICTS[verdict] for verdict in pipe.execute()]
        except self._errors as exc:
            raise DedupStoreError(f"dedup store redis://{self._where}: {exc}") from exc

    def complete_many(self, keys: list[str], owner: str) -> list[bool]:
        """:meth:`complete` for each key, in one round trip (a pipeline)."""
        args = [f"c:{owner}", max(1, int(self.ttl * 1000))]
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                self._complete(keys=[self._key(key)], args=args, client=pipe)
            return [bool(ours) for ours in pipe.execute()]
        except self._errors as exc:
            raise DedupStoreError(f"dedup store redis://{self._where}: {exc}") from exc

    def release(self, key: str, owner: str) -> None:
        try:
            self._client.eval(_RELEASE, 1, self._key(key), f"c:{owner}")
        except self._errors as exc:
            raise DedupStoreError(f"dedup store redis://{self._where}: {exc}") from exc

    def close(self) -> None:
        self._client.close()
