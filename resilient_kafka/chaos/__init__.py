"""Chaos scenarios: faults injected through the Toxiproxy API (and process kills) while
ResilientConsumer workers process a keyed load; invariants prove nothing is lost.

``resilient-kafka chaos run`` is the command; :func:`run_all` is the same from Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resilient_kafka.chaos.runner import Result, run_scenario
from resilient_kafka.chaos.scenario import Fault, Scenario, builtin, load, parse

__all__ = ["Fault", "Result", "Scenario", "builtin", "load", "parse", "run_all", "run_scenario"]


def run_all(
    scenarios: list[Scenario],
    *,
    messages: int,
    duration: float,
    drain_timeout: float,
    seed: int,
    report: Path,
    bootstrap: str | None = None,
    toxiproxy_url: str | None = None,
    workdir: Path,
) -> list[Result]:
    """Run ``scenarios`` one after another (each on a fresh embedded stack, or all on the given
    cluster; protocol-fault scenarios each on a fresh mock cluster), print the summary, write
    the report."""
    from resilient_kafka._extras import require

    require("rich", extra="chaos", purpose="the chaos run's progress view")
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    from resilient_kafka.chaos import report as chaos_report
    from resilient_kafka.chaos._stack import Stack

    console = Console(stderr=True)
    # A real cluster is shared by the scenarios; the embedded stack is started afresh for each
    # one, so every scenario meets the same broker: an empty store, no groups left by the last
    # one (the local S3 server's listings cost grows with every object the store holds).
    stack: Stack | None = None
    mock: Stack | None = None  # librdkafka's mock cluster, for one protocol-fault scenario
    if bootstrap:
        with console.status("connecting to the cluster and Toxiproxy..."):
            stack = Stack.external_stack(bootstrap, toxiproxy_url)
    proxy = f"Toxiproxy {toxiproxy_url}" if toxiproxy_url else "the built-in Toxiproxy-API proxy"
    topology = (
        f"cluster {bootstrap} through {proxy}"
        if bootstrap
        else f"embedded Tansu broker (S3 storage where it is killed) behind {proxy}"
    )
    if any(s.cluster == "mock" for s in scenarios):
        topology += "; protocol faults on librdkafka's mock cluster (3 brokers)"
    results: list[Result] = []
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            overall = progress.add_task("scenarios", total=len(scenarios))
            for scenario in scenarios:
                task = progress.add_task(f"  {scenario.name}: starting", total=messages)

                def status(
                    phase: str,
                    done: int,
                    total: int,
                    task: TaskID = task,
                    name: str = scenario.name,
                ) -> None:
                    progress.update(task, description=f"  {name}: {phase}", completed=done)

                if scenario.cluster == "mock":  # its own cluster, also with --bootstrap
                    progress.update(task, description=f"  {scenario.name}: starting the cluster")
                    mock = Stack.mock_stack()
                elif not bootstrap:
                    progress.update(task, description=f"  {scenario.name}: starting the broker")
                    if stack is not None:
                        stack.close()
                    stack = None
                    # S3-backed storage only where the broker is killed: it costs CPU
                    durable = any(fault.kind == "broker-kill" for fault in scenario.faults)
                    stack = Stack.embedded_stack(toxiproxy_url, seed, durable=durable)
                where = mock if scenario.cluster == "mock" else stack
                assert where is not None
                try:
                    result = run_scenario(
                        where,
                        scenario.scaled(duration),
                        messages=messages,
                        seed=seed,
                        drain_timeout=drain_timeout,
                        workdir=workdir / scenario.name,
                        status=status,
                    )
                finally:
                    if mock is not None:
                        mock.close()
                        mock = None
                verdict = "skipped" if result.skipped else ("PASS" if result.passed else "FAIL")
                progress.update(task, description=f"  {scenario.name}: {verdict}")
                progress.stop_task(task)  # its clock stops also when it never reached the total
                progress.advance(overall)
                results.append(result)
                if verdict == "FAIL":
                    _show_evidence(console, workdir / scenario.name, report, scenario.name)
    finally:
        if stack is not None:
            stack.close()
        # whatever ran is reported, also when a scenario broke the run or Ctrl-C stopped it
        meta = {"topology": topology, "messages": messages, "duration": duration, "seed": seed}
        written = chaos_report.write(results, report, meta)
        print(chaos_report.markdown(results, meta), flush=True)
        console.print(
            f"report: {', '.join(str(p) for p in written[:2])} (+ {len(written) - 2} timelines)"
        )
    return results


def _show_evidence(console: Any, workdir: Path, report: Path, name: str) -> None:
    """Keep a failed scenario's logs next to the report and print their tails; a failure to
    do so is reported, never fatal to the run."""
    from resilient_kafka.chaos import report as chaos_report

    kept = report / f"evidence-{name}"
    try:
        tails = chaos_report.keep_evidence(workdir, kept)
    except OSError as exc:
        console.print(f"{name} failed; its logs could not be kept: {exc}", markup=False)
        return
    if not kept.is_dir():  # it broke before its workdir existed
        return
    console.print(f"{name} failed; its logs and ledger: {kept}", markup=False)
    if tails:
        console.print(tails, markup=False, highlight=False, soft_wrap=True)
