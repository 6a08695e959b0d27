"""What `stoker bench` hands back: a table, a sizing recommendation, JSON and a PNG chart."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import orjson

from engine.benchmark.node import Result

GIB = 1 << 30
# Room a typical build action (a compiler, a linker) wants; caps the actions per node.
MEMORY_PER_ACTION = 1 << 30
# Share of the free space on the cache's filesystem given to the cache: the rest holds
# exec roots, outputs and the action cache.
CACHE_SHARE = 0.5


@dataclass
class Recommendation:
    workers: int
    concurrency: int  # actions at once per worker (`stoker up --concurrency`)
    num_concurrent_actions: int
    cache_bytes: int
    reasons: list[str] = field(default_factory=list)

    def command(self) -> str:
        return (f"stoker up --workers {self.workers} --concurrency {self.concurrency} "
                f"--cache-size {self.cache_bytes // GIB}G")


def recommend(result: Result) -> Recommendation:
    m = result.machine
    workers = m.cores
    by_memory = max(1, m.memory_bytes // MEMORY_PER_ACTION)
    # Two actions per core: one computes while the other fetches, stages or uploads.
    actions = max(1, min(2 * m.cores, by_memory))
    concurrency = max(1, math.ceil(actions / workers))
    cache = max(GIB, int(m.free_bytes * CACHE_SHARE) // GIB * GIB)
    reasons = [
        f"workers: one per core ({m.cores} cores); each worker pins itself to its core.",
        f"num_concurrent_actions: {actions} = two per core, so a core computes while another "
        f"action moves data" + (f", capped by memory ({m.memory_bytes / GIB:.1f} GiB at "
                                f"{MEMORY_PER_ACTION / GIB:.0f} GiB per action)"
                                if actions < 2 * m.cores else "") + ".",
        f"local cache: {cache / GIB:.0f} GiB, half of the {m.free_bytes / GIB:.0f} GiB free on "
        f"{m.data_dir} ({m.filesystem}); the rest holds exec roots and outputs.",
    ]
    if m.filesystem in ("tmpfs", "ramfs"):
        reasons.append(f"{m.data_dir} is on {m.filesystem}: the cache would use memory and "
                       "be lost at reboot; put the data directory on a disk.")
    if (f := result.figure("actions")) and f.value > 0:
        reasons.append(f"the pipeline runs about {f.value:,.0f} no-op actions/s: builds whose "
                       f"actions take less than about {1000 * m.cores / f.value:.1f} ms of CPU "
                       "each are limited by the executor, not by the cores.")
    if (f := result.figure("sha256")) and f.value > 0:
        reasons.append(f"digesting 1 GiB of outputs takes about {GIB / 1e6 / f.value:.2f} s "
                       "on one core (SHA-256).")
    if (f := result.figure("stage")) and f.value > 0:
        reasons.append(f"an input tree of 10,000 files stages in about "
                       f"{10_000 / f.value * 1000:.0f} ms.")
    if (f := result.figure("upload")) and f.value > 0:
        reasons.append(f"uploading 1 GiB of outputs takes about {GIB / 1e6 / f.value:.1f} s.")
    return Recommendation(workers, concurrency, actions, cache, reasons)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(result: Result) -> str:
    m = result.machine
    rows = [("figure", "median", "unit", "spread", "samples", "other work")]
    for f in result.figures:
        load = f.other_load
        rows.append((f.label, _fmt(f.value), f.unit, f"±{f.spread:.0%}" if len(f.samples) > 1
                     else "-", " ".join(_fmt(s) for s in f.samples),
                     f"{load.others + load.steal:.2f} cores" if load else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"stoker bench on {m.host}: {m.cores} cores, {m.memory_bytes / GIB:.1f} GiB, "
             f"data dir {m.data_dir} ({m.filesystem}); digest implementation: "
             f"{result.implementation}", ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if 0 < j < 4 else c.ljust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for group, why in result.skipped.items():
        lines.append(f"{group}: {why}")
    if any(f.other_load and f.other_load.noisy for f in result.figures):
        lines.append("Other work kept this machine busy while some figures were measured "
                     "(last column, in cores): those read low. Measure again when it is idle.")
    return "\n".join(lines)


def recommendation_text(rec: Recommendation) -> str:
    lines = ["Recommendation:", f"  {rec.command()}",
             f"  executor.yaml: num_concurrent_actions: {rec.num_concurrent_actions}; "
             f"local_cache.max_size_bytes: {rec.cache_bytes}"]
    lines += [f"  - {r}" for r in rec.reasons]
    return "\n".join(lines)


def to_json(result: Result, rec: Recommendation) -> bytes:
    doc = {
        "machine": asdict(result.machine),
        "implementation": result.implementation,
        "sizes": asdict(result.sizes),
        "pipeline": {"workers": result.workers, "concurrency": result.concurrency},
        "figures": {f.key: {"label": f.label, "unit": f.unit, "median": f.value,
                            "spread": f.spread, "samples": f.samples,
                            "higher_is_better": f.higher_is_better,
                            "other_load": asdict(f.other_load) if f.other_load else None}
                    for f in result.figures},
        "skipped": result.skipped,
        "recommendation": asdict(rec),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def write_json(path: str, result: Result, rec: Recommendation) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(to_json(result, rec))
    os.replace(tmp, path)


def write_chart(path: str, result: Result) -> None:
    """One panel per figure: its median as a bar, the min-max of the samples as a whisker,
    every sample as a dot. Units differ, so panels do not share an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = result.figures
    if not figures:
        raise ValueError("nothing was measured, so there is nothing to chart")
    m = result.machine
    fig, axes = plt.subplots(len(figures), 1, figsize=(8, 0.95 * len(figures) + 1.1),
                             squeeze=False)
    for ax, f in zip(axes[:, 0], figures, strict=True):
        color = "#3b7dd8" if f.higher_is_better else "#d8893b"
        lo, hi = min(f.samples), max(f.samples)
        ax.barh([0], [f.value], color=color, height=0.6,
                xerr=[[f.value - lo], [hi - f.value]], capsize=4)
        ax.scatter(f.samples, [0] * len(f.samples), color="black", s=10, zorder=3)
        ax.set_yticks([])
        ax.set_xlim(0, max(hi, f.value) * 1.3 or 1)
        ax.set_title(f"{f.label}: {_fmt(f.value)} {f.unit}", loc="left", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    fig.suptitle(f"stoker bench — {m.host}, {m.cores} cores, {m.filesystem}, "
                 f"digest: {result.implementation}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
