"""``joulegate-model-server``: serve models, or build the tiny ones.

    joulegate-model-server --listen 127.0.0.1:8000 [--config models.yaml]
    joulegate-model-server make-tiny DIR

Without ``--config`` the tiny models are served, built into the cache on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from model_server.config import ConfigError, ServerConfig, load_config

log = logging.getLogger("model_server")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joulegate-model-server",
        description="An OpenAI-compatible model server over transformers and diffusers. "
        "Run `joulegate-model-server make-tiny DIR` to build tiny local models.",
    )
    parser.add_argument(
        "--listen", type=parse_listen, default=("127.0.0.1", 8000), metavar="HOST:PORT"
    )
    parser.add_argument("--config", type=Path, help="models YAML (default: the tiny models)")
    parser.add_argument("--queue-size", type=int, help="override queue_size from the config")
    parser.add_argument("--log-level", default="INFO")
    return parser


def _make_tiny_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joulegate-model-server make-tiny",
        description="Build tiny random-weight models for every task, and a config for them.",
    )
    parser.add_argument("directory", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "make-tiny":
        return _make_tiny(_make_tiny_parser().parse_args(args[1:]))
    if args and args[0] == "serve":
        args = args[1:]
    return _serve(_serve_parser().parse_args(args))


def _make_tiny(args: argparse.Namespace) -> int:
    from model_server.tiny import build_tiny_models

    config = build_tiny_models(args.directory)
    print(f"tiny models written; serve them with: joulegate-model-server --config {config}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"joulegate-model-server: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    try:
        asyncio.run(_run_until_signal(config, host, port))
    except ConfigError as exc:  # e.g. a CUDA device asked for where there is none
        print(f"joulegate-model-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _config(args: argparse.Namespace) -> ServerConfig:
    if args.config is None:
        from model_server.tiny import ensure_tiny_models

        log.info("no --config: serving the tiny models")
        path = ensure_tiny_models()
    else:
        path = args.config
    config = load_config(path)
    if args.queue_size is not None:
        if args.queue_size < 1:
            raise ConfigError("--queue-size must be at least 1")
        config = ServerConfig(config.models, args.queue_size, config.max_body_bytes)
    return config


async def _run_until_signal(config: ServerConfig, host: str, port: int) -> None:
    from model_server.app import serve_forever

    task = asyncio.create_task(serve_forever(config, host, port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    raise SystemExit(main())
