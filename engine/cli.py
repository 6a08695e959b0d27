"""`stoker` (and `python -m engine`): parses the command line and hands off.

    stoker up        the embedded default: REAPI server + workers on this machine
    stoker version   what is installed, and which digest implementation is loaded
    stoker bench     measure this machine and recommend a configuration
    stoker server / stoker worker --slot N   the children `up` starts (internal)
"""

from __future__ import annotations

import argparse
import os
import sys

from engine import __version__, hashing, logs
from engine.config import CONFIG_ENV, Config, ConfigError, parse_duration, parse_size


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="stoker-data",
                   help="where the cache, action cache and run files live (default ./stoker-data)")
    p.add_argument("--listen", default="127.0.0.1:1985", help="REAPI endpoint (HOST:PORT)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: one per core)")
    p.add_argument("--concurrency", type=int, default=2, help="actions at once per worker")
    p.add_argument("--default-timeout", default="600s",
                   help="timeout for actions that set none (e.g. 600s, 10m)")
    p.add_argument("--max-timeout", default="3600s", help="largest timeout an action may ask for")
    p.add_argument("--cache-size", default="10G", help="local CAS size limit (e.g. 50G)")
    p.add_argument("--drain-grace", default="25s",
                   help="on SIGTERM, how long running actions may take to finish")
    p.add_argument("--run-as", default="auto",
                   help="user that runs actions; auto: 'nobody' when Stoker runs as root")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--debug", action="store_true", help="log every action and more")


def _config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        data_dir=args.data_dir,
        listen=args.listen,
        workers=args.workers,
        concurrency=args.concurrency,
        default_timeout_s=parse_duration(args.default_timeout, "--default-timeout"),
        max_timeout_s=parse_duration(args.max_timeout, "--max-timeout"),
        cache_max_bytes=parse_size(args.cache_size, "--cache-size"),
        drain_grace_s=parse_duration(args.drain_grace, "--drain-grace"),
        run_as=args.run_as,
    ).validated()


def _check_data_dir_reachable(config: Config) -> None:
    """Actions run as an unprivileged user when Stoker is root; their exec roots live under
    the data directory, so it must be reachable by that user. Say so now, not per action."""
    from engine.pipeline.compose import resolve_run_as
    from engine.worker.build_dir import check_searchable

    run_as = resolve_run_as(config.run_as)
    if run_as is None:
        return
    os.makedirs(config.data_dir, exist_ok=True)
    try:
        check_searchable(config.data_dir, *run_as)
    except PermissionError as e:
        raise ConfigError(
            f"--data-dir {config.data_dir}: actions run as uid {run_as[0]} (--run-as "
            f"{config.run_as}) and could not reach their exec roots: {e}. Use a data directory "
            "whose parents are searchable (e.g. /var/lib/stoker)") from None


def _child_config() -> Config:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise ConfigError(f"{CONFIG_ENV} is not set: this command is started by `stoker up`")
    return Config.from_json(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stoker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_options(sub.add_parser("up", help="serve REAPI and run workers on this machine"))
    sub.add_parser("version", help="print the version and the digest implementation")
    from engine.benchmark import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser(
        "bench", help="measure this machine for capacity planning (digest, stage, upload, "
                      "spawn, no-op actions) and recommend a configuration"))
    sub.add_parser("server", help=argparse.SUPPRESS)
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--slot", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "version":
        print(f"stoker {__version__}")
        print(f"digest implementation: {hashing.IMPLEMENTATION}")
        return 0
    if args.command == "bench":
        logs.setup("text", False)
        return bench_cli.main(args)
    try:
        if args.command == "up":
            config = _config_from_args(args)
            os.environ["STOKER_LOG_FORMAT"] = args.log_format
            os.environ["STOKER_DEBUG"] = "1" if args.debug else ""
            logs.setup(args.log_format, args.debug)
            _check_data_dir_reachable(config)
            from engine.supervisor import Supervisor

            return Supervisor(config).run()
        config = _child_config()
    except ConfigError as e:
        print(f"stoker: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(os.environ.get("STOKER_LOG_FORMAT", "text"), bool(os.environ.get("STOKER_DEBUG")))
    from engine import lifeline

    lifeline.die_with_parent(int(os.environ.get("STOKER_SUPERVISOR_PID", os.getppid())))
    if args.command == "server":
        from engine.server import app

        return app.main(config)
    from engine.worker import process

    return process.main(config, args.slot)
