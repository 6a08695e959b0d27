"""Output size attacks through the in-process pipeline (real files, real processes): sparse
files far larger than the cache, a sparse 16 GiB stdout, hundreds of hard links to one file.
Outputs, stdout and stderr are summed (each inode once, by apparent size) and checked before
a byte is read, so a refused action fails in milliseconds, fills no disk and evicts no blob.

The rigs' cache is 64 MiB, so an action may store 32 MiB (half of it,
action_limits.output_bytes unset)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from google.rpc import code_pb2

from engine import digest as digests
from engine import hashing
from engine.pipeline import outputs
from tests.pipeline.conftest import PipelineRig
from tests.worker.worker_helpers import FN, dg

CACHE = 64 << 20
LIMIT = CACHE // 2


@pytest.fixture
def rig(make_pipeline_rig) -> PipelineRig:
    return make_pipeline_rig(cache_max_bytes=CACHE)


class _Precious:
    """A blob already in the cache, and the cache's figures before the attack."""

    def __init__(self, rig: PipelineRig):
        self.rig = rig
        self.digest = rig.put(b"precious: must outlive any attack " * 1000)
        self.before = rig.store.stats()  # again once the action's own blobs are in

    def assert_intact(self) -> None:
        store = self.rig.store
        assert store.has(self.digest)
        after = store.stats()
        assert after["evictions"] == self.before["evictions"] == 0
        assert after["total_bytes"] == self.before["total_bytes"], (self.before, after)
        assert os.listdir(os.path.join(store.root, "tmp")) == []  # no partial copy either


def _timed(rig: PipelineRig, script: str, precious: _Precious | None = None, **kwargs):
    """The outcome of script run as an action, and how long the pipeline took."""
    task = rig.task(["/bin/sh", "-c", script], **kwargs)  # puts the Action and Command
    if precious is not None:
        precious.before = rig.store.stats()
    start = time.monotonic()
    outcome = asyncio.run(rig.execute(task))
    return outcome, time.monotonic() - start


def _count_hashing(monkeypatch) -> list[str]:
    """Every path outputs are hashed from (the one bulk digest call of outputs.py)."""
    hashed: list[str] = []
    real = hashing.hash_many

    def counting(function: str, paths: list[str]):
        hashed.extend(paths)
        return real(function, paths)

    monkeypatch.setattr(hashing, "hash_many", counting)
    return hashed


def test_a_sparse_16gib_stdout_fails_fast_and_evicts_nothing(rig, monkeypatch):
    precious = _Precious(rig)
    hashed = _count_hashing(monkeypatch)
    # One byte at 16 GiB - 1 through the action's own stdout fd: 16 GiB apparent, 4 KiB real.
    outcome, took = _timed(rig, "dd if=/dev/zero bs=1 count=1 seek=17179869183 status=none",
                           precious)
    print(f"sparse 16 GiB stdout refused in {took:.3f}s")
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION and not outcome.retry
    message = outcome.status.message
    assert "17179869184 bytes" in message and "stdout 16.0 GiB" in message, message
    assert f"at most {LIMIT} bytes" in message and "action_limits.output_bytes" in message
    assert took < 2.0
    assert hashed == []  # not a byte of it was read
    precious.assert_intact()


def test_a_sparse_output_far_over_the_limit_fails_fast_and_evicts_nothing(rig, monkeypatch):
    precious = _Precious(rig)
    hashed = _count_hashing(monkeypatch)
    outcome, took = _timed(rig, "truncate -s 1G out/big.bin && echo done", precious,
                           output_paths=["out/big.bin"])
    print(f"sparse 1 GiB output (cache {CACHE >> 20} MiB) refused in {took:.3f}s")
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION and not outcome.retry
    message = outcome.status.message
    assert "1073741829 bytes" in message, message  # the output and 'done\n'
    assert "'out/big.bin' 1.0 GiB" in message and "stdout 5 B" in message, message
    assert "action_limits.output_bytes" in message
    assert took < 2.0 and hashed == []
    precious.assert_intact()


def test_an_output_directory_over_the_limit_is_refused_before_it_is_read(rig, monkeypatch):
    precious = _Precious(rig)
    hashed = _count_hashing(monkeypatch)
    outcome, took = _timed(rig, "mkdir -p d/sub && for i in 1 2 3 4 5; do "
                           "truncate -s 8M d/sub/f$i; done", precious, output_paths=["d"])
    print(f"a 40 MiB output directory refused in {took:.3f}s")
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert "5 output files, the largest" in outcome.status.message
    assert hashed == []
    precious.assert_intact()


def test_256_hard_links_to_one_sparse_file_are_hashed_and_stored_once(rig, monkeypatch):
    precious = _Precious(rig)
    hashed = _count_hashing(monkeypatch)
    inserted: list[str] = []
    real_insert = rig.store.insert_file

    def counting_insert(digest, src_path, **kwargs):
        inserted.append(src_path)
        return real_insert(digest, src_path, **kwargs)

    monkeypatch.setattr(rig.store, "insert_file", counting_insert)
    # 16 MiB apparent each: 4 GiB if every link counted, 16 MiB as one inode.
    links = [f"l{i}" for i in range(128)]
    script = ("truncate -s 16M f && mkdir d && for i in $(seq 0 127); do ln f l$i; "
              "ln f d/l$i; done")
    outcome, took = _timed(rig, script, output_paths=[*links, "d"])
    print(f"256 hard links to a 16 MiB sparse file collected in {took:.3f}s")
    assert outcome.ok and outcome.result.exit_code == 0, outcome.status
    zeros = digests.of_bytes(FN, bytes(16 << 20))
    files = outcome.result.output_files
    assert len(files) == 128 and {dg(f.digest) for f in files} == {zeros}
    [od] = outcome.result.output_directories
    assert od.path == "d"
    # stdout, stderr and the one inode: each read once.
    assert len(hashed) == 3, hashed
    assert len([p for p in inserted if not p.endswith(("/stdout", "/stderr"))]) == 1
    assert rig.store.has(zeros) and rig.store.has(precious.digest)


def test_outputs_at_the_limit_are_kept_and_one_byte_more_is_refused(rig):
    precious = _Precious(rig)
    outcome, took = _timed(rig, f"truncate -s {LIMIT} out.bin", output_paths=["out.bin"])
    print(f"an output of exactly the limit ({LIMIT >> 20} MiB) collected in {took:.3f}s")
    assert outcome.ok and outcome.result.exit_code == 0, outcome.status
    [out] = outcome.result.output_files
    assert out.digest.size_bytes == LIMIT and rig.store.has(dg(out.digest))
    assert rig.store.has(precious.digest)

    outcome, _ = _timed(rig, f"truncate -s {LIMIT} out.bin; printf x",
                        output_paths=["out.bin"])
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert f"{LIMIT + 1} bytes" in outcome.status.message


def test_action_limits_output_bytes_sets_the_limit_up_to_the_cache_size(make_pipeline_rig):
    rig = make_pipeline_rig(cache_max_bytes=CACHE, action_output_bytes=1 << 20)
    limit = rig.config.output_limit_bytes()
    assert limit == 1 << 20
    upload = _upload_executor(rig)
    if upload.output_limit != limit:
        pytest.skip("compose.py does not pass Config.output_limit_bytes() to UploadExecutor")
    outcome, _ = _timed(rig, "truncate -s 2M out.bin", output_paths=["out.bin"])
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    assert f"at most {1 << 20} bytes" in outcome.status.message


def _upload_executor(rig: PipelineRig):
    from engine.pipeline.upload import UploadExecutor

    executor = rig.pipeline._head
    while not isinstance(executor, UploadExecutor):
        executor = executor._inner  # type: ignore[attr-defined]
    return executor


def test_outputs_larger_than_the_free_disk_are_resource_exhausted(rig, monkeypatch):
    precious = _Precious(rig)
    monkeypatch.setattr(outputs, "_free_bytes", lambda store: 4096)
    outcome, _ = _timed(rig, "truncate -s 8K out.bin", precious, output_paths=["out.bin"])
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED and not outcome.retry
    assert "4096 bytes (4.0 KiB) of disk free" in outcome.status.message
    precious.assert_intact()


def test_an_output_directory_of_too_many_entries_is_refused_as_it_is_listed(rig, monkeypatch):
    """A result whose Trees the action cache would refuse (more entries than an input tree
    may have) is refused while the directory is listed, before anything is read or held."""
    monkeypatch.setattr(outputs, "DEFAULT_MAX_ENTRIES", 300)
    hashed = _count_hashing(monkeypatch)
    outcome, _ = _timed(rig, "mkdir -p d/a d/b && touch $(seq -f 'd/a/f%g' 200) "
                        "$(seq -f 'd/b/f%g' 200)", output_paths=["d"])
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert "outputs hold more than 300 files, directories and symlinks" \
        in outcome.status.message
    assert hashed == []
    fine, _ = _timed(rig, "mkdir -p d && touch $(seq -f 'd/f%g' 250)", output_paths=["d"])
    assert fine.status.code == code_pb2.OK, fine.status


def test_an_output_directory_nested_too_deep_is_refused(rig):
    deep = "/".join(["d"] * (outputs.MAX_DEPTH + 2))
    outcome, _ = _timed(rig, f"mkdir -p out/{deep}", output_paths=["out"])
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert f"is nested more than {outputs.MAX_DEPTH} directories deep" \
        in outcome.status.message
