"""Completed offsets above the committed one, carried in the commit's metadata.

With concurrent handlers a partition's records complete out of order: the committed offset can
only be the first record not done, so the records done above it would be handled again after a
crash. The commit's metadata string carries them, and a consumer that gets the partition skips
them. The format (documented in docs/concurrency.md)::

    rk:1:<base>:<encoding>:<payload>

``base`` is the committed offset (the first record not done); the payload (URL-safe base64, no
padding) says which offsets above it are done, in whichever encoding is shorter:

- ``b``: a bitset; bit ``i`` (least significant bit first in each byte) is ``base + 1 + i``;
- ``r``: run lengths as unsigned LEB128 varints, alternating not-done and done runs, starting
  with the not-done run at ``base + 1``.

Kafka caps metadata at 4,096 bytes by default (``offset.metadata.max.bytes``); an encoding longer
than :data:`MAX_CHARS` is not written, and the commit goes without it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

PREFIX = "rk:"
VERSION = "1"
MAX_CHARS = 4000
MAX_DONE = 8 * 3 * MAX_CHARS // 4  # what the longest bitset names: a bound for hostile runs


class NotOurs(ValueError):
    """Metadata this library did not write (or a version it does not know)."""


def encode(base: int, done: Iterable[int]) -> str | None:
    """The metadata for a commit at ``base`` with the offsets ``done`` above it done; "" when
    none are, None when they do not fit :data:`MAX_CHARS`."""
    offsets = sorted(o for o in done if o > base)
    if not offsets:
        return ""
    head = f"{PREFIX}{VERSION}:{base}:"
    bits = _bitset(base, offsets)
    runs = _runs(base, offsets)
    kind, payload = ("b", bits) if len(bits) <= len(runs) else ("r", runs)
    text = f"{head}{kind}:{_b64(payload)}"
    return text if len(text) <= MAX_CHARS else None


def decode(metadata: str, committed: int) -> frozenset[int]:
    """The done offsets that ``metadata`` names above the ``committed`` offset: empty when there
    is no metadata or it was written for another offset (a commit without it since); raises
    :class:`NotOurs` for metadata this library did not write or cannot read."""
    if not metadata:
        return frozenset()
    if not metadata.startswith(PREFIX):
        raise NotOurs("not written by resilient-kafka")
    parts = metadata.split(":")
    if len(parts) != 5 or parts[1] != VERSION:
        raise NotOurs(f"unknown resilient-kafka metadata version {parts[1]!r}")
    _, _, base_text, kind, payload = parts
    try:
        base = int(base_text)
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
        if kind == "b":
            done = _from_bitset(base, raw)
        elif kind == "r":
            done = _from_runs(base, raw)
        else:
            raise NotOurs(f"unknown encoding {kind!r}")
    except (ValueError, IndexError) as exc:  # binascii.Error is a ValueError
        raise NotOurs(f"malformed resilient-kafka metadata: {exc}") from exc
    return frozenset(done) if base == committed else frozenset()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _bitset(base: int, offsets: list[int]) -> bytes:
    value = 0
    for offset in offsets:
        value |= 1 << (offset - base - 1)
    return value.to_bytes((offsets[-1] - base + 7) // 8, "little")


def _from_bitset(base: int, raw: bytes) -> list[int]:
    value = int.from_bytes(raw, "little")
    done = []
    i = 0
    while value:
        if value & 1:
            done.append(base + 1 + i)
        value >>= 1
        i += 1
    return done


def _runs(base: int, offsets: list[int]) -> bytes:
    out = bytearray()
    position = base + 1  # the next offset not described yet
    i = 0
    while i < len(offsets):
        start = i
        while i + 1 < len(offsets) and offsets[i + 1] == offsets[i] + 1:
            i += 1
        _varint(out, offsets[start] - position)  # not done
        _varint(out, i - start + 1)  # done
        position = offsets[i] + 1
        i += 1
    return bytes(out)


def _from_runs(base: int, raw: bytes) -> list[int]:
    lengths = []
    value = shift = 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            lengths.append(value)
            value = shift = 0
    if shift:
        raise ValueError("truncated varint")
    if len(lengths) % 2:
        raise ValueError("odd number of runs")
    if sum(lengths[1::2]) > MAX_DONE:
        raise ValueError(f"more than {MAX_DONE} done offsets")
    done: list[int] = []
    position = base + 1
    for skip, count in zip(lengths[::2], lengths[1::2], strict=True):
        position += skip
        done.extend(range(position, position + count))
        position += count
    return done


def _varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
