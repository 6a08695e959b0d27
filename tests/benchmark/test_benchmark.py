"""Smoke tests of the benchmark machinery at tiny sizes: `stoker bench` produces sane
figures, JSON and a PNG; bench/'s references run and fill the table. No timing assertions:
the figures only have to be positive and finite."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat

import pytest

from bench import bench_digest, bench_stage
from bench import run as bench_run
from bench.common import Measured, table
from engine.benchmark import cli, node, report
from engine.benchmark.scratch import Workspace, default_parent, filesystem_type
from engine.digest import of_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--file-size", "1M", "--tree-files", "60", "--tree-dirs", "3", "--spawns", "20",
        "--actions", "8", "--repeats", "2", "--no-progress"]


@pytest.fixture
def ws(tmp_path):
    with Workspace(str(tmp_path)) as w:
        yield w


@pytest.mark.slow
def test_stoker_bench_writes_figures_json_and_chart(tmp_path, capsys):
    out_json, out_png = tmp_path / "fig.json", tmp_path / "fig.png"
    data_dir = tmp_path / "data"
    assert cli.run([*TINY, "--data-dir", str(data_dir), "--json", str(out_json),
                    "--chart", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "Recommendation:" in printed and "stoker up --workers" in printed

    doc = json.loads(out_json.read_bytes())
    figures = doc["figures"]
    expected = {"sha256", "sha256_all_cores", "blake3", "small_files", "stage", "spawn",
                "actions", "overhead_p50", "overhead_p99"}
    assert expected <= set(figures)
    for key in expected:
        f = figures[key]
        assert f["samples"] and all(math.isfinite(s) and s >= 0 for s in f["samples"]), key
        assert f["median"] > 0 or key.startswith("overhead"), key
    assert len(figures["stage"]["samples"]) == 2  # --repeats
    assert figures["stage"]["other_load"]["others"] >= 0
    # The upload rate is measured or the JSON says why it is not.
    assert "upload" in figures or "upload" in doc["skipped"]
    assert doc["implementation"] and doc["machine"]["cores"] >= 1
    rec = doc["recommendation"]
    cores = doc["machine"]["cores"]
    assert rec["workers"] == cores
    assert 1 <= rec["num_concurrent_actions"] <= 2 * cores
    assert rec["cache_bytes"] >= 1 << 30
    assert out_png.read_bytes()[:8] == PNG_MAGIC and out_png.stat().st_size > 5000
    # The scratch data is gone, and the data dir it made too.
    assert not data_dir.exists()


def test_stoker_bench_only_some_groups(tmp_path):
    out_json = tmp_path / "fig.json"
    assert cli.run([*TINY, "--only", "digest,spawn", "--data-dir", str(tmp_path),
                    "--json", str(out_json), "--chart", str(tmp_path / "c.png")]) == 0
    figures = json.loads(out_json.read_bytes())["figures"]
    assert set(figures) == {"sha256", "sha256_all_cores", "blake3", "spawn"}
    assert set(os.listdir(tmp_path)) == {"fig.json", "c.png"}  # no scratch data left


@pytest.mark.parametrize("argv, message", [
    (["--only", "digest,warp"], "unknown benchmark group(s) ['warp']"),
    (["--tree-files", "2", "--tree-dirs", "5"], "tree_dirs (5) must not exceed tree_files"),
    (["--file-size", "lots"], "--file-size: 'lots' is not a size"),
    (["--concurrency", "0"], "--concurrency >= 1"),
])
def test_stoker_bench_bad_input_is_named(tmp_path, capsys, argv, message):
    assert cli.run([*argv, "--no-progress", "--data-dir", str(tmp_path / "d"),
                    "--json", str(tmp_path / "j")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "j").exists()


def test_recommendation_follows_the_machine():
    machine = node.Machine(cores=8, memory_bytes=4 << 30, data_dir="/x", filesystem="tmpfs",
                           free_bytes=101 << 30)
    result = node.Result(machine, node.QUICK, "native", 8, 2)
    result.figures.append(node.Figure("actions", "a", "actions/s", [400.0]))
    rec = report.recommend(result)
    assert rec.workers == 8
    assert rec.num_concurrent_actions == 4  # memory caps it below two per core
    assert rec.cache_bytes == 50 << 30
    text = " ".join(rec.reasons)
    assert "capped by memory" in text and "tmpfs" in text and "20.0 ms" in text


def test_scratch_is_on_disk_and_removed(tmp_path):
    assert filesystem_type("/dev/shm") == "tmpfs"
    assert filesystem_type(default_parent()) not in ("tmpfs", "ramfs")
    with Workspace(str(tmp_path)) as w:
        root = w.root
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
        assert w.filesystem == filesystem_type(str(tmp_path))
    assert not os.path.exists(root)


def test_input_tree_is_staged_from_the_cas(ws):
    ts = ws.input_tree(25, 4)
    assert len(ts.paths) == len(ts.tree.files) == 25
    assert len(ts.tree.dirs) == 4
    for f, p in zip(ts.tree.files, ts.paths, strict=True):
        assert of_file("sha256", p) == f.digest
        assert 1024 <= f.digest.size <= 4096
        assert os.stat(p).st_nlink >= 2  # a hardlink of the cached inode, not a copy
    assert ws.input_tree(25, 4) is ts  # made once per run


def test_bench_references_run_and_fill_the_table(ws):
    if not shutil.which("b3sum"):
        pytest.skip("b3sum is not installed (scripts/install-test-deps.sh installs it)")
    rows = (bench_digest.sha256(ws, 1, 1 << 20) + bench_digest.blake3(ws, 1, 1 << 20)
            + bench_digest.small_files(ws, 1, 40, 4) + bench_stage.stage(ws, 1, 40, 4))
    assert [m.reference_name for m in rows] == [
        "`openssl dgst -sha256`", "`b3sum` (all threads, mmap)",
        "C open+read loop (gcc -O2)" if shutil.which("gcc") else
        "`xargs cat >/dev/null` (no gcc here)", "`cp -al` of the same tree"]
    for m in rows:
        assert m.ratio > 0 and math.isfinite(m.ratio)
    text = table(rows)
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + len(rows)
    assert "stage 40 files, 4 dirs" in text
    assert not [n for n in os.listdir(ws.root) if n.startswith(("exec-root", "cp-al"))]


def test_a_criterion_decides_met():
    m = Measured("x", "actions/s", [10.0], [20.0], "ref", target=0.0,
                 criterion="overhead p50 <= 2 ms", passed=False)
    assert not m.met and "overhead p50 <= 2 ms" in table([m]) and "**NO**" in table([m])


def test_run_records_results(tmp_path, monkeypatch, capsys):
    def tiny(ws: Workspace, repeats: int) -> list[Measured]:
        return bench_digest.sha256(ws, repeats, 1 << 20)

    def broken(ws: Workspace, repeats: int) -> list[Measured]:
        raise RuntimeError("no server here")

    monkeypatch.setitem(bench_run.BENCHMARKS, "sha256", tiny)
    monkeypatch.setitem(bench_run.BENCHMARKS, "upload", broken)
    out = tmp_path / "RESULTS.md"
    status = bench_run.main(["--only", "sha256", "--only", "upload", "--repeats", "2",
                             "--dir", str(tmp_path), "--record", str(out)])
    assert status == 1  # a benchmark could not run
    text = out.read_text()
    assert "Command: `python -m bench.run --only sha256 --only upload --repeats 2" in text
    assert "| SHA-256 of a 1 MiB file | MB/s |" in text
    assert "- upload: RuntimeError: no server here" in text
    assert "digest implementation:" in text and "CPU:" in text
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # scratch removed
