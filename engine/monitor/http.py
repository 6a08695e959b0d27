"""The monitor process: plain HTTP from stdlib threads (no asyncio, no gRPC).

    health_listen   /healthz /readyz /statusz
    metrics_listen  /metrics /statusz (the seed serves /statusz on its monitoring port too)

The same address for both serves every path on one socket. The main thread only beats the
heartbeat and waits for SIGTERM; each server answers from threads of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from engine import heartbeat
from engine.config import Config, ConfigError
from engine.monitor.probes import Probes

log = logging.getLogger(__name__)

JSON = "application/json"
# path → () → (HTTP status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]


def parse_address(text: str, key: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' → (host, port); ConfigError naming key otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} must be HOST:PORT (or off)")
    return host, int(port)


def listen_addresses(config: Config) -> list[tuple[str, str]]:
    """(key, address) for each address the monitor serves, checked; empty when both are off."""
    pairs = [(k, getattr(config, k)) for k in ("health_listen", "metrics_listen")]
    pairs = [(k, a) for k, a in pairs if a]
    for key, address in pairs:
        parse_address(address, key)
    return pairs


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted monitor rebinds past TIME_WAIT


class _V6Server(_Server):
    address_family = socket.AF_INET6


def make_server(address: str, key: str, routes: dict[str, Route]) -> ThreadingHTTPServer:
    """Bound and listening; OSError if the address is taken or unusable."""
    host, port = parse_address(address, key)
    cls = _V6Server if ":" in host else _Server

    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # an idle or slow client must not hold a thread forever

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                code, kind, body = 404, "text/plain", b"not found; try " + \
                    " ".join(sorted(routes)).encode() + b"\n"
            else:
                try:
                    code, kind, body = route()
                except Exception as e:
                    log.exception("monitor: %s failed", self.path)
                    code, kind, body = 500, "text/plain", f"{e}\n".encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # scrapes every few seconds: quiet
            log.debug("monitor: %s %s", self.address_string(), format % args)

    return cls((host, port), Handler)


def _json(probe: Callable[[], tuple[int, dict]]) -> Route:
    def route() -> tuple[int, str, bytes]:
        code, doc = probe()
        return code, JSON, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    return route


def routes_for(probes: Probes) -> dict[str, dict[str, Route]]:
    return {
        "health_listen": {"/healthz": _json(probes.healthz), "/readyz": _json(probes.readyz),
                          "/statusz": _json(probes.statusz)},
        "metrics_listen": {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, probes.metrics()),
                           "/statusz": _json(probes.statusz)},
    }


def main(config: Config) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        print("stoker: monitor: PROMETHEUS_MULTIPROC_DIR is not set: this command is started "
              "by `stoker up`", file=sys.stderr)
        return 2
    probes = Probes(config, int(os.environ.get("STOKER_SUPERVISOR_PID", os.getppid())),
                    metrics_dir)
    by_key = routes_for(probes)
    by_address: dict[str, tuple[str, dict[str, Route]]] = {}
    for key, address in listen_addresses(config):
        _, routes = by_address.setdefault(address, (key, {}))
        routes.update(by_key[key])
    servers: list[ThreadingHTTPServer] = []
    try:
        for address, (key, routes) in by_address.items():
            try:
                servers.append(make_server(address, key, routes))
            except OSError as e:
                print(f"stoker: monitor: {key}: cannot listen on {address}: "
                      f"{e.strerror or e}", file=sys.stderr, flush=True)
                return 1
            log.info("http://%s%s", address, " ".join(sorted(routes)))
        threads = [threading.Thread(target=s.serve_forever, name=f"http-{i}", daemon=True)
                   for i, s in enumerate(servers)]
        for t in threads:
            t.start()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        beat_file = os.environ.get(heartbeat.ENV)
        while not stop.is_set():
            heartbeat.beat(beat_file)
            stop.wait(heartbeat.INTERVAL_S)
        for s in servers:
            s.shutdown()
        return 0
    finally:
        for s in servers:
            s.server_close()
        probes.close()
