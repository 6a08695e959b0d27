"""Logging setup: one line per event, as JSON (orjson) or text. Extra structured fields
travel in `extra={"fields": {...}}`."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

# Credentials no log line may show: the API key, and the JWTs of recent tasks. A scheduler or
# CAS may quote what it was sent back in an error's details, which we log. The newest
# _MAX_SECRETS are kept (JWTs come and go with tasks); the API key stays for good.
REDACTED = "[redacted]"
_MAX_SECRETS = 1024
_MIN_SECRET = 8  # shorter strings would redact ordinary words
_lasting: dict[str, None] = {}
_recent: dict[str, None] = {}
_secrets: tuple[str, ...] = ()  # what format() scrubs: rebuilt on change, read lock-free


def redact(secret: str, *, lasting: bool = False) -> None:
    """Never show secret in a log line from now on (lasting=True: however many come after)."""
    global _secrets
    if not secret or len(secret) < _MIN_SECRET or secret in _lasting:
        return
    if lasting:
        _lasting[secret] = None
    else:
        _recent.pop(secret, None)
        _recent[secret] = None
        while len(_recent) > _MAX_SECRETS:
            del _recent[next(iter(_recent))]
    _secrets = tuple(_lasting) + tuple(_recent)


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


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
        return scrub(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = (f"{stamp} {record.levelname[0]} {os.environ.get('STOKER_PROCESS', 'stoker')} "
                f"{record.getMessage()}{' ' + extra if extra else ''}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


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
