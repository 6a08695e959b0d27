"""`stoker bench`: measure this node's hot-path rates and gather them as figures.

The data sets live under the data directory, on the filesystem the local cache uses, and
are removed afterwards. The no-op pipeline runs a `stoker up` of its own on a free port.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from engine.benchmark import probes, upload
from engine.benchmark.load import LoadMeter, OtherLoad
from engine.benchmark.pipeline import EmbeddedStoker, run_noop_actions
from engine.benchmark.scratch import Workspace, filesystem_type, remove_tree
from engine.benchmark.stats import median, percentile, spread

MB = 1e6  # rates use 1 MB = 10^6 bytes, as the limits recorded for this machine do
GROUPS = ("digest", "small-files", "stage", "upload", "spawn", "actions")
# Uploads swing most from round to round here (new files, page cache): a longer median.
UPLOAD_EXTRA = 2


@dataclass(frozen=True)
class Sizes:
    file_bytes: int  # the large file digested; also scales the outputs uploaded
    tree_files: int  # the input tree staged, whose files are also digested
    tree_dirs: int
    spawns: int  # posix_spawns per repetition
    actions: int  # no-op actions per repetition
    clients: int  # client threads sending actions
    repeats: int

    def check(self) -> Sizes:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tree_dirs > self.tree_files:
            raise ValueError(f"tree_dirs ({self.tree_dirs}) must not exceed tree_files "
                             f"({self.tree_files})")
        return self


# The same data sets as bench/ (a 1 GiB file; 100k files of 1-4 KiB in 1k directories), so
# the figures are directly comparable: rates per file still shift with the tree's size.
# About a minute on 2 cores; --quick takes a few seconds.
DEFAULT = Sizes(file_bytes=1 << 30, tree_files=100_000, tree_dirs=1_000, spawns=1000,
                actions=400, clients=16, repeats=3)
QUICK = Sizes(file_bytes=128 << 20, tree_files=10_000, tree_dirs=100, spawns=300,
              actions=100, clients=16, repeats=2)


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    samples: list[float]
    higher_is_better: bool = True
    # What other work kept the machine busy while this was measured.
    other_load: OtherLoad | None = None

    @property
    def value(self) -> float:
        return median(self.samples)

    @property
    def spread(self) -> float:
        return spread(self.samples)


@dataclass
class Machine:
    cores: int
    memory_bytes: int
    data_dir: str
    filesystem: str
    free_bytes: int
    host: str = field(default_factory=platform.node)
    kernel: str = field(default_factory=platform.release)
    python: str = field(default_factory=platform.python_version)

    @staticmethod
    def probe(data_dir: str) -> Machine:
        return Machine(cores=len(os.sched_getaffinity(0)),
                       memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                       data_dir=os.path.abspath(data_dir),
                       filesystem=filesystem_type(data_dir),
                       free_bytes=shutil.disk_usage(data_dir).free)


@dataclass
class Result:
    machine: Machine
    sizes: Sizes
    implementation: str
    workers: int
    concurrency: int
    figures: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it was not measured

    def figure(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)


class Progress:
    """A progress bar (tqdm) on stderr when it is a terminal, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # an optional nicety: measure without it
                return
            self._bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False,
                             bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(label)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _steps(groups: set[str], sizes: Sizes) -> int:
    r = sizes.repeats
    n = {"digest": 1 + 3 * r, "small-files": 1 + r, "stage": 1 + r, "upload": r + UPLOAD_EXTRA,
         "spawn": r, "actions": 1 + r}
    return sum(n[g] for g in groups)


def run(data_dir: str, sizes: Sizes = DEFAULT, *, groups: set[str] | None = None,
        workers: int = 0, concurrency: int = 2, upload_target: str = "",
        progress: bool = True) -> Result:
    """Measure the selected groups (all by default) and return the figures.

    workers (0: one per core) and concurrency shape the `stoker up` that runs the no-op
    actions; upload_target is a CAS host:port (empty: that `stoker up`'s own server).
    """
    sizes = sizes.check()
    groups = set(GROUPS) if groups is None else set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {sorted(unknown)}; choose from "
                         f"{', '.join(GROUPS)}")
    created = not os.path.exists(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    machine = Machine.probe(data_dir)
    workers = workers or machine.cores
    result = Result(machine, sizes, probes.implementation(), workers, concurrency)
    bar = Progress(_steps(groups, sizes), progress)
    ws = Workspace(data_dir)
    try:
        if "digest" in groups:
            _digest(ws, sizes, machine.cores, result, bar)
        if groups & {"small-files", "stage"}:
            bar.step("building the input tree")
            ts = ws.input_tree(sizes.tree_files, sizes.tree_dirs)
            if "small-files" in groups:
                bar.advance()
                _repeat(result, bar, sizes.repeats, Figure(
                    "small_files", f"digest {sizes.tree_files:,} files of 1-4 KiB (SHA-256)",
                    "files/s", []), len(ts.paths), lambda: probes.digest_files("sha256", ts.paths))
            if "stage" in groups:
                bar.advance()

                # Removed at the end, not between runs: deleted directories slow the next
                # mkdirs on ext4 for minutes (bench/bench_stage.py).
                made: list[str] = []

                def stage_once() -> float:
                    made.append(ws.fresh_path("exec-root"))
                    return probes.stage(ts.tree, ts.store, made[-1])

                _repeat(result, bar, sizes.repeats, Figure(
                    "stage", f"stage {sizes.tree_files:,} files, {sizes.tree_dirs:,} dirs "
                    "from the local CAS", "files/s", []), len(ts.tree.files), stage_once)
                for path in made:
                    remove_tree(path)
        if "spawn" in groups:
            _repeat(result, bar, sizes.repeats, Figure(
                "spawn", "posix_spawn of /bin/true", "spawns/s", []), sizes.spawns,
                lambda: probes.spawn(sizes.spawns))
        if groups & {"upload", "actions"}:
            _pipeline(ws, sizes, groups, workers, concurrency, upload_target, result, bar)
    finally:
        bar.close()
        ws.close()
        if created:
            try:
                os.rmdir(data_dir)
            except OSError:
                pass
    return result


def _repeat(result: Result, bar: Progress, repeats: int, figure: Figure, work: float,
            once: Callable[[], float]) -> None:
    """Run once() repeats times; each returns seconds for `work` units."""
    bar.step(figure.label[:34])
    meter = LoadMeter()
    for _ in range(repeats):
        figure.samples.append(work / once())
        bar.advance()
    figure.other_load = figure.other_load or meter.stop()
    result.figures.append(figure)


def _digest(ws: Workspace, sizes: Sizes, cores: int, result: Result, bar: Progress) -> None:
    bar.step("writing the large file")
    path = ws.big_file(sizes.file_bytes)
    bar.advance()
    size = sizes.file_bytes
    label = size_text(size)
    _repeat(result, bar, sizes.repeats, Figure(
        "sha256", f"SHA-256 of a {label} file, one core", "MB/s", []), size / MB,
        lambda: probes.hash_file("sha256", path, size))
    _repeat(result, bar, sizes.repeats, Figure(
        "sha256_all_cores", f"SHA-256, {cores} files at once", "MB/s", []),
        cores * size / MB, lambda: probes.hash_file_parallel("sha256", path, size, cores))
    _repeat(result, bar, sizes.repeats, Figure(
        "blake3", f"BLAKE3 of a {label} file", "MB/s", []), size / MB,
        lambda: probes.hash_file("blake3", path, size))


def _pipeline(ws: Workspace, sizes: Sizes, groups: set[str], workers: int, concurrency: int,
              upload_target: str, result: Result, bar: Progress) -> None:
    bar.step("starting stoker up")
    # The server and workers are our children, counted as ours only once they exit: so the
    # load is measured from before their start to after their end.
    meter = LoadMeter()
    first = len(result.figures)
    with EmbeddedStoker(workers, concurrency) as stoker:
        run_noop_actions(stoker.channel, min(50, sizes.actions), sizes.clients)  # warm up
        if "actions" in groups:
            bar.advance()
        if "upload" in groups:
            _upload(ws, sizes, upload_target or f"127.0.0.1:{stoker.port}", result, bar)
        rates: list[float] = []
        overheads: list[float] = []
        if "actions" in groups:
            bar.step("no-op actions through stoker up")
            for _ in range(sizes.repeats):
                run = run_noop_actions(stoker.channel, sizes.actions, sizes.clients)
                rates.append(run.rate)
                overheads += run.overheads_ms
                bar.advance()
    load = meter.stop()
    for f in result.figures[first:]:
        f.other_load = load
    if "actions" not in groups:
        return
    result.figures.append(Figure(
        "actions", f"no-op actions end to end, {workers} workers", "actions/s", rates,
        other_load=load))
    # One figure per percentile, each from all actions of all repetitions.
    result.figures.append(Figure("overhead_p50", "executor overhead per action, p50", "ms",
                                 [median(overheads)], higher_is_better=False, other_load=load))
    result.figures.append(Figure("overhead_p99", "executor overhead per action, p99", "ms",
                                 [percentile(overheads, 99)], higher_is_better=False,
                                 other_load=load))


def _upload(ws: Workspace, sizes: Sizes, target: str, result: Result, bar: Progress) -> None:
    bar.step("uploading")
    try:
        outputs = upload.UploadSet(ws, sizes.file_bytes)
        _repeat(result, bar, sizes.repeats + UPLOAD_EXTRA,
                Figure("upload", f"upload {outputs.label}", "MB/s", []), outputs.bytes / MB,
                lambda: upload.upload_seconds(target, outputs.renew()))
    except upload.UploadUnavailable as e:
        result.skipped["upload"] = str(e)


def size_text(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):,.0f} MiB"
