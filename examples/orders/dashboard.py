"""The live view: orders by state, saga steps in flight, the payment breaker, dead letters
and how far the read model is behind, refreshed from the sampler four times a second."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.columns import Columns
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from examples.orders.saga import STATES

if TYPE_CHECKING:
    from examples.orders.chaos import Sample

BREAKER_STYLE = {"closed": "green", "open": "bold red", "half-open": "yellow", "?": "dim"}


def render(sample: Sample | None, message: str, title: str) -> Any:
    if sample is None:
        return Panel(message, title=f"orders system: {title}")
    states = Table("state", "orders", "view", box=None)
    for state in STATES:
        states.add_row(
            state, str(sample.by_state.get(state, 0)), str(sample.view_by_state.get(state, 0))
        )
    steps = Table("step", "awaiting a reply", box=None)
    for step, n in sample.steps_in_flight.items():
        steps.add_row(step, str(n))
    steps.add_row("re-sends", str(sample.resends))
    steps.add_row("outbox backlog", str(sample.outbox_backlog))
    health = Table("", "", box=None, show_header=False)
    health.add_row(
        "payment breaker", f"[{BREAKER_STYLE.get(sample.breaker, 'dim')}]{sample.breaker}[/]"
    )
    health.add_row("paused for it", f"{sample.paused_for_breaker} partitions")
    health.add_row("view behind by", f"{sample.divergence} orders")
    health.add_row("view lag p95", f"{sample.view_lag_ms_p95} ms")
    by_group = ", ".join(f"{g} {n}" for g, n in sorted(sample.dead_letters.items()) if n)
    health.add_row("dead letters", f"{sum(sample.dead_letters.values())} ({by_group or 'none'})")
    for name, up in sample.up.items():
        health.add_row(name, "[green]up[/]" if up else "[red]down[/]")
    return Panel(
        Group(
            f"t = {sample.t:5.1f} s   accepted {sample.accepted}   {message}",
            Columns(
                [
                    Panel(states, title="orders by state"),
                    Panel(steps, title="saga steps"),
                    Panel(health, title="health"),
                ]
            ),
        ),
        title=f"orders system: {title}",
    )
