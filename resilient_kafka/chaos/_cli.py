"""``resilient-kafka chaos list`` / ``resilient-kafka chaos run [NAME ...]``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from resilient_kafka.errors import ConfigurationError


def add_parser(commands: Any) -> None:
    chaos = commands.add_parser(
        "chaos", help="run fault scenarios (broker kills, outages, toxics) and check invariants"
    )
    sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="list the built-in scenarios")
    listing.set_defaults(func=_cmd_list)
    run = sub.add_parser("run", help="run scenarios (all built-in ones when none is named)")
    run.add_argument("names", nargs="*", metavar="NAME", help="built-in scenario names")
    run.add_argument(
        "-f", "--file", action="append", default=[], help="a scenario TOML file (repeatable)"
    )
    run.add_argument(
        "--profile",
        choices=("short", "long"),
        default="short",
        help="short (CI, ~25 s a scenario) or long (soak); default short",
    )
    run.add_argument("--messages", type=int, help="messages per scenario (overrides the profile)")
    run.add_argument("--duration", type=float, help="seconds of load; fault times scale with it")
    run.add_argument("--seed", type=int, default=1, help="seed of the timeline draws (default 1)")
    run.add_argument(
        "--report", default="chaos-report", help="report directory (default chaos-report/)"
    )
    run.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="a real cluster whose listeners go through Toxiproxy (default: embedded broker)",
    )
    run.add_argument(
        "--toxiproxy-url",
        default=os.environ.get("TOXIPROXY_URL"),
        help="a Toxiproxy server to use (default: the built-in one, embedded)",
    )
    run.add_argument("--keep", action="store_true", help="keep the workers' logs and ledgers")
    run.set_defaults(func=_cmd_run)


def _cmd_list(args: argparse.Namespace) -> int:
    from resilient_kafka.chaos.scenario import builtin

    scenarios = builtin()
    width = max(len(s.name) for s in scenarios)
    for scenario in scenarios:
        faults = ", ".join(f.label() for f in scenario.faults) or "no faults"
        print(f"{scenario.name:<{width}} {scenario.description} [{faults}]")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from resilient_kafka.chaos import run_all
    from resilient_kafka.chaos.runner import PROFILES
    from resilient_kafka.chaos.scenario import builtin, load

    known = {s.name: s for s in builtin()}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise ConfigurationError(
            f"unknown scenario(s) {unknown}; `resilient-kafka chaos list` shows "
            f"{sorted(known)}, and --file runs your own"
        )
    scenarios = [known[n] for n in args.names] + [load(path) for path in args.file]
    if not scenarios:
        scenarios = list(known.values())
    profile = PROFILES[args.profile]
    if args.messages is not None and args.messages < 1:
        raise ConfigurationError(f"--messages must be positive, got {args.messages}")
    if args.duration is not None and args.duration < 2:
        raise ConfigurationError(f"--duration must be at least 2 seconds, got {args.duration}")
    workdir = Path(tempfile.mkdtemp(prefix="rk-chaos-"))
    try:
        results = run_all(
            scenarios,
            messages=args.messages or profile.messages,
            duration=args.duration or profile.duration,
            drain_timeout=profile.drain_timeout,
            seed=args.seed,
            report=Path(args.report),
            bootstrap=args.bootstrap,
            toxiproxy_url=args.toxiproxy_url,
            workdir=workdir,
        )
    finally:
        if args.keep:
            print(f"logs and ledgers kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [r.name for r in results if not r.passed and not r.skipped]
    if failed:
        print(f"chaos: {len(failed)} scenario(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
