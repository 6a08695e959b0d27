"""The `stoker bench` command line. Light to import: engine/cli.py adds these arguments to
its own parser, and the measuring modules load only when the command runs."""

from __future__ import annotations

import argparse
import dataclasses
import sys

DESCRIPTION = """\
Measure this machine for Stoker: digest rate per core, staging rate from the local cache,
upload rate to the CAS, spawn rate, and no-op actions per second through a whole
`stoker up`. Prints a table and recommended settings, and writes the figures as JSON and a
PNG chart. Takes about a minute (--quick: a few seconds, less exact).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller data sets, fewer repeats")
    p.add_argument("--data-dir", default="stoker-data",
                   help="the data directory Stoker will use; the test data is made (and "
                        "removed) there, on the local cache's filesystem (default ./stoker-data)")
    p.add_argument("--only", default="",
                   help="comma-separated groups to run: digest, small-files, stage, upload, "
                        "spawn, actions (default: all)")
    p.add_argument("--repeats", type=int, default=0, help="repetitions of each measurement")
    p.add_argument("--workers", type=int, default=0,
                   help="workers of the measured `stoker up` (default: one per core)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="actions at once per worker of the measured `stoker up`")
    p.add_argument("--cas", default="",
                   help="CAS to measure the upload rate against, HOST:PORT (default: the "
                        "measured `stoker up`'s own server)")
    p.add_argument("--json", default="stoker-bench.json", help="where to write the figures")
    p.add_argument("--chart", default="stoker-bench.png", help="where to write the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sizes = p.add_argument_group("data set sizes (override the defaults or --quick)")
    sizes.add_argument("--file-size", default="", help="the large file, e.g. 512M")
    sizes.add_argument("--tree-files", type=int, default=0, help="files in the input tree")
    sizes.add_argument("--tree-dirs", type=int, default=0, help="directories in the input tree")
    sizes.add_argument("--spawns", type=int, default=0, help="posix_spawns per repetition")
    sizes.add_argument("--actions", type=int, default=0, help="no-op actions per repetition")


def main(args: argparse.Namespace) -> int:
    from engine.benchmark import node, report
    from engine.config import ConfigError, parse_size

    try:
        sizes = node.QUICK if args.quick else node.DEFAULT
        overrides = {k: v for k, v in (("repeats", args.repeats), ("tree_files", args.tree_files),
                                       ("tree_dirs", args.tree_dirs), ("spawns", args.spawns),
                                       ("actions", args.actions)) if v}
        if args.file_size:
            overrides["file_bytes"] = parse_size(args.file_size, "--file-size")
        sizes = dataclasses.replace(sizes, **overrides).check()
        groups = {g.strip() for g in args.only.split(",") if g.strip()} or None
        if args.workers < 0 or args.concurrency < 1:
            raise ValueError("--workers must be >= 0 and --concurrency >= 1")
        result = node.run(args.data_dir, sizes, groups=groups, workers=args.workers,
                          concurrency=args.concurrency, upload_target=args.cas,
                          progress=not args.no_progress)
    except (ValueError, ConfigError) as e:
        print(f"stoker bench: {e}", file=sys.stderr)
        return 2
    rec = report.recommend(result)
    print(report.table(result))
    print()
    print(report.recommendation_text(rec))
    report.write_json(args.json, result, rec)
    written = [args.json]
    if result.figures:
        try:
            report.write_chart(args.chart, result)
            written.append(args.chart)
        except ImportError:
            print("stoker bench: no chart: matplotlib is not installed", file=sys.stderr)
    print(f"\nwrote {' and '.join(written)}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m engine.benchmark`)."""
    p = argparse.ArgumentParser(prog="stoker bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return main(p.parse_args(argv))
