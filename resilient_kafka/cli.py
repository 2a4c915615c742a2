"""The ``resilient-kafka`` command: embedded broker, demo, and (as they land) chaos, bench, dlq."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from resilient_kafka import __version__
from resilient_kafka.errors import ConfigurationError, ResilientKafkaError


def _cmd_broker(args: argparse.Namespace) -> int:
    from resilient_kafka.testing import EmbeddedKafka

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    broker = EmbeddedKafka(
        durable=args.durable,
        port=args.port,
        host=args.host,
        advertised_host=args.advertised_host,
        advertised_port=args.advertised_port,
    )
    with broker:
        storage = "durable (S3 on moto)" if args.durable else "in memory"
        print(f"bootstrap.servers={broker.bootstrap_servers}", flush=True)
        print(
            f"Embedded Kafka broker (Tansu, pid {broker.pid}) listening on {broker.listener}, "
            f"storage {storage}. Press Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            if not broker.running:
                print(
                    f"error: the broker exited unexpectedly; its log ends with:\n"
                    f"{broker.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        print("Stopping the broker.", flush=True)
    return 0


def _cmd_toxiproxy(args: argparse.Namespace) -> int:
    from resilient_kafka.toxiproxy import ToxiproxyServer

    server = ToxiproxyServer(host=args.host, port=args.port)

    def request_stop(signum: int, frame: object) -> None:
        server.shutdown()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start()
    print(f"TOXIPROXY_URL={server.url}", flush=True)
    print(f"Toxiproxy-compatible API listening on {server.url}. Press Ctrl-C to stop.", flush=True)
    server.serve_forever()
    print("Stopping Toxiproxy.", flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from resilient_kafka.demo import run_demo

    try:
        delays = tuple(float(d) for d in args.delays.split(",") if d.strip())
    except ValueError:
        raise ConfigurationError(
            f"--delays takes seconds separated by commas, like 1,3,10; got {args.delays!r}"
        ) from None
    outage = None
    if args.outage.strip().lower() != "none":
        try:
            start, duration = (float(part) for part in args.outage.split(","))
        except ValueError:
            raise ConfigurationError(
                f"--outage takes START,DURATION in seconds (or none); got {args.outage!r}"
            ) from None
        outage = (start, start + duration)
    return run_demo(
        messages=args.messages,
        rate=args.rate,
        delays=delays,
        outage=outage,
        bootstrap_servers=args.bootstrap,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    """``python -m benchmarks`` from the source tree this package was installed from."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run.py").is_file():
        raise ConfigurationError(
            "the benchmarks ship with the source tree, not the wheel: clone the repository, "
            "`make test` once, then run `python -m benchmarks` (or this command) from it"
        )
    sys.path.insert(0, str(root))
    from benchmarks.run import main as bench_main

    forwarded = args.bench_args
    return bench_main(forwarded[1:] if forwarded[:1] == ["--"] else forwarded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient-kafka",
        description="Resilient Kafka consumers and producers: tools around the library.",
    )
    parser.add_argument("--version", action="version", version=f"resilient-kafka {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser(
        "broker", help="run an embedded Kafka-compatible broker in the foreground"
    )
    broker.add_argument("--durable", action="store_true", help="keep data in a local S3 server")
    broker.add_argument("--port", type=int, default=0, help="listener port (default: a free one)")
    broker.add_argument("--host", default="127.0.0.1", help="listener address")
    broker.add_argument("--advertised-host", help="host put in metadata (e.g. a proxy's)")
    broker.add_argument("--advertised-port", type=int, help="port put in metadata")
    broker.set_defaults(func=_cmd_broker)

    toxiproxy = commands.add_parser(
        "toxiproxy", help="run a Toxiproxy-compatible server (API and proxies) in the foreground"
    )
    toxiproxy.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    toxiproxy.add_argument(
        "--port", type=int, default=8474, help="API port (default 8474; 0: a free one)"
    )
    toxiproxy.set_defaults(func=_cmd_toxiproxy)

    demo = commands.add_parser(
        "demo", help="run the main job end to end on the embedded broker and report"
    )
    demo.add_argument("--messages", type=int, default=2000, help="orders to send (default 2000)")
    demo.add_argument("--rate", type=float, default=100.0, help="orders per second (default 100)")
    demo.add_argument(
        "--delays", default="1,3,10", help="retry tier delays in seconds (default 1,3,10)"
    )
    demo.add_argument(
        "--outage",
        default="8,10",
        help="payment service outage START,DURATION in seconds, or none (default 8,10)",
    )
    demo.add_argument(
        "-b",
        "--bootstrap-servers",
        dest="bootstrap",
        help="use this cluster instead of an embedded broker (default: $KAFKA_BOOTSTRAP_SERVERS)",
    )
    demo.set_defaults(func=_cmd_demo)

    bench = commands.add_parser(
        "bench",
        help="measure throughput, latency and memory against raw confluent-kafka and peers",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="see --help")
    bench.set_defaults(func=_cmd_bench)

    from resilient_kafka import _dlq_cli
    from resilient_kafka.chaos import _cli as _chaos_cli

    _dlq_cli.add_parser(commands)
    _chaos_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option after it belongs to the benchmark harness
        argv = ["bench", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ResilientKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
