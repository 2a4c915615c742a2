"""``resilient-kafka dlq``: a thin shell over :mod:`resilient_kafka.dlq`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from resilient_kafka import _config, dlq
from resilient_kafka._extras import require
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.policies import topic_name


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("dlq", help="inspect, summarise and replay dead-letter queues")
    actions = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, filters: bool = True) -> None:
        p.add_argument("--topic", help="source topic (with --group instead of a DLQ topic name)")
        p.add_argument("--group", help="consumer group (with --topic)")
        p.add_argument(
            "-b", "--bootstrap-servers", dest="bootstrap", help="default: $KAFKA_BOOTSTRAP_SERVERS"
        )
        p.add_argument(
            "-X",
            dest="settings",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any client setting, e.g. -X security.protocol=SASL_SSL (repeatable)",
        )
        if filters:
            p.add_argument("--since", help="ISO-8601, epoch s/ms, or relative like -2h")
            p.add_argument("--until", help="same forms as --since")
            p.add_argument("--exception", help="exception type contains this (case-insensitive)")
            p.add_argument("--reason", help="exhausted | non_retryable | deserialization | timeout")
            p.add_argument("--key", help="exact record key")
            p.add_argument(
                "--header", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
            )

    listing = actions.add_parser("list", help="a table (or --json) of DLQ records")
    listing.add_argument("dlq_topic", nargs="?", help="the DLQ topic, e.g. orders.payments.dlq")
    common(listing)
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(func=_list)

    show = actions.add_parser("show", help="one record in full")
    show.add_argument("where", nargs="+", metavar="[DLQ_TOPIC] OFFSET")
    show.add_argument("-p", "--partition", type=int, help="needed when several partitions have it")
    common(show, filters=False)
    show.set_defaults(func=_show)

    summary = actions.add_parser("stats", help="counts by exception, reason, partition, hour")
    summary.add_argument("dlq_topic", nargs="?")
    common(summary)
    summary.set_defaults(func=_stats)

    again = actions.add_parser("replay", help="re-publish records (first retry tier by default)")
    again.add_argument("dlq_topic", nargs="?")
    common(again)
    again.add_argument(
        "--to", default="retry", help="retry (default: the group's first tier), source, or a topic"
    )
    again.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    again.add_argument("--rate", type=float, help="records per second at most")
    again.add_argument("--max-replays", type=int, default=3, help="refuse records replayed more")
    again.add_argument("--force", action="store_true", help="replay even past --max-replays")
    again.add_argument("--limit", type=int, help="stop after this many replays")
    again.add_argument("--replay-group", help="progress group (default rk-replay.<dlq topic>)")
    again.set_defaults(func=_replay)


# -- shared -------------------------------------------------------------------------------


def _client_config(args: argparse.Namespace) -> dict[str, Any]:
    bootstrap = args.bootstrap or os.environ.get(_config.BOOTSTRAP_ENV, "").strip()
    if not bootstrap:
        raise ConfigurationError(
            "no cluster given: pass -b HOST:PORT or set KAFKA_BOOTSTRAP_SERVERS"
        )
    conf: dict[str, Any] = {**_config.extra_config_from_env(), "bootstrap.servers": bootstrap}
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"-X takes KEY=VALUE, got {setting!r}")
        conf[key.strip()] = value
    return conf


def _dlq_topic(args: argparse.Namespace, given: str | None) -> str:
    if given and (args.topic or args.group):
        raise ConfigurationError("give either a DLQ topic or --topic with --group, not both")
    if given:
        return given
    if args.topic and args.group:
        return topic_name("{topic}.{group}.dlq", topic=args.topic, group=args.group)
    raise ConfigurationError("which DLQ? give its topic name, or --topic and --group")


def _selection(args: argparse.Namespace) -> dlq.Selection:
    header_match = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--header takes NAME=VALUE, got {item!r}")
        header_match[name] = value
    return dlq.Selection(
        since=dlq.parse_time(args.since) if args.since else None,
        until=dlq.parse_time(args.until) if args.until else None,
        exception=args.exception,
        reason=args.reason,
        key=args.key,
        headers=header_match,
    )


def _kafka_errors(func: Any) -> Any:
    """Client errors (bad -X settings, unreachable cluster) as one line, not a traceback."""

    def wrapper(args: argparse.Namespace) -> int:
        from confluent_kafka import KafkaException

        try:
            result: int = func(args)
        except KafkaException as exc:
            raise dlq.DLQError(f"Kafka client error: {exc.args[0] if exc.args else exc}") from None
        return result

    return wrapper


def _console() -> Any:
    return require("rich.console", extra="cli", purpose="resilient-kafka dlq").Console()


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(value: str | None, width: int = 60) -> str:
    value = (value or "").replace("\n", " ")
    return value if len(value) <= width else value[: width - 1] + "…"


# -- actions ------------------------------------------------------------------------------


@_kafka_errors
def _list(args: argparse.Namespace) -> int:
    topic = _dlq_topic(args, args.dlq_topic)
    records = dlq.read(_client_config(args), topic, _selection(args))
    if args.json:
        json.dump([r.to_json() for r in records], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    console = _console()
    if not records:
        console.print(f"No matching records in {topic}.")
        return 0
    table = require("rich.table", extra="cli", purpose="resilient-kafka dlq").Table(
        title=f"{topic}: {len(records)} record(s)"
    )
    for column in ("p", "offset", "time (UTC)", "key", "original", "att", "reason", "exception"):
        table.add_column(column)
    for r in records:
        original = f"{r.original_topic}[{r.original_partition}]@{r.original_offset}"
        table.add_row(
            str(r.partition),
            str(r.offset),
            _when(r.timestamp),
            _short(dlq.text(r.key), 24),
            original if r.original_topic else "-",
            "-" if r.attempt is None else str(r.attempt),
            r.reason or "-",
            f"{r.exception_type or '-'}: {_short(r.exception_message, 50)}",
        )
    console.print(table)
    return 0


@_kafka_errors
def _show(args: argparse.Namespace) -> int:
    *given, offset_text = args.where
    if len(given) > 1:
        raise ConfigurationError("dlq show takes [DLQ_TOPIC] OFFSET")
    try:
        offset = int(offset_text)
    except ValueError:
        raise ConfigurationError(f"OFFSET must be an integer, got {offset_text!r}") from None
    topic = _dlq_topic(args, given[0] if given else None)
    r = dlq.fetch(_client_config(args), topic, offset, args.partition)
    console = _console()
    console.print(
        f"[bold]{topic}[/bold] partition {r.partition} offset {r.offset}", highlight=False
    )
    fields = [
        ("written by", r.family),
        ("timestamp", f"{_when(r.timestamp)} ({r.timestamp})"),
        ("key", dlq.text(r.key)),
        ("original", f"{r.original_topic}[{r.original_partition}]@{r.original_offset}"),
        ("original timestamp", _when(r.original_timestamp)),
        ("attempt", str(r.attempt)),
        ("reason", str(r.reason)),
        *([("schema", r.schema)] if r.schema else []),
        ("consumer group", str(r.consumer_group)),
        ("replayed", str(r.replay_count)),
        ("exception", f"{r.exception_type}: {r.exception_message}"),
    ]
    for name, value in fields:
        console.print(f"[bold]{name:>18}[/bold]  {value}", highlight=False, markup=True)
    for problem in r.problems:
        console.print(f"[yellow]undecodable header[/yellow] {problem}", highlight=False)
    console.print("[bold]headers[/bold]")
    for header, raw in r.headers:
        if header.endswith("stacktrace"):
            continue
        console.print(f"  {header} = {dlq.text(raw)}", highlight=False, markup=False)
    if r.stacktrace:
        console.print("[bold]stack trace[/bold]")
        console.print(r.stacktrace.rstrip(), highlight=False, markup=False)
    kind, rendering = dlq.render_value(r.value)
    console.print(f"[bold]value[/bold] ({kind}, {len(r.value or b'')} bytes)")
    console.print(rendering, highlight=False, markup=False)
    return 0


@_kafka_errors
def _stats(args: argparse.Namespace) -> int:
    topic = _dlq_topic(args, args.dlq_topic)
    summary = dlq.stats(dlq.read(_client_config(args), topic, _selection(args)))
    console = _console()
    if not summary.total:
        console.print(f"No matching records in {topic}.")
        return 0
    console.print(f"[bold]{topic}[/bold]: {summary.total} record(s)")
    for title, counts in (
        ("exception type", summary.by_exception),
        ("reason", summary.by_reason),
        ("original partition", summary.by_original_partition),
        ("hour (UTC)", summary.by_hour),
    ):
        console.print(f"\n[bold]by {title}[/bold]")
        most = max(counts.values())
        items = sorted(counts.items()) if title.startswith("hour") else counts.most_common()
        for name, count in items:
            bar = "█" * max(1, round(30 * count / most))
            console.print(f"  {_short(name, 40):<40} {count:>6}  {bar}", highlight=False)
    return 0


@_kafka_errors
def _replay(args: argparse.Namespace) -> int:
    topic = _dlq_topic(args, args.dlq_topic)
    config = _client_config(args)
    console = _console()
    if args.to == "source":
        print(
            "warning: replaying to the source topic: every consumer group subscribed to it "
            "will process these records again",
            file=sys.stderr,
        )
    progress_mod = require("rich.progress", extra="cli", purpose="resilient-kafka dlq")
    with progress_mod.Progress(console=console, transient=True) as bar:
        task = bar.add_task("replaying" if not args.dry_run else "selecting", total=None)
        report = dlq.replay(
            config,
            topic,
            to=args.to,
            selection=_selection(args),
            dry_run=args.dry_run,
            rate=args.rate,
            max_replays=args.max_replays,
            force=args.force,
            limit=args.limit,
            replay_group=args.replay_group,
            progress=lambda done, seen: bar.update(task, completed=done),
        )
    verb = "would replay" if report.dry_run else "replayed"
    console.print(f"{verb} {report.replayed} record(s) from {topic}", highlight=False)
    for target, count in report.targets.most_common():
        console.print(f"  → {target}: {count}", highlight=False)
    if report.skipped_filtered:
        console.print(f"  not selected: {report.skipped_filtered}", highlight=False)
    if report.refused_replay_limit:
        console.print(
            f"  refused (replayed {args.max_replays}+ times already; --force to override): "
            f"{report.refused_replay_limit}",
            highlight=False,
        )
    return 0
