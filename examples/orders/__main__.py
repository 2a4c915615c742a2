"""``python -m examples.orders up`` starts the whole system with a live view;
``python -m examples.orders chaos [short|full|plan.toml]`` runs a chaos test of it."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.orders", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the system on the embedded broker, with a live view")
    up.add_argument("--rate", type=float, default=5.0, help="orders a second (default 5)")
    up.add_argument("--orders", type=int, default=0, help="stop the load after N (0: never)")
    up.add_argument("--workdir", type=Path, help="where the databases and logs go")
    up.add_argument("--durable", action="store_true", help="broker storage in a local S3")
    up.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    chaos = sub.add_parser("chaos", help="a chaos run: load, faults, invariants, report")
    chaos.add_argument(
        "plan", nargs="?", default="full", help="short, full, or a plan file (see scenarios/)"
    )
    chaos.add_argument("--workdir", type=Path, help="where the report, databases and logs go")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _up(args)
    return _chaos(args)


def _workdir(given: Path | None, prefix: str) -> Path:
    return given or Path(tempfile.mkdtemp(prefix=prefix))


def _chaos(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from examples.orders import chaos, dashboard

    console = Console()
    try:
        plan = chaos.load_plan(args.plan)
    except chaos.PlanError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    workdir = _workdir(args.workdir, f"orders-chaos-{plan.name}-")
    console.print(
        f"chaos run [bold]{plan.name}[/bold]: {plan.orders} orders at {plan.rate:g}/s, "
        f"{len(plan.faults)} faults; files in {workdir}"
    )
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        result = chaos.run(
            plan,
            workdir,
            on_sample=lambda sample, message: live.update(
                dashboard.render(sample, message, plan.name)
            ),
        )
    from rich.markdown import Markdown

    console.print(Markdown((workdir / "report.md").read_text()))
    console.print(f"report: {workdir / 'report.md'}, timeline: {workdir / 'timeline.png'}")
    return 0 if result.passed else 1


def _up(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from examples.orders import config as c
    from examples.orders import dashboard
    from examples.orders.chaos import Sampler
    from examples.orders.loadgen import LoadGenerator
    from examples.orders.system import System

    console = Console()
    workdir = _workdir(args.workdir, "orders-")
    console.print(f"starting the order system; databases and logs in {workdir}")
    with console.status("starting...") as status:
        system = System(workdir, c.PROFILES["normal"], durable=args.durable)
        system.start(lambda step: status.update(f"starting {step}..."))
    try:
        console.print(f"orders API  {system.url('orders')}/orders   (POST, GET /orders/<id>)")
        console.print(f"order view  {system.url('view')}/orders/<id>   /stats")
        console.print(f"metrics     {system.metrics_url('payments')} (payments; each has one)")
        console.print("Ctrl-C stops everything")
        load = LoadGenerator(
            system.url("orders"),
            rate=args.rate,
            orders=args.orders,
            run_id=f"up{int(time.time()) % 100000}",
        ).start()
        sampler = Sampler(system, load).start()
        end = time.monotonic() + args.seconds if args.seconds else float("inf")
        with Live(console=console, refresh_per_second=4) as live:
            while time.monotonic() < end:
                live.update(dashboard.render(sampler.latest, "running (Ctrl-C stops)", "up"))
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping: every service finishes what it holds, commits and closes")
        system.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
