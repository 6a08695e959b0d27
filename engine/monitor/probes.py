"""What the monitor answers: liveness, readiness, the status document and the metrics.

Facts come from the status files (engine/status.py), the metric files every process keeps
(engine/metrics.py, summed by prometheus_client's MultiProcessCollector) and, at scrape
time, the CAS index and /proc. Every answer is computed fresh per request.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from engine import __version__, hashing, metrics, status
from engine.config import Config
from engine.pids import pid_alive

if TYPE_CHECKING:  # for the annotation only: stats() imports the store on first use
    from engine.cas.local_disk import LocalDiskStore

log = logging.getLogger(__name__)


# ---- figures read at scrape time ----------------------------------------------------------


def _cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open(path) as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields)
    return total - idle, total


def memory_utilization(path: str = "/proc/meminfo") -> float:
    values: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0])
                if len(values) == 2:
                    break
    total = values.get("MemTotal", 0)
    return 1.0 - values.get("MemAvailable", total) / total if total else 0.0


class SystemCollector:
    """The machine's CPU use (over the time since the previous scrape) and memory use, as
    fractions 0..1."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = _cpu_times()
        self._cpu = 0.0

    def cpu_utilization(self) -> float:
        with self._lock:
            busy, total = _cpu_times()
            if total > self._last[1]:  # no tick since the last scrape: keep the last figure
                self._cpu = (busy - self._last[0]) / (total - self._last[1])
                self._last = (busy, total)
            return min(max(self._cpu, 0.0), 1.0)

    def collect(self):
        yield GaugeMetricFamily(metrics.CPU_UTILIZATION_NAME,
                                "CPU use of the machine, 0..1, since the previous scrape",
                                value=self.cpu_utilization())
        yield GaugeMetricFamily(metrics.MEMORY_UTILIZATION_NAME,
                                "Memory in use on the machine (not available), 0..1",
                                value=memory_utilization())


class CacheCollector:
    """The local CAS's size and evictions, from its shared index (every process's inserts
    and evictions are already counted there)."""

    def __init__(self, config: Config):
        self._config = config
        self._store: LocalDiskStore | None = None
        self._lock = threading.Lock()

    def stats(self) -> dict | None:
        with self._lock:
            try:
                if self._store is None:
                    from engine.cas.local_disk import LocalDiskStore

                    self._store = LocalDiskStore(self._config.cache_dir,
                                                 self._config.cache_max_bytes)
                return self._store.stats()
            except Exception as e:  # a figure is missing, the scrape goes on
                log.warning("cannot read the local CAS figures: %s", e)
                return None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def collect(self):
        stats = self.stats()
        if stats is None:
            return
        yield GaugeMetricFamily(metrics.CACHE_SIZE_NAME, "Bytes in the local CAS",
                                value=stats["total_bytes"])
        yield GaugeMetricFamily(metrics.CACHE_MAX_SIZE_NAME,
                                "The local CAS's size limit in bytes (0: none)",
                                value=stats["max_size_bytes"])
        yield CounterMetricFamily(metrics.CACHE_EVICTIONS_NAME,
                                  "Blobs evicted from the local CAS", value=stats["evictions"])


# ---- the probes ---------------------------------------------------------------------------


def _ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses else None


class Probes:
    def __init__(self, config: Config, supervisor_pid: int, metrics_dir: str):
        self.config = config
        self.supervisor_pid = supervisor_pid
        self.registry = CollectorRegistry(auto_describe=False)
        self._processes = MultiProcessCollector(self.registry, path=metrics_dir)
        self._system = SystemCollector()
        self._cache = CacheCollector(config)
        self.registry.register(self._system)
        self.registry.register(self._cache)

    def close(self) -> None:
        self._cache.close()

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def _statuses(self) -> dict[str, dict]:
        return status.read_statuses(self.config.run_dir)

    def healthz(self) -> tuple[int, dict]:
        """Alive: the supervisor runs and has not halted."""
        if not pid_alive(self.supervisor_pid):
            return 503, {"healthy": False, "reason": "the supervisor is gone"}
        supervisor = self._statuses().get("supervisor", {})
        if supervisor.get("state") == "halted":
            return 503, {"healthy": False, "reason": "halted (crash loop)"}
        return 200, {"healthy": True}

    def readyz(self) -> tuple[int, dict]:
        """Ready: not draining, the embedded server (if any) serves, and at least one worker
        holds a session with the scheduler."""
        reason = self._not_ready(self._statuses())
        if reason:
            return 503, {"ready": False, "reason": reason}
        return 200, {"ready": True}

    def _not_ready(self, statuses: dict[str, dict]) -> str | None:
        supervisor = statuses.get("supervisor")
        if supervisor is None:
            return "the supervisor has not reported yet"
        if supervisor.get("state") != "running":
            return f"stoker is {supervisor.get('state')}"
        children = supervisor.get("children", {})
        if supervisor.get("mode") == "up" and not _live(statuses.get("server"),
                                                         children.get("server"), "serving"):
            return "the embedded server is not serving yet"
        if not _connected_workers(statuses):
            return "no worker is connected to the scheduler"
        return None

    def _totals(self) -> dict[str, float]:
        """Sample name → value summed over labels, from every process's metric files."""
        totals: dict[str, float] = {}
        for family in self._processes.collect():
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def statusz(self) -> tuple[int, dict]:
        statuses = self._statuses()
        supervisor = statuses.get("supervisor", {})
        children = supervisor.get("children", {})
        workers = []
        for name in sorted(n for n in children if n.startswith("worker")):
            child = children[name]
            own = statuses.get(name) or {}
            current = own.get("pid") is not None and own.get("pid") == child.get("pid")
            workers.append({
                **child,
                "name": name,
                "connected": _live(own, child, "connected"),
                "since": own.get("since") if current else None,  # of the connected state
                **{key: own.get(key) if current else None for key in (
                    "containment", "action_network", "action_limits", "user_namespaces",
                    "action_uids", "isolation_types", "isolation_types_unavailable",
                    "platform", "scheduler_refused")},
            })
        totals = self._totals()
        cache = self._cache.stats() or {}
        cas_hits = totals.get("stoker_cas_hits_total", 0.0)
        cas_misses = totals.get("stoker_cas_misses_total", 0.0)
        ac_hits = totals.get("stoker_action_cache_hits_total", 0.0)
        ac_misses = totals.get("stoker_action_cache_misses_total", 0.0)
        embedded = supervisor.get("mode", "up") == "up"
        reason = self._not_ready(statuses)
        return 200, {
            "version": __version__,
            "digest_implementation": hashing.IMPLEMENTATION,
            "native": hashing.IMPLEMENTATION == "native",
            "mode": supervisor.get("mode"),
            "state": supervisor.get("state"),
            "ready": reason is None,
            "not_ready_reason": reason,
            "scheduler": {
                "address": _without_credentials(self.config.server_address),
                "embedded": embedded,
                "protocol": "rwapi" if embedded else self.config.protocol,
                "serving": (_live(statuses.get("server"), children.get("server"), "serving")
                            if embedded else None),
                "workers_connected": _connected_workers(statuses),
            },
            "workers": workers,
            # How an action's processes are ended (engine/runners/containment.py).
            "containment": sorted({w["containment"] for w in workers if w["containment"]}),
            "processes": {name: child for name, child in children.items()
                          if not name.startswith("worker")},
            "actions": {
                "in_flight": int(totals.get("stoker_actions_in_flight", 0)),
                "queued": int(totals.get("stoker_queue_depth", 0)),
                "started": int(totals.get("buildbuddy_executor_tasks_started_total", 0)),
                "completed": int(totals.get("buildbuddy_executor_tasks_completed_total", 0)),
            },
            "cache": {
                "size_bytes": cache.get("total_bytes"),
                "max_size_bytes": cache.get("max_size_bytes"),
                "entries": cache.get("entries"),
                "evictions": cache.get("evictions"),
                "cas_hits": int(cas_hits),
                "cas_misses": int(cas_misses),
                "hit_rate": _ratio(cas_hits, cas_misses),
                "action_cache_hits": int(ac_hits),
                "action_cache_misses": int(ac_misses),
                "action_cache_hit_rate": _ratio(ac_hits, ac_misses),
            },
        }


def _without_credentials(target: str) -> str:
    """A target as shown: any user:password@ a URL may carry is left out."""
    scheme, sep, rest = target.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return target


def _live(own: dict | None, child: dict | None, fact: str) -> bool:
    """A process's own status (fact: 'serving', 'connected') counts only while the
    supervisor has it running with that pid: a dead worker's file still says 'connected'."""
    return bool(own and child and child.get("state") == "running"
                and own.get("pid") == child.get("pid") and own.get(fact))


def _connected_workers(statuses: dict[str, dict]) -> int:
    children = statuses.get("supervisor", {}).get("children", {})
    return sum(1 for name, child in children.items()
               if name.startswith("worker") and _live(statuses.get(name), child, "connected"))
