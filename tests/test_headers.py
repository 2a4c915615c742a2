"""The stack trace written into rk.exception.stacktrace reads like Python's own."""

from __future__ import annotations

import re
import traceback

import pytest

from resilient_kafka.headers import stack_trace


def _inner() -> None:
    raise KeyError("missing")


def _caused() -> None:
    try:
        _inner()
    except KeyError as exc:
        raise ValueError("bad\nvalue") from exc


def _during() -> None:
    try:
        _caused()
    except ValueError:
        raise RuntimeError("while handling")  # noqa: B904 - the implicit context is the point


def _noted() -> None:
    exc = OSError("disk")
    exc.add_note("while writing the ledger")
    raise exc


def _without_carets(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not re.fullmatch(r"\s*[~^]+\s*", line))


@pytest.mark.parametrize("raiser", [_inner, _caused, _during, _noted])
def test_stack_trace_matches_traceback_without_the_carets(raiser) -> None:
    for _ in range(2):  # the second time the frames come from the cache
        with pytest.raises(Exception) as info:
            raiser()
        expected = _without_carets("".join(traceback.format_exception(info.value)))
        assert _without_carets(stack_trace(info.value)) == expected


def test_stack_trace_of_an_exception_never_raised_and_of_a_cycle() -> None:
    assert stack_trace(ValueError("never raised")) == "ValueError: never raised\n"
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a cycle must not loop forever
    assert "ValueError: a" in stack_trace(a)


def test_an_exception_whose_str_fails_is_still_reported() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert "str() failed" in stack_trace(Broken())


def test_exception_groups_keep_their_sub_exceptions() -> None:
    def fails() -> None:
        raise ExceptionGroup("two failed", [ValueError("first"), KeyError("second")])

    with pytest.raises(ExceptionGroup) as info:
        fails()
    text = stack_trace(info.value)
    assert "ValueError: first" in text and "KeyError: 'second'" in text
    assert text == "".join(traceback.format_exception(info.value))
