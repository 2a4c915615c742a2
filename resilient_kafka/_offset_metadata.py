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

Kafka caps metadata at 4,096 bytes by default (``offset.metadata.max.bytes``); when the done
offsets do not fit :data:`MAX_CHARS`, the runs name the longest prefix of them that does.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

PREFIX = "rk:"
VERSION = "1"
MAX_CHARS = 4000
# the most done offsets one commit names (a bound on what a reader decodes: runs can name many
# in a few bytes); more are left to be handled again, as when they do not fit MAX_CHARS
MAX_DONE = 1_000_000


class NotOurs(ValueError):
    """Metadata this library did not write (or a version it does not know)."""


def encode(base: int, done: Iterable[int]) -> tuple[str, bool]:
    """The metadata for a commit at ``base`` with the offsets ``done`` above it done, and
    whether it names all of them: when they do not fit :data:`MAX_CHARS`, it names the longest
    prefix that fits (any subset is correct: the others are handled again after a crash).
    Linear in the number of done offsets; "" when there are none."""
    offsets = sorted(o for o in done if o > base)
    if not offsets:
        return "", True
    capped = len(offsets) > MAX_DONE
    if capped:
        offsets = offsets[:MAX_DONE]
    head = f"{PREFIX}{VERSION}:{base}:"
    room = (MAX_CHARS - len(head) - 2) * 3 // 4  # payload bytes that fit, base64 aside
    runs, complete = _runs(base, offsets, room)
    span = offsets[-1] - base
    if complete and (span + 7) // 8 < len(runs):  # a bitset is shorter: dense offsets
        return f"{head}b:{_b64(_bitset(base, offsets))}", not capped
    if not complete and (span + 7) // 8 <= room:
        return f"{head}b:{_b64(_bitset(base, offsets))}", not capped
    return f"{head}r:{_b64(runs)}", complete and not capped


def decode(metadata: str, committed: int) -> frozenset[int]:
    """The done offsets that ``metadata`` names above the ``committed`` offset: empty when there
    is no metadata or it was written for another offset (a commit without it since); raises
    :class:`NotOurs` for metadata this library did not write or cannot read."""
    if not metadata:
        return frozenset()
    if not metadata.startswith(PREFIX):
        raise NotOurs("not written by resilient-kafka")
    if len(metadata) > MAX_CHARS:
        raise NotOurs(f"longer than {MAX_CHARS} characters")
    parts = metadata.split(":")
    if len(parts) != 5 or parts[1] != VERSION:
        raise NotOurs(f"unknown resilient-kafka metadata version {parts[1]!r}")
    _, _, base_text, kind, payload = parts
    if kind not in ("b", "r"):
        raise NotOurs(f"unknown encoding {kind!r}")
    try:
        base = int(base_text)
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise NotOurs(f"malformed resilient-kafka metadata: {exc}") from exc
    if base != committed:  # written with another commit: not worth decoding
        return frozenset()
    try:
        done = _from_bitset(base, raw) if kind == "b" else _from_runs(base, raw)
    except ValueError as exc:
        raise NotOurs(f"malformed resilient-kafka metadata: {exc}") from exc
    return frozenset(done)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _bitset(base: int, offsets: list[int]) -> bytes:
    bits = bytearray((offsets[-1] - base + 7) // 8)
    for offset in offsets:
        i = offset - base - 1
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def _from_bitset(base: int, raw: bytes) -> list[int]:
    done: list[int] = []
    for index, byte in enumerate(raw):
        if byte:
            first = base + 1 + 8 * index
            done.extend(first + bit for bit in range(8) if byte >> bit & 1)
    return done


def _runs(base: int, offsets: list[int], room: int) -> tuple[bytes, bool]:
    """Run lengths (not done, done, ...) of ``offsets`` above ``base`` in at most ``room``
    bytes; False when they stop short of the last offset."""
    out = bytearray()
    position = base + 1  # the next offset not described yet
    i = 0
    while i < len(offsets):
        start = i
        while i + 1 < len(offsets) and offsets[i + 1] == offsets[i] + 1:
            i += 1
        pair = bytearray()
        _varint(pair, offsets[start] - position)  # not done
        _varint(pair, i - start + 1)  # done
        if len(out) + len(pair) > room:
            return bytes(out), False
        out += pair
        position = offsets[i] + 1
        i += 1
    return bytes(out), True


def _from_runs(base: int, raw: bytes) -> list[int]:
    lengths = []
    value = shift = 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")
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
