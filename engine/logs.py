"""Logging setup: one line per event, as JSON (orjson) or text. Extra structured fields
travel in `extra={"fields": {...}}`."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "proc": os.environ.get("STOKER_PROCESS", "stoker"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = (f"{stamp} {record.levelname[0]} {os.environ.get('STOKER_PROCESS', 'stoker')} "
                f"{record.getMessage()}{' ' + extra if extra else ''}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "text", debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # grpc's own debug lines (one per RPC) drown everything else.
    logging.getLogger("grpc").setLevel(logging.INFO)


def set_debug(debug: bool) -> None:
    """Switch debug logging on or off in a running process (SIGHUP reload)."""
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
