"""SIGHUP: re-read executor.yaml and apply what can change without a restart.

The supervisor re-reads the file (with the same command-line flags on top), keeps the new
values of RELOADABLE keys, names the other changed keys as needing a restart, writes the
result to <run_dir>/config.json and passes SIGHUP on to the server and the workers, which
read that file and apply it. Children started later get the new values too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable

from engine.config import Config

log = logging.getLogger(__name__)

# What a running process can take over: logging and the action timeouts.
RELOADABLE = ("debug", "default_timeout_s", "max_timeout_s")


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, "config.json")


def merge(current: Config, reread: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, reloadable keys that changed, other keys that changed)."""
    applied: list[str] = []
    restart: list[str] = []
    for f in dataclasses.fields(Config):
        if getattr(current, f.name) != getattr(reread, f.name):
            (applied if f.name in RELOADABLE else restart).append(f.name)
    merged = dataclasses.replace(current, **{k: getattr(reread, k) for k in applied})
    return merged, applied, restart


def publish(config: Config) -> None:
    path = config_path(config.run_dir)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json())
    os.replace(tmp, path)


def install(loop: asyncio.AbstractEventLoop, config: Config,
            apply: Callable[[Config], None]) -> None:
    """In a child: on SIGHUP, read the published config and hand it to apply."""
    import signal

    def on_sighup() -> None:
        try:
            with open(config_path(config.run_dir)) as f:
                new = Config.from_json(f.read())
        except (OSError, ValueError, TypeError) as e:
            log.warning("SIGHUP: cannot read the reloaded configuration: %s", e)
            return
        apply(new)
        log.info("configuration reloaded", extra={"fields": {
            k: getattr(new, k) for k in RELOADABLE}})

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
