"""`pinfer serve`: load the engine and serve the OpenAI API over HTTP.

    pinfer serve --model smollm2-135m --port 8000 [--api-key KEY] [--served-model-name NAME]

entrypoints/cli.py registers the subcommand with `add_serve_parser(subparsers)`;
`python -m pinfer.serving.cli ARGS` is the same as `pinfer serve ARGS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence as Seq

from pinfer.errors import PinferError

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    # imported here: entrypoints/cli.py imports this module to register the subcommand
    from pinfer.entrypoints.cli import add_engine_args

    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    group.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    group.add_argument("--api-key", default=os.environ.get("PINFER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                            "(default: $PINFER_API_KEY, else none)")
    group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model name(s) clients send in 'model' (default: the --model string)")
    group.add_argument("--max-waiting", type=int, default=256,
                       help="answer 503 + Retry-After once this many requests are waiting (default: 256)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds in-flight requests get to finish before they are ended "
                            "with an error (default: 30)")
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    group.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    add_engine_args(parser)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `pinfer` command's subparsers."""
    serve = subparsers.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP",
                                  description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                              "/v1/models, /health, /metrics")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    from pinfer.entrypoints.cli import engine_config_from_args
    from pinfer.engine.llm_engine import LLMEngine
    from pinfer.serving.api_server import build_app, run_server
    from pinfer.serving.async_engine import AsyncEngine

    if args.max_waiting < 1:
        raise PinferError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if args.shutdown_timeout < 0:
        raise PinferError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    log = logging.getLogger("pinfer.serving")
    config = engine_config_from_args(args)
    if config.data_parallel_size > 1:
        from pinfer.distributed.data_parallel import DataParallelEngine

        # the models run in the replicas' processes, so the worker thread need not build it
        async_engine = AsyncEngine(DataParallelEngine(config), max_waiting=args.max_waiting)
    else:
        # the engine is built on the worker thread that will run it (faster; see async_engine.py)
        async_engine = AsyncEngine(lambda: LLMEngine(config), max_waiting=args.max_waiting)
    engine = async_engine.engine
    names = args.served_model_name or [args.model]
    log.info("model %s served as %s: context %d tokens, KV pool %d tokens, max %d sequences per step%s",
             args.model, ", ".join(names), engine.max_model_len, engine.kv_capacity_tokens, args.max_num_seqs,
             f" (each of {config.data_parallel_size} data-parallel replicas)" if config.data_parallel_size > 1 else "")
    app = build_app(async_engine, names, api_key=args.api_key)
    run_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
               access_log=not args.no_access_log)
    return 0


def main(argv: Seq[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pinfer serve", description="OpenAI-compatible server")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except PinferError as exc:
        print(f"pinfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
