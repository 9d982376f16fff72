"""The `joulegate` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from proxy.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joulegate",
        description="A reverse proxy that meters GPU energy per inference request.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="proxy an upstream model server and meter it")
    serve.add_argument("--upstream", help="the model server's base URL, e.g. http://127.0.0.1:8000")
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080)")
    serve.add_argument("--meter", help="auto, nvml, nvml:0,1, cpu, synthetic:WATTS or trace:FILE")
    serve.add_argument(
        "--config",
        default=os.environ.get("JOULEGATE_CONFIG"),
        help="YAML configuration file (also JOULEGATE_CONFIG)",
    )
    demo = commands.add_parser(
        "demo", help="tiny local models behind joulegate, a mixed workload, the per-task table"
    )
    demo.add_argument("--meter", default="auto", help="meter spec (default: auto)")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT for joulegate")
    demo.add_argument("--rounds", type=int, default=5, help="requests per task (default 5)")
    demo.add_argument(
        "--exit", action="store_true", help="stop after the table instead of serving on"
    )
    grafana = commands.add_parser("grafana", help="joulegate's Grafana dashboards")
    grafana_commands = grafana.add_subparsers(dest="grafana_command", required=True)
    from proxy.grafana import add_push_arguments

    add_push_arguments(
        grafana_commands.add_parser(
            "push", help="create or update the dashboards (and a Prometheus datasource) in Grafana"
        )
    )
    from proxy.report import add_arguments as add_report_arguments

    add_report_arguments(
        commands.add_parser(
            "report",
            help="energy, carbon and per-request figures from the ledger (table, csv, json, html)",
        ),
        os.environ.get("JOULEGATE_CONFIG"),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "report":
        from proxy.report import report_command

        return report_command(arguments)
    if arguments.command == "grafana":
        from proxy.grafana import push_command

        return push_command(arguments)
    if arguments.command == "demo":
        try:
            config = load_config(
                environ={}, overrides={"meter": arguments.meter, "listen": arguments.listen}
            )
        except ConfigError as error:
            print(f"joulegate: configuration error: {error}", file=sys.stderr)
            return 2
        if arguments.rounds < 1:
            print("joulegate: configuration error: rounds: expected at least 1", file=sys.stderr)
            return 2
        import asyncio

        from proxy.demo import run_demo

        return asyncio.run(run_demo(config, arguments.rounds, not arguments.exit))
    if arguments.command == "serve":
        try:
            config = load_config(
                arguments.config,
                overrides={
                    "upstream": arguments.upstream,
                    "listen": arguments.listen,
                    "meter": arguments.meter,
                },
            )
        except ConfigError as error:
            print(f"joulegate: configuration error: {error}", file=sys.stderr)
            return 2
        logging.basicConfig(
            level=config.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        from proxy.front import ListenError
        from proxy.server import run

        try:
            run(config)
        except ConfigError as error:  # found only once the meter is open (e.g. `devices`)
            print(f"joulegate: configuration error: {error}", file=sys.stderr)
            return 2
        except ListenError as error:
            print(f"joulegate: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
