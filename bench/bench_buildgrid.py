"""BuildGrid 0.9.1 measured on this machine, in the same run as what it is compared with.

The load is bench_noop's: N distinct `/bin/true <salt>-<i>` actions, Execute with
skip_cache_lookup from C client threads (engine.benchmark.pipeline.run_noop_actions), sent
to a real BuildGrid (tuned assigner, PostgreSQL with fsync off; tests/buildgrid/harness.py).
Who runs the leases is a parameter:

- measure_ceiling(): the instant bot (tests/buildgrid/instant_bot.py), which completes each
  lease at once without running anything. Its rate is BuildGrid's own ceiling here: no
  worker attached to it can do better.
- measure_with(worker_factory): any other worker, e.g. `stoker executor` joining BuildGrid
  over RWAPI, against the same running BuildGrid (pass rig=) in the same run.

    python -m bench.bench_buildgrid -n 200 -c 20
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.benchmark.pipeline import proc_stats, run_noop_actions
from engine.benchmark.stats import percentile
from tests.buildgrid.harness import BuildGridServer, Postgres
from tests.buildgrid.instant_bot import InstantBotProcess

THREAD_POOL_SIZE = 80  # bgd's gRPC threads; every open Execute stream holds one
# Left for the bots' UpdateBotSession calls (and CAS uploads): when Execute streams take every
# thread, bots are refused, their sessions expire and jobs stall (peers.md section 3).
RESERVED_THREADS = 20
WARMUP_ACTIONS = 20
# (address, scratch dir) -> a context that keeps workers attached to BuildGrid while entered.
# If what it yields has a `proc` (a Popen), that process tree's CPU is reported as the workers'.
WorkerFactory = Callable[[str, Path], AbstractContextManager[object]]


@dataclass
class LoadResult:
    worker: str
    n: int
    concurrency: int
    rate: float  # actions/s, wall clock of the timed run
    p50_s: float  # Execute call to done, per action
    p90_s: float
    bgd_cpu_ms: float  # BuildGrid server CPU per action (all its threads)
    postgres_cpu_ms: float  # the PostgreSQL cluster's CPU per action (all backends)
    worker_cpu_ms: float | None  # the workers' (None: the factory gave no process to watch)
    client_cpu_ms: float  # this process: the client threads driving the load

    def __str__(self) -> str:
        return (f"{self.worker}: {self.rate:.1f} actions/s, p50 {self.p50_s * 1000:.0f} ms, "
                f"p90 {self.p90_s * 1000:.0f} ms (N={self.n}, C={self.concurrency}); CPU per "
                f"action: bgd {self.bgd_cpu_ms:.1f} ms, postgres {self.postgres_cpu_ms:.1f} ms, "
                f"workers {'?' if self.worker_cpu_ms is None else f'{self.worker_cpu_ms:.1f}'}"
                f" ms, client {self.client_cpu_ms:.1f} ms")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, reaped children too) of root and its live descendants.
    By parentage, not session: PostgreSQL backends each call setsid()."""
    cpu: dict[int, float] = {}
    parent: dict[int, int] = {}
    for pid, fields, used in proc_stats():
        parent[pid] = int(fields[1])
        cpu[pid] = used
    total = 0.0
    for pid, used in cpu.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += used
    return total


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class BuildGridRig:
    """PostgreSQL + a tuned BuildGrid on loopback, and a client channel; close() stops both
    and deletes their data. Workers come and go through measure_with()."""

    def __init__(self, parent: str | None = None, keepalive_s: int = 60) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stoker-bench-bgd-", dir=parent))
        self.dir.chmod(0o755)  # a worker may run actions as another user below it
        self._stack = contextlib.ExitStack()
        try:
            self.pg = self._stack.enter_context(Postgres(parent))
            self.server = self._stack.enter_context(BuildGridServer(
                self.dir / "bgd", self.pg, tuned=True, keepalive_s=keepalive_s,
                thread_pool_size=THREAD_POOL_SIZE))
            self.channel = grpc.insecure_channel(self.server.address)
            self._stack.callback(self.channel.close)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return self.server.address

    def scratch(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds used so far by bgd and by PostgreSQL."""
        assert self.server.proc is not None and self.pg.proc is not None
        return tree_cpu_s(self.server.proc.pid), tree_cpu_s(self.pg.proc.pid)

    def close(self) -> None:
        self._stack.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> BuildGridRig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def instant_bots(bots: int = 2, capacity: int = 20) -> WorkerFactory:
    """The instant bot as a WorkerFactory: capacity per bot, so the bots never limit."""
    @contextlib.contextmanager
    def attach(address: str, scratch: Path) -> Iterator[InstantBotProcess]:
        with InstantBotProcess(address, scratch / "instant_bot.log", bots=bots,
                               capacity=capacity, lifetime_s=1800) as bot:
            yield bot
    return attach


def measure_with(worker_factory: WorkerFactory, n_actions: int, concurrency: int, *,
                 rig: BuildGridRig | None = None, name: str = "worker") -> LoadResult:
    """n_actions no-op actions, concurrency at a time, through BuildGrid with the workers
    worker_factory attaches (detached again on return). With rig, that BuildGrid (so several
    workers are measured against one server in one run); else one of its own."""
    if concurrency > THREAD_POOL_SIZE - RESERVED_THREADS:
        raise ValueError(f"concurrency {concurrency} would starve bgd's bots: keep it <= "
                         f"{THREAD_POOL_SIZE - RESERVED_THREADS}")
    with contextlib.ExitStack() as stack:
        if rig is None:
            rig = stack.enter_context(BuildGridRig())
        workers = stack.enter_context(worker_factory(rig.address, rig.scratch(name)))
        proc = getattr(workers, "proc", None)

        def worker_cpu() -> float:
            return tree_cpu_s(proc.pid) if proc is not None else 0.0

        run_noop_actions(rig.channel, WARMUP_ACTIONS, min(concurrency, WARMUP_ACTIONS))
        (bgd0, pg0), w0, c0 = rig.cpu_s(), worker_cpu(), _own_cpu_s()
        run = run_noop_actions(rig.channel, n_actions, concurrency)
        (bgd1, pg1), w1, c1 = rig.cpu_s(), worker_cpu(), _own_cpu_s()
    lat = run.latencies_s

    def per_action(seconds: float) -> float:
        return seconds * 1000 / n_actions

    return LoadResult(name, n_actions, concurrency, run.rate, statistics.median(lat),
                      percentile(lat, 90), per_action(bgd1 - bgd0), per_action(pg1 - pg0),
                      per_action(w1 - w0) if proc is not None else None, per_action(c1 - c0))


def measure_ceiling(n_actions: int = 200, concurrency: int = 20, *,
                    rig: BuildGridRig | None = None) -> LoadResult:
    """BuildGrid's own ceiling on this machine: the rate with instant bots."""
    return measure_with(instant_bots(capacity=max(concurrency, 1)), n_actions, concurrency,
                        rig=rig, name="instant bot")


def stoker_executor(workers: int = 2, concurrency: int = 4) -> WorkerFactory:
    """`stoker executor` joined over the Remote Workers API, as a WorkerFactory."""
    from tests.integration.support import ExecutorProcess

    @contextlib.contextmanager
    def attach(address: str, scratch: Path) -> Iterator[ExecutorProcess]:
        data_dir = scratch / "data"
        data_dir.mkdir(mode=0o711, exist_ok=True)  # slot uids reach their exec roots below
        executor = ExecutorProcess(data_dir, scratch / "executor.log",
                                   server=f"grpc://{address}", protocol="rwapi",
                                   workers=workers, concurrency=concurrency)
        executor.start(ready_within=60)
        try:
            yield executor
        finally:
            executor.stop()
    return attach


@dataclass
class Comparison:
    stoker: list[LoadResult]
    ceiling: list[LoadResult]


def compare(repeats: int, n_actions: int = 200, concurrency: int = 20,
            wait_idle: Callable[[], None] = lambda: None) -> Comparison:
    """Stoker's workers and the instant bot on one BuildGrid, alternating run by run."""
    result = Comparison([], [])
    with BuildGridRig() as rig:
        for _ in range(repeats):
            wait_idle()
            result.ceiling.append(measure_ceiling(n_actions, concurrency, rig=rig))
            wait_idle()
            result.stoker.append(measure_with(stoker_executor(), n_actions, concurrency,
                                              rig=rig, name="stoker executor"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_buildgrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=200, help="actions per run (default 200)")
    p.add_argument("-c", type=int, default=20, help="actions at once (default 20)")
    p.add_argument("--repeats", type=int, default=1, help="runs on one BuildGrid (default 1)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to SECONDS for the machine to be idle")
    args = p.parse_args(argv)
    from bench.run import wait_idle

    t0 = time.monotonic()
    with BuildGridRig() as rig:
        print(f"BuildGrid up at {rig.address} in {time.monotonic() - t0:.1f} s", flush=True)
        for _ in range(args.repeats):
            wait_idle(args.wait_idle)
            print(measure_ceiling(args.n, args.c, rig=rig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
