"""Stoker's settings as one typed value, shared by the supervisor, the server and workers.

They come from executor.yaml (engine/config_file.py) and command-line flags. The supervisor
passes them to its children as JSON (to_json/from_json), so every process sees exactly the
same values.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import orjson

from engine import resources
from engine.runners.cgroups import pids_ceiling
from engine.runners.protocol import Limits

CONFIG_ENV = "STOKER_CONFIG_JSON"  # how the supervisor hands the config to its children
_STOKER_PIDS = 256  # threads and processes Stoker itself may need under a pid limit


class ConfigError(ValueError):
    """A setting that is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Config:
    data_dir: str = "stoker-data"
    listen: str = "127.0.0.1:1985"  # the embedded REAPI endpoint
    server: str = ""  # where workers lease from; empty: the embedded server at `listen`
    workers: int = 0  # 0: one per core
    concurrency: int = 2  # actions at once per worker
    default_timeout_s: float = 600.0
    max_timeout_s: float = 3600.0
    cache_max_bytes: int = 10 * 1024**3
    drain_grace_s: float = 25.0
    run_as: str = "auto"  # auto: a uid of action_uids per slot when root, else our own
    action_uids: str = "60000-60999"  # FIRST-LAST: the slot uids (each its own gid)
    build_dir_override: str = ""  # set by the CLI when action uids cannot reach data_dir
    heartbeat_timeout_s: float = 30.0
    keepalive_s: float = 60.0
    # executor.yaml's keys (the seed's); see config_file.py for what each means.
    api_key: str = dataclasses.field(default="", repr=False)  # a secret: never in a repr
    pool_name: str = "default"
    instance_name: str = ""
    size_class: int = 0  # Buildbarn: the size class sent in every Synchronize
    fetch_timeout_s: float = 60.0  # per call to a remote CAS (+1 s per MB for a stream)
    # BuildBuddy: the executor writes successful results to the ActionCache too (apps before
    # 2024-12 rely on it; later ones write it themselves, and the same result twice is fine).
    executor_writes_action_cache: bool = True
    num_concurrent_actions: int = 0  # 0: workers x concurrency
    memory_bytes: int = 0  # 0: the machine's
    milli_cpu: int = 0  # 0: 1000 per usable core
    isolation_type: str = "none"
    default_image: str = ""
    docker_socket: str = "/var/run/docker.sock"
    network_mode: str = "none"
    kernel_image_path: str = ""
    rootfs_image_path: str = ""
    cache_enable: bool = True
    cache_dir_override: str = ""
    platform: dict[str, str] = dataclasses.field(default_factory=dict)
    debug: bool = False
    # Stoker's own.
    protocol: str = "buildbuddy"
    health_listen: str = "0.0.0.0:8080"
    metrics_listen: str = "0.0.0.0:9090"
    log_format: str = "text"
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # The outbound key's last source: read when neither api_key nor EXECUTOR_API_KEY is set.
    api_key_file: str = ""
    cache_server: str = ""  # CAS and action cache, when not the scheduler's (joined mode)
    # The embedded endpoint's own security (stoker up): TLS, and the keys callers must send.
    listen_tls_cert_file: str = ""
    listen_tls_key_file: str = ""
    listen_api_key_file: str = ""
    upload_idle_expiry_s: float = 300.0  # a partial ByteStream upload idle this long goes
    upload_client_max_bytes: int = 0  # partial upload bytes per client; 0: cache size / 4
    orphan_grace_s: float = 60.0  # an execution no client watches this long is cancelled
    # What one action may use (executor.yaml action_limits); see action_limits().
    action_memory_bytes: int = 0  # 0: memory_bytes, else the machine's
    action_pids: int = 4096  # processes and threads
    action_tmp_bytes: int = 1 << 30  # its private /tmp, /var/tmp, /dev/shm together
    action_output_bytes: int = 0  # its outputs, stdout and stderr; see output_limit_bytes()
    # stoker up without network namespaces for actions and without listen keys: refused
    # unless this says the operator accepts that actions can call the endpoint.
    actions_share_network: bool = False
    # An action that asks for network (dockerNetwork: bridge, network: on) gets a user-mode
    # one (engine/runners/user_network.py) instead of FAILED_PRECONDITION.
    actions_may_request_network: bool = False
    # Who may call UpdateActionResult: all, keyed (a key of listen_api_key_file) or none;
    # see engine/server/action_cache_service.py.
    action_cache_writes: str = "all"

    @property
    def cache_dir(self) -> str:
        return self.cache_dir_override or os.path.join(self.data_dir, "cache")

    @property
    def build_dir(self) -> str:
        """Where exec roots live: <data_dir>/build unless the CLI moved it (engine/cli.py)."""
        return self.build_dir_override or os.path.join(self.data_dir, "build")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.data_dir, "run")

    @property
    def worker_socket(self) -> str:
        return os.path.join(self.run_dir, "workers.sock")

    @property
    def server_address(self) -> str:
        """Where workers lease: a scheduler named by `server`, else the embedded server's
        private socket."""
        return self.server or f"unix:{self.worker_socket}"

    @property
    def worker_count(self) -> int:
        count = self.workers or len(os.sched_getaffinity(0))
        if self.num_concurrent_actions:
            count = min(count, self.num_concurrent_actions)  # no worker without a slot
        return count

    def slot_capacity(self, slot: int) -> int:
        """Actions at once for worker `slot`: num_concurrent_actions shared out over the
        workers when set, else `concurrency` each."""
        if not self.num_concurrent_actions:
            return self.concurrency
        share, extra = divmod(self.num_concurrent_actions, self.worker_count)
        return share + (1 if slot < extra else 0)

    def slot_milli_cpu(self, slot: int) -> int:
        """Worker `slot`'s share of milli_cpu (the machine's cores when 0)."""
        return resources.share(self.milli_cpu or resources.machine_milli_cpu(),
                               self.worker_count, slot)

    def slot_memory_bytes(self, slot: int) -> int:
        """Worker `slot`'s share of memory_bytes (the machine's memory when 0)."""
        return resources.share(self.memory_bytes or resources.machine_memory_bytes(),
                               self.worker_count, slot)

    def action_limits(self) -> Limits:
        """What each action may use. Memory: action_limits.memory_bytes, else memory_bytes
        (what this executor offers actions in all), else the machine's memory."""
        memory = (self.action_memory_bytes or self.memory_bytes
                  or resources.machine_memory_bytes())
        pids = self.action_pids
        ceiling = pids_ceiling()
        if ceiling is not None:
            # Under a pod's pid limit, every slot's actions together leave Stoker room.
            slots = self.num_concurrent_actions or self.worker_count * self.concurrency
            pids = max(16, min(pids, (ceiling - _STOKER_PIDS) // max(1, slots)))
        return Limits(memory_bytes=memory, pids=pids)

    def output_limit_bytes(self) -> int:
        """The most one action's outputs, stdout and stderr may hold (output_limit_bytes)."""
        return output_limit_bytes(self.action_output_bytes, self.cache_max_bytes)

    def action_uid_range(self) -> tuple[int, int]:
        m = re.fullmatch(r"(\d{1,10})-(\d{1,10})", self.action_uids.strip())
        if not m:
            raise ConfigError(f"action_uids: {self.action_uids!r} must be FIRST-LAST, "
                              "e.g. 60000-60999")
        first, last = int(m.group(1)), int(m.group(2))
        if not 0 < first <= last < 2**32 - 1:
            raise ConfigError(f"action_uids: {self.action_uids!r} must satisfy "
                              "0 < FIRST <= LAST < 4294967295")
        return first, last

    def uids_per_worker(self, slot: int) -> int:
        # Twice the worker's capacity: an action keeps its uid while its outputs are
        # collected, and the worker leases the next one as soon as the command exits.
        return 2 * self.slot_capacity(slot)

    def slot_uids(self, slot: int) -> list[int]:
        """The uids worker `slot`'s actions run as, one action per uid at a time."""
        first, _ = self.action_uid_range()
        start = first + sum(self.uids_per_worker(s) for s in range(slot))
        return list(range(start, start + self.uids_per_worker(slot)))

    def validated(self) -> Config:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}", self.listen):
            raise ConfigError(f"listen: {self.listen!r} must be HOST:PORT")
        for name in ("workers", "concurrency", "cache_max_bytes", "num_concurrent_actions",
                     "memory_bytes", "milli_cpu", "action_output_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.concurrency < 1:
            raise ConfigError("concurrency: must be at least 1")
        for name in ("default_timeout_s", "max_timeout_s", "drain_grace_s", "orphan_grace_s",
                     "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.default_timeout_s > self.max_timeout_s:
            raise ConfigError("default_timeout_s: must not exceed max_timeout_s")
        if self.action_cache_writes not in ("all", "keyed", "none"):
            raise ConfigError(f"action_cache_writes: {self.action_cache_writes!r} is not one "
                              "of all, keyed, none")
        first, last = self.action_uid_range()
        needed = sum(self.uids_per_worker(s) for s in range(self.worker_count))
        if last - first + 1 < needed:
            raise ConfigError(f"action_uids: {self.action_uids!r} holds {last - first + 1} "
                              f"uids; {needed} are needed (two per concurrent action)")
        if any((self.listen_tls_cert_file, self.listen_tls_key_file, self.listen_api_key_file,
                self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.api_key_file)):
            from engine import transport  # imports grpc: only when there is a file to read

            transport.check_config(self)
        config = dataclasses.replace(self, data_dir=os.path.abspath(self.data_dir))
        if len(config.worker_socket) > 100:  # sun_path holds 108 bytes
            raise ConfigError(f"data_dir: {config.data_dir!r} is too long for the workers' "
                              "unix socket path; use a shorter directory")
        return config

    def to_json(self) -> str:
        return orjson.dumps(dataclasses.asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**orjson.loads(text))


def output_limit_bytes(configured: int, cache_bytes: int) -> int:
    """The most one action's outputs, stdout and stderr may hold together (each inode once,
    a sparse file by its apparent size): action_limits.output_bytes (`configured`), else half
    of the local cache (so that one action never evicts all of it), never more than the whole
    cache; 0 (no limit of its own) when neither is set. The free space of the cache's disk
    bounds it too, when the outputs are collected (engine/pipeline/outputs.py)."""
    if not cache_bytes:
        return configured
    return min(configured or cache_bytes // 2, cache_bytes)


def parse_duration(text: str, key: str) -> float:
    """'600s', '10m', '1h', '1.5' (seconds) → seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a duration like 600s, 10m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def parse_size(text: str, key: str) -> int:
    """'10G', '500M', '1000000' → bytes (binary multiples)."""
    m = re.fullmatch(r"(\d+)([KMGT]i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a size like 10G or 500M")
    unit = (m.group(2) or "")[:1].upper()
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
