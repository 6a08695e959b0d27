"""Every Prometheus metric Stoker exports, defined once.

The supervisor gives each child a PROMETHEUS_MULTIPROC_DIR before it starts, so every
update below lands in that process's own mmap file and the monitor (engine/monitor/) sums
the files of all processes at scrape time. An update is a lock and a write to shared
memory: cheap enough for once-per-action use, never per file.

The seed's metrics keep their exact names and no labels. Figures that already live in
shared state (the cache's size and evictions, the machine's CPU and memory) are not
counted here: the monitor reads them when scraped (the *_NAME constants below).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE

log = logging.getLogger(__name__)

# The files prometheus_client's multiprocess mode keeps for this process, one per kind of
# value: created here first, and backed, before any metric below makes them.
_FILE_KINDS = ("counter", "gauge_livesum", "histogram")


def _prepare_own_files() -> None:
    """prometheus_client sizes its files with ftruncate, leaving them sparse: on a full
    tmpfs (and /dev/shm is one every action can fill) the first write to a page not yet
    backed is SIGBUS, killing the process. So this process's files are created backed. Where
    even that fails (no space), its metrics stay in memory, unexported, and it says so: a
    full /dev/shm must not stop a worker."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    try:
        for kind in _FILE_KINDS:
            path = os.path.join(directory, f"{kind}_{os.getpid()}.db")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    os.posix_fallocate(fd, 0, _INITIAL_MMAP_SIZE)
            finally:
                os.close(fd)
    except OSError as e:
        log.error("metrics of process %d are not exported: %s", os.getpid(), e)
        values.ValueClass = values.MutexValue


_prepare_own_files()

# Seconds: from a no-op action's milliseconds to the longest timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, float("inf"))
STAGES = ("fetch", "stage", "run", "upload")
DIRECTIONS = ("staged", "uploaded")

TASKS_STARTED = Counter("buildbuddy_executor_tasks_started_total",
                        "Actions this executor started")
TASKS_COMPLETED = Counter("buildbuddy_executor_tasks_completed_total",
                          "Actions this executor finished, whatever their outcome")
TASK_DURATION = Histogram("buildbuddy_executor_task_duration_seconds",
                          "Time from an action's start to its finish on a worker",
                          buckets=DURATION_BUCKETS)
STAGE_DURATION = Histogram("stoker_stage_duration_seconds",
                           "Time an action spent in each pipeline stage", ["stage"],
                           buckets=DURATION_BUCKETS)
BYTES = Counter("stoker_bytes_total",
                "Bytes of inputs linked into exec roots (staged) and of outputs, stdout "
                "and stderr captured (uploaded)", ["direction"])
ACTIONS_RUN = Counter("stoker_actions_run_total",
                      "Commands started, by the isolation type that ran them", ["isolation"])
CAS_HITS = Counter("stoker_cas_hits_total", "Input blobs found in the local CAS")
CAS_MISSES = Counter("stoker_cas_misses_total", "Input blobs missing from the local CAS")
ACTION_CACHE_HITS = Counter("stoker_action_cache_hits_total",
                            "ActionCache lookups that found a usable result")
ACTION_CACHE_MISSES = Counter("stoker_action_cache_misses_total",
                              "ActionCache lookups that found nothing usable")
QUEUE_DEPTH = Gauge("stoker_queue_depth", "Actions queued at the embedded scheduler",
                    multiprocess_mode="livesum")
IN_FLIGHT = Gauge("stoker_actions_in_flight", "Actions running on this machine's workers",
                  multiprocess_mode="livesum")

# Read by the monitor at scrape time (engine/monitor/probes.py).
CPU_UTILIZATION_NAME = "buildbuddy_executor_cpu_utilization"
MEMORY_UTILIZATION_NAME = "buildbuddy_executor_memory_utilization"
CACHE_SIZE_NAME = "stoker_cache_size_bytes"
CACHE_MAX_SIZE_NAME = "stoker_cache_max_size_bytes"
CACHE_EVICTIONS_NAME = "stoker_cache_evictions_total"

# Labelled children exist from the start, so a scrape shows every series even before the
# first action (and the hot path skips the labels() lookup).
STAGE_HISTOGRAMS = {stage: STAGE_DURATION.labels(stage=stage) for stage in STAGES}
BYTES_STAGED = BYTES.labels(direction="staged")
BYTES_UPLOADED = BYTES.labels(direction="uploaded")
