"""The embedded server process: one asyncio loop serving REAPI and the Bots API.

It owns the scheduler queue and the ActionCache; blobs live in the shared local CAS, which
the workers read and write directly (no bytes cross gRPC between server and workers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc

from engine import heartbeat, logs, metrics, reload, status
from engine.cas.local_disk import LocalDiskStore
from engine.config import Config
from engine.errors import StokerError
from engine.proto import bots_grpc, bs_grpc, operations_grpc, re_grpc, re_pb2
from engine.server import auth
from engine.server.action_cache import ActionCache
from engine.server.action_cache_service import ActionCacheService
from engine.server.bots_service import BotsService
from engine.server.bytestream_service import ByteStreamService
from engine.server.capabilities_service import MAX_BATCH_TOTAL_SIZE_BYTES, CapabilitiesService
from engine.server.cas_service import CasService
from engine.server.decode_guard import DecodeGuard
from engine.server.execution_service import ExecutionService, OperationsService
from engine.server.scheduler import Job, Scheduler

log = logging.getLogger(__name__)

QUEUE_DEPTH_EVERY_S = 1.0

GRPC_OPTIONS = [
    # Room for a full batch plus framing; the batch rule itself is enforced per request.
    ("grpc.max_receive_message_length", MAX_BATCH_TOTAL_SIZE_BYTES + (1 << 20)),
    ("grpc.max_send_message_length", MAX_BATCH_TOTAL_SIZE_BYTES + (1 << 20)),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def scheme(config: Config) -> str:
    """How clients reach the embedded endpoint: grpcs with TLS, else grpc."""
    return "grpcs" if config.listen_tls_cert_file else "grpc"


class CountingActionCache(ActionCache):
    """The ActionCache, counting hits and misses (Execute's lookups and GetActionResult)."""

    def get(self, action):
        result = super().get(action)
        (metrics.ACTION_CACHE_MISSES if result is None else metrics.ACTION_CACHE_HITS).inc()
        return result


class EmbeddedServer:
    def __init__(self, config: Config):
        self.config = config
        self.store = LocalDiskStore(config.cache_dir, config.cache_max_bytes)
        self.cache = CountingActionCache(os.path.join(config.data_dir, "ac"), self.store)
        self.scheduler = Scheduler(self._store_result, keepalive_s=config.keepalive_s,
                                   orphan_grace_s=config.orphan_grace_s)
        # API keys first: an unauthenticated call is refused before anything parses it.
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard()]
        keys = auth.load(config.listen_api_key_file) if config.listen_api_key_file else None
        if keys is not None:
            interceptors.insert(0, keys)
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), self.server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(self.store),
                                                                self.server)
        re_grpc.add_ActionCacheServicer_to_server(
            ActionCacheService(self.cache, config.action_cache_writes, keys), self.server)
        self.execution = ExecutionService(self.store, self.cache, self.scheduler,
                                          config.max_timeout_s)
        re_grpc.add_ExecutionServicer_to_server(self.execution, self.server)
        operations_grpc.add_OperationsServicer_to_server(OperationsService(self.scheduler),
                                                         self.server)
        # Partial uploads count against the cache size; one client (its API key, else its
        # address) may hold a quarter of it unless configured (see bytestream_service.py).
        self.bytestream = ByteStreamService(
            self.store, os.path.join(config.data_dir, "uploads"),
            idle_expiry_s=config.upload_idle_expiry_s,
            client_max_bytes=config.upload_client_max_bytes or config.cache_max_bytes // 4,
            keys=keys)
        bs_grpc.add_ByteStreamServicer_to_server(self.bytestream, self.server)
        # The Bots API is for our own workers only: it listens on a unix socket in the run
        # directory, never on the public port, so no client can register as a worker and
        # report results that would then be cached. TLS and API keys (auth.py) guard the
        # public port; this socket's 0700 directory is its guard, so workers need neither.
        self.worker_server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[DecodeGuard()])
        bots_grpc.add_BotsServicer_to_server(BotsService(self.scheduler, config.keepalive_s),
                                             self.worker_server)

    def _store_result(self, job: Job, response: re_pb2.ExecuteResponse) -> None:
        # Only successful executions are cached, and never a do_not_cache action's.
        if job.do_not_cache or response.status.code != 0 or response.result.exit_code != 0:
            return
        try:
            self.cache.put(job.action_digest, response.result)
        except (OSError, StokerError) as e:
            # A full disk, or a result the cache may not hold (action_result_check.py: an
            # output path with '..', say), costs the cache entry, never the client its result.
            log.warning("action %s: result not cached: %s", job.action_digest, e)

    async def run(self) -> None:
        if self.config.listen_tls_cert_file:
            port = self.server.add_secure_port(self.config.listen, auth.server_credentials(
                self.config.listen_tls_cert_file, self.config.listen_tls_key_file))
        else:
            port = self.server.add_insecure_port(self.config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        socket_path = self.config.worker_socket
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        if self.worker_server.add_insecure_port(f"unix:{socket_path}") == 0:
            raise OSError(f"cannot listen on unix:{socket_path}")
        await self.server.start()
        await self.worker_server.start()
        log.info("serving REAPI on %s://%s%s", scheme(self.config), self.config.listen,
                 " (API key required)" if self.config.listen_api_key_file else "")
        self._write_status(serving=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reload.install(loop, self.config, self._reload)
        tasks = [asyncio.create_task(heartbeat.beat_forever(os.environ.get(heartbeat.ENV))),
                 asyncio.create_task(self._reap_forever()),
                 asyncio.create_task(self.bytestream.expire_forever()),
                 asyncio.create_task(self._export_queue_depth_forever())]
        await stop.wait()
        log.info("server stopping")
        self._write_status(serving=False)
        for t in tasks:
            t.cancel()
        await asyncio.gather(self.server.stop(grace=2.0), self.worker_server.stop(grace=1.0))
        self.store.close()

    def _reload(self, new: Config) -> None:
        logs.set_debug(new.debug)
        self.execution.max_timeout_s = new.max_timeout_s

    def _write_status(self, serving: bool) -> None:
        status.write_status(self.config.run_dir, "server",
                            {"pid": os.getpid(), "serving": serving,
                             "listen": self.config.listen})

    async def _export_queue_depth_forever(self) -> None:
        # Sampled rather than updated on every queue change: a scrape comes every few
        # seconds, and the scheduler stays free of metrics.
        last = -1
        while True:
            depth = self.scheduler.queue_depth()
            if depth != last:
                metrics.QUEUE_DEPTH.set(depth)
                last = depth
            await asyncio.sleep(QUEUE_DEPTH_EVERY_S)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            self.scheduler.reap_expired()


async def serve(config: Config) -> None:
    # Built inside the running loop: a grpc.aio server binds to the loop current at its
    # creation, and uvloop.run() starts a new one.
    await EmbeddedServer(config).run()


def main(config: Config) -> int:
    import uvloop

    uvloop.run(serve(config))
    return 0
