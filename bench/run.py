"""`make bench`: every benchmark of bench/, Stoker and its reference in the same run, as one
table of ratios.

    python -m bench.run [--repeats N] [--only NAME ...] [--dir DIR] [--record FILE]
                        [--with-node]

--record writes the table, the machine and the command to FILE (bench/RESULTS.md).
--with-node also runs `stoker bench` (engine/benchmark) at its default sizes and compares
its figures with the Stoker side of the table: they should agree within 10 %.
A missed target is shown as **NO**; a benchmark that could not run is listed with why, and
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import Measured, table
from engine.benchmark.load import LoadMeter, OtherLoad
from engine.benchmark.scratch import Workspace

REPO = Path(__file__).resolve().parent.parent
AGREEMENT = 0.10  # how far `stoker bench` may stray from bench/'s Stoker figures


def _digest(fn: str) -> Callable[[Workspace, int], list[Measured]]:
    def run(ws: Workspace, repeats: int) -> list[Measured]:
        from bench import bench_digest

        return getattr(bench_digest, fn)(ws, repeats)
    return run


def _stage(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_stage

    return bench_stage.stage(ws, repeats)


def _upload(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_upload

    return bench_upload.run(repeats, ws)


def _fetch(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_fetch

    return bench_fetch.run(repeats, ws)


def _sandbox(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_runners

    return bench_runners.run_sandbox(repeats)


def _docker(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_runners

    return bench_runners.run_docker(repeats)


def _podman(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_runners

    return bench_runners.run_podman(repeats)


def _containment(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_containment

    return bench_containment.run(repeats)


def _noop(ws: Workspace, repeats: int) -> list[Measured]:
    from bench import bench_noop

    return bench_noop.run(repeats)


# In the order they run: the cheap digests first, the server-based ones last.
BENCHMARKS: dict[str, Callable[[Workspace, int], list[Measured]]] = {
    "sha256": _digest("sha256"),
    "blake3": _digest("blake3"),
    "small-files": _digest("small_files"),
    "stage": _stage,
    "upload": _upload,
    "fetch": _fetch,
    "containment": _containment,
    "sandbox": _sandbox,
    "podman": _podman,
    "docker": _docker,
    "noop": _noop,
}

# `stoker bench` figure -> (benchmark, row, side) of bench/ measuring the same thing.
_SAME_AS = {
    "sha256": ("sha256", 0, "stoker"),
    "blake3": ("blake3", 0, "stoker"),
    "small_files": ("small-files", 0, "stoker"),
    "stage": ("stage", 0, "stoker"),
    "upload": ("upload", 0, "stoker"),
    "spawn": ("noop", 0, "reference"),
    "actions": ("noop", 0, "stoker"),
}


def machine(ws: Workspace) -> list[str]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    from engine.benchmark.probes import implementation

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return [
        f"- CPU: {len(os.sched_getaffinity(0))} cores usable, {model}",
        f"- memory: {mem:.1f} GiB; kernel {platform.release()}; Python "
        f"{platform.python_version()}",
        f"- scratch data (and the local CAS) on {ws.filesystem}, under "
        f"{os.path.dirname(ws.root)}",
        f"- digest implementation: {implementation()}",
        f"- commit: {commit or 'unknown'} (plus uncommitted changes, if any)",
    ]


def compare_node(results: dict[str, list[Measured]], loads: dict[str, OtherLoad],
                 data_dir: str) -> tuple[str, bool]:
    """Run `stoker bench` at its default sizes; a table of its figures against bench/'s."""
    from bench import bench_noop
    from engine.benchmark import node

    # The same `stoker up` shape as bench_noop, so the action rates are comparable.
    res = node.run(data_dir, node.DEFAULT, concurrency=bench_noop.CONCURRENCY, progress=False)
    rows = ["| figure | `stoker bench` | bench/ (Stoker side) | difference | within "
            f"{AGREEMENT:.0%} | other work, cores (stoker bench / bench/) |",
            "|---|---|---|---|---|---|"]
    agree = True
    for f in res.figures:
        if f.key not in _SAME_AS:
            continue
        name, row, side = _SAME_AS[f.key]
        if name not in results or len(results[name]) <= row:
            continue
        m = results[name][row]
        theirs = statistics.median(getattr(m, side))
        diff = f.value / theirs - 1
        ok = abs(diff) <= AGREEMENT
        agree &= ok
        mine, other = f.other_load, loads.get(name)
        busy = (f"{_cores(mine)} / {_cores(other)}")
        rows.append(f"| {f.label} ({f.unit}) | {f.value:,.0f} ± {f.spread:.0%} | "
                    f"{theirs:,.0f} ({m.name}{', reference' if side == 'reference' else ''}) | "
                    f"{diff:+.1%} | {'yes' if ok else '**NO**'} | {busy} |")
    for group, why in res.skipped.items():
        rows.append(f"| {group} | {why} | | | | |")
    return "\n".join(rows), agree


def wait_idle(limit_s: float, window_s: float = 2.0) -> None:
    """Wait (at most limit_s) until a window passes with no other work on the machine."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        meter = LoadMeter()
        time.sleep(window_s)
        load = meter.stop()
        if load.others + load.steal < 0.1:
            return
    if limit_s:
        print(f"  the machine stayed busy for {limit_s:.0f} s; measuring anyway",
              file=sys.stderr, flush=True)


def _cores(load: OtherLoad | None) -> str:
    return f"{load.others + load.steal:.2f}" if load else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="repetitions of each side (default 5)")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--dir", default=None,
                   help="where to put the scratch data (default: the temp dir, unless it is a "
                        "tmpfs)")
    p.add_argument("--record", metavar="FILE", help="write the results to FILE "
                   "(bench/RESULTS.md)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each benchmark, wait up to SECONDS for the machine to be "
                        "free of other work (useful on a shared machine)")
    p.add_argument("--with-node", action="store_true",
                   help="also run `stoker bench` and compare its figures with these")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    chosen = args.only or list(BENCHMARKS)
    started = time.monotonic()
    results: dict[str, list[Measured]] = {}
    loads: dict[str, OtherLoad] = {}
    failed: dict[str, str] = {}
    with Workspace(args.dir) as ws:
        about = machine(ws)
        print("\n".join(about), flush=True)
        for name in chosen:
            t0 = time.monotonic()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            wait_idle(args.wait_idle)
            meter = LoadMeter()
            try:
                results[name] = BENCHMARKS[name](ws, args.repeats)
                loads[name] = meter.stop()
                if loads[name].noisy:
                    for m in results[name]:
                        m.note = (f"{m.note}; " if m.note else "") + (
                            f"**measured on a busy machine** ({loads[name]}): it may read low")
            except (Exception, SystemExit) as e:  # one broken benchmark must not hide the rest
                failed[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        comparison = ""
        agree = True
        if args.with_node:
            print("running stoker bench for comparison ...", file=sys.stderr, flush=True)
            wait_idle(args.wait_idle)
            try:
                comparison, agree = compare_node(results, loads, ws.path("node"))
            except Exception as e:
                failed["stoker bench"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    rows = [m for name in chosen for m in results.get(name, [])]
    text = table(rows) if rows else "(nothing measured)"
    if loads:
        text += ("\n\nOther work on the machine while each ran (average cores busy with "
                 "processes not ours, plus hypervisor steal; kernel writeback of our own files "
                 "counts too): " + ", ".join(f"{n} {_cores(ld)}" for n, ld in loads.items()))
    if failed:
        text += "\n\nNot run:\n" + "\n".join(f"- {n}: {why}" for n, why in failed.items())
    print()
    print(text)
    if comparison:
        print(f"\n`stoker bench` vs bench/ (within {AGREEMENT:.0%}: "
              f"{'yes' if agree else 'NO'}):\n{comparison}")
    elapsed = time.monotonic() - started
    print(f"\n{len(rows)} rows, {sum(not m.met for m in rows)} target(s) missed, "
          f"{elapsed / 60:.1f} min", file=sys.stderr)
    if args.record:
        _record(Path(args.record), command, about, text, comparison, agree, args.repeats,
                elapsed)
    return 1 if failed else 0


def _record(path: Path, command: str, about: list[str], text: str, comparison: str,
            agree: bool, repeats: int, elapsed: float) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Benchmark results",
        "",
        "Written by `python -m bench.run --record bench/RESULTS.md` (what `make bench` runs); "
        "rerun it to refresh this file. Every row measures Stoker and its reference in the "
        f"same run, alternating them, {repeats} times each: the figures are medians, ± half "
        "the min-max range as a share of the median; ratio = Stoker / reference (higher is "
        "better for Stoker). A missed target reads **NO**.",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min), {now}.",
        "",
        "Machine:",
        *about,
        "",
        text,
    ]
    if comparison:
        parts += ["", "## `stoker bench` on the same machine", "",
                  "`stoker bench` (engine/benchmark, default sizes: "
                  f"{_sizes()}) measured right after; its figures should agree with the "
                  f"Stoker side above within {AGREEMENT:.0%}"
                  f"{'' if agree else ' (they do **not** all agree)'}. The last column is the "
                  "other work on the machine while each side ran: a side measured while it was "
                  "busy reads low.", "", comparison]
    path.write_text("\n".join(parts) + "\n")


def _sizes() -> str:
    from engine.benchmark import node

    s = dataclasses.asdict(node.DEFAULT)
    return (f"a {node.size_text(s['file_bytes'])} file, a {s['tree_files']:,}-file tree in "
            f"{s['tree_dirs']} dirs, {s['actions']} actions x {s['repeats']}")


if __name__ == "__main__":
    sys.exit(main())
