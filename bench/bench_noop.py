"""No-op actions end to end (Execute → result) through `stoker up`.

Reference in the same run: the raw posix_spawn rate of /bin/true on this machine, the
physical ceiling for one process spawn per action; and a real BuildGrid 0.9.1 on loopback
(bench/bench_buildgrid.py), measured first with instant bots that complete each lease at once
(BuildGrid's own ceiling: the 10x target is against it) and then with `stoker executor`
joined to it over the Remote Workers API, alternating run by run.

Executor overhead (worker time minus command time, from ExecutedActionMetadata) is measured
with one action at a time: under full load an action's worker time also counts the other
actions sharing its worker's event loop and the 2 cores, which is queueing, reported beside
it. The CPU each part uses per action explains the 1-worker vs 2-worker scaling: the server
and the client need their share of the same 2 cores.

Containment (every process of an action dead before its outputs are collected) is measured
against no containment in the same run: as root, the same load through a `stoker up` whose
workers kill only the action's session, as Stoker did before it contained actions
(STOKER_CONTAINMENT=session), and through one that sweeps the slot uid from /proc instead of
using a pid namespace (the fallback where pid namespaces are refused).

The action driver and the `stoker up` it talks to are engine/benchmark/pipeline.py, which
`stoker bench` uses too.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys

from bench.common import Measured
from engine.benchmark import probes
from engine.benchmark.pipeline import EmbeddedStoker, run_noop_actions, session_cpu_seconds
from engine.benchmark.stats import percentile
from engine.runners import containment


def probes_containment() -> str:
    """The mechanism a default `stoker up` here uses."""
    return containment.detect(True)

CONCURRENCY = 4  # actions at once per worker
BUILDGRID_ACTIONS = 200  # per BuildGrid run; its server makes each cost ~50 ms of CPU
BUILDGRID_CLIENTS = 20  # well under its 80 gRPC threads (each Execute stream holds one)


def _median_of(results, field: str) -> float:
    return statistics.median(getattr(r, field) or 0.0 for r in results)


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(repeats: int, n: int = 400, clients: int = 16) -> list[Measured]:
    from bench import bench_buildgrid

    # First, so BuildGrid and PostgreSQL are gone before Stoker's own runs.
    grid = bench_buildgrid.compare(repeats, BUILDGRID_ACTIONS, BUILDGRID_CLIENTS)
    ceiling = [r.rate for r in grid.ceiling]
    joined = [r.rate for r in grid.stoker]
    rates: dict[int, list[float]] = {}
    loaded: list[float] = []
    serial: list[float] = []
    spawn: list[float] = []
    cpu_ms: dict[int, dict[str, float]] = {}
    # As root, the same load without containment and with the uid-sweep fallback, each
    # through a `stoker up` of its own, alternating with the default one round by round.
    weaker_kinds = [containment.SESSION, containment.UID_SWEEP] if os.geteuid() == 0 else []
    weaker: dict[str, list[float]] = {kind: [] for kind in weaker_kinds}
    with contextlib.ExitStack() as stack:
        default = stack.enter_context(EmbeddedStoker(2, concurrency=CONCURRENCY))
        others = {kind: stack.enter_context(EmbeddedStoker(2, concurrency=CONCURRENCY,
                                                          containment=kind))
                  for kind in weaker_kinds}
        for stoker in (default, *others.values()):
            run_noop_actions(stoker.channel, 50, clients)  # warm up
        rates[2] = []
        before, own, total = session_cpu_seconds(default.proc.pid), 0.0, 0
        for _ in range(repeats):
            spawn.append(n / probes.spawn(n))
            t0 = _own_cpu()
            run = run_noop_actions(default.channel, n, clients)
            own += _own_cpu() - t0
            rates[2].append(run.rate)
            loaded += run.overheads_ms
            total += n
            for kind, stoker in others.items():
                weaker[kind].append(run_noop_actions(stoker.channel, n, clients).rate)
        after = session_cpu_seconds(default.proc.pid)
        cpu_ms[2] = {k: (after[k] - before[k]) * 1000 / total for k in after}
        cpu_ms[2]["client"] = own * 1000 / total
        serial = run_noop_actions(default.channel, max(n // 2, 50), 1).overheads_ms
        if others:
            serial_session = run_noop_actions(others[containment.SESSION].channel,
                                              max(n // 2, 50), 1).overheads_ms
    with EmbeddedStoker(1, concurrency=CONCURRENCY) as stoker:
        run_noop_actions(stoker.channel, 50, clients)  # warm up
        rates[1] = []
        before, own = session_cpu_seconds(stoker.proc.pid), _own_cpu()
        for _ in range(repeats):
            spawn.append(n / probes.spawn(n))
            rates[1].append(run_noop_actions(stoker.channel, n, clients).rate)
        after = session_cpu_seconds(stoker.proc.pid)
        cpu_ms[1] = {k: (after[k] - before[k]) * 1000 / (n * repeats) for k in after}
    p50, p99 = statistics.median(serial), percentile(serial, 99)
    rate = statistics.median(rates[2])
    ten_x = 10 * statistics.median(ceiling)
    c2 = cpu_ms[2]
    per_action = sum(v for k, v in c2.items() if k != "supervisor")
    cores = os.cpu_count() or 1
    contained = []
    if weaker:
        mechanism = probes_containment()
        contained = [
            Measured(
                f"no-op actions contained ({mechanism}) vs not, 2 workers", "actions/s",
                rates[2], weaker[containment.SESSION],
                "the same, only the action's session killed (before containment)",
                target=0.9,
                note=(f"every process an action started is dead before its outputs are read; "
                      f"overhead p50 {p50:.2f} ms contained vs "
                      f"{statistics.median(serial_session):.2f} ms not, one action at a time")),
            Measured(
                "no-op actions, uid-sweep fallback vs not contained, 2 workers", "actions/s",
                weaker[containment.UID_SWEEP], weaker[containment.SESSION],
                "the same, only the action's session killed (before containment)",
                target=0.8,
                note="/proc is read once per action (where pid namespaces are refused)"),
        ]
    return [
        Measured(
            "no-op actions, 2 workers", "actions/s", rates[2], spawn,
            "raw posix_spawn of /bin/true", target=0.0,
            criterion=f">= {ten_x:.0f}/s (10x BuildGrid's ceiling) and overhead p50 <= 2 ms",
            passed=rate >= ten_x and p50 <= 2.0,
            note=(f"executor overhead, one action at a time: p50 {p50:.2f} ms, p99 {p99:.2f} "
                  f"ms; under the full load below, p50 {statistics.median(loaded):.2f} ms, "
                  f"p99 {percentile(loaded, 99):.2f} ms (queueing: {CONCURRENCY} actions at "
                  f"once per worker, {clients} client threads, {cores} cores shared); "
                  f"BuildGrid 0.9.1 with instant bots did "
                  f"{', '.join(f'{r:.1f}' for r in ceiling)} actions/s in this run, "
                  f"so 10x is >= {ten_x:.0f}/s")),
        Measured(
            "no-op actions through BuildGrid 0.9.1, stoker executor (RWAPI)", "actions/s",
            joined, ceiling, "BuildGrid with instant bots (its ceiling)", target=0.8,
            note=(f"{BUILDGRID_ACTIONS} actions, {BUILDGRID_CLIENTS} at once, per run; "
                  f"p50 {statistics.median(r.p50_s for r in grid.stoker) * 1000:.0f} ms vs "
                  f"{statistics.median(r.p50_s for r in grid.ceiling) * 1000:.0f} ms; "
                  f"CPU per action: bgd {_median_of(grid.stoker, 'bgd_cpu_ms'):.0f} ms, "
                  f"Stoker's workers {_median_of(grid.stoker, 'worker_cpu_ms'):.1f} ms")),
        Measured(
            "no-op actions, 2 workers vs 1", "actions/s", rates[2], rates[1],
            "the same with 1 worker", target=1.8,
            note=(f"CPU per action with 2 workers: server {c2['server']:.2f} ms, workers "
                  f"{c2['workers']:.2f} ms (their actions included), client "
                  f"{c2['client']:.2f} ms; {per_action:.1f} ms in all, so {cores} cores "
                  f"cap the rate near {cores * 1000 / per_action:.0f}/s whatever the worker "
                  f"count; 1 worker alone used {cpu_ms[1]['workers']:.2f} ms per action "
                  f"(one core: <= {1000 / cpu_ms[1]['workers']:.0f}/s)")),
    ] + contained


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
