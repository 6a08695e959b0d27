"""Hostile and oversized input trees, full disks and crashes end as the status they deserve:
the client's fault is INVALID_ARGUMENT (answered once, never retried), a full disk is
RESOURCE_EXHAUSTED naming the path, and neither leaves the cache or the server worse off.

The first tests drive OutcomeExecutor directly; the rest go through a real `stoker up`."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from google.rpc import code_pb2

from engine import errors
from engine.pipeline.context import ActionContext
from engine.pipeline.inputs import InputTree
from engine.pipeline.outcome import OutcomeExecutor
from engine.pipeline.outputs import OutputError
from engine.proto import re_pb2
from engine.task import ActionTask
from tests.integration.support import (
    Client,
    StokerProcess,
    blob_resource,
    command,
    digest_of,
    start,
)

# ---- OutcomeExecutor ------------------------------------------------------------------------


class Raising:
    """An inner executor that gets as far as `stage` says, then raises error."""

    def __init__(self, error: BaseException, stage: str):
        self.error = error
        self.stage = stage

    async def execute(self, ctx: ActionContext) -> None:
        order = ["fetch", "stage", "run", "upload"]
        reached = order.index(self.stage)
        if reached >= 1:
            ctx.tree = InputTree(root_digest=None)  # type: ignore[arg-type]
        if reached >= 2:
            ctx.action_dir = object()
        if reached >= 3:
            ctx.run = object()
            ctx.result.exit_code = 0
            ctx.result.stdout_digest.hash = "0" * 64
        raise self.error


def outcome(error: BaseException, stage: str) -> ActionContext:
    ctx = ActionContext(task=ActionTask(id="t1", action=re_pb2.Action()))
    asyncio.run(OutcomeExecutor(Raising(error, stage)).execute(ctx))
    return ctx


def os_error(code: int, *paths: str) -> OSError:
    return OSError(code, os.strerror(code), *paths)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("stage", ["fetch", "stage", "run", "upload"])
def test_a_full_disk_is_resource_exhausted_naming_the_path(code, stage):
    ctx = outcome(os_error(code, "/data/cas/tmp/123.4"), stage)
    assert ctx.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert "disk is full" in ctx.status.message
    assert "/data/cas/tmp/123.4" in ctx.status.message
    assert os.strerror(code) in ctx.status.message
    assert not ctx.retry


def test_a_full_disk_without_a_path_says_what_was_being_done():
    ctx = outcome(os_error(errno.ENOSPC), "upload")
    assert ctx.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert "disk is full" in ctx.status.message
    assert "while capturing the outputs" in ctx.status.message


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.ELOOP])
@pytest.mark.parametrize("stage", ["stage", "run"])
def test_client_shaped_paths_refused_before_the_run_are_invalid_argument(code, stage):
    ctx = outcome(os_error(code, "/b/exec/root/" + "x" * 300), stage)
    assert ctx.status.code == code_pb2.INVALID_ARGUMENT
    assert os.strerror(code) in ctx.status.message and "x" * 300 in ctx.status.message
    assert not ctx.retry


@pytest.mark.parametrize(("error", "stage", "code", "retry"), [
    (os_error(errno.EIO, "/data/cas/x"), "stage", code_pb2.INTERNAL, True),
    (os_error(errno.ENAMETOOLONG, "/data/cas/x"), "fetch", code_pb2.INTERNAL, True),
    (os_error(errno.ELOOP, "out"), "upload", code_pb2.INTERNAL, True),
    (OutputError("out: not a regular file"), "upload", code_pb2.FAILED_PRECONDITION, False),
    (ValueError("a bug"), "upload", code_pb2.INTERNAL, True),
    (IndexError("list index out of range"), "stage", code_pb2.INTERNAL, True),
    (errors.StokerError("base class"), "upload", code_pb2.INTERNAL, False),
])
def test_other_failures(error, stage, code, retry):
    ctx = outcome(error, stage)
    assert (ctx.status.code, ctx.retry) == (code, retry)


class _OkCode(errors.StokerError):
    code = code_pb2.OK


@pytest.mark.parametrize("error", [
    os_error(errno.ENOSPC), os_error(errno.EIO, "x"), OutputError("bad output"),
    RuntimeError("collection crashed"), _OkCode("claims success"),
])
def test_outputs_that_could_not_be_captured_are_never_ok(error):
    ctx = outcome(error, "upload")
    assert ctx.status.code != code_pb2.OK, ctx.status


# ---- end to end -----------------------------------------------------------------------------

INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
EMPTY = digest_of(b"")


def upload_directory(client: Client, d: re_pb2.Directory) -> re_pb2.Digest:
    """Upload a Directory of any size (ByteStream past the batch limit)."""
    data = d.SerializeToString()
    digest = digest_of(data)
    if len(data) < 2 << 20:
        return client.put(data)
    chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    client.bs_write(blob_resource(digest, upload=str(uuid.uuid4())), chunks)
    return digest


def times_run(stoker: StokerProcess, since: int, action: re_pb2.Digest) -> int:
    """How many times the workers ran action (one 'action done' line per attempt)."""
    text = stoker.log_tail(since=since, limit=10 ** 9)
    return sum(1 for line in text.splitlines()
               if "action done" in line and action.hash in line)


def execute_once(client: Client, stoker: StokerProcess, root: re_pb2.Digest,
                 argv: list[str]) -> re_pb2.ExecuteResponse:
    mark = stoker.log_size()
    action = client.action(command(argv), root)
    response = client.execute(action).response
    assert times_run(stoker, mark, action) == 1, stoker.log_tail(since=mark)
    return response


def chain(client: Client, levels: int) -> re_pb2.Digest:
    d = client.put_message(re_pb2.Directory())
    for _ in range(levels):
        d = client.put_message(re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name="d", digest=d)]))
    return d


@pytest.mark.parametrize(("make", "needles"), [
    (lambda c: c.put_tree({"n" * 300: b"x"}).root, ["300 bytes long", "255"]),
    (lambda c: c.put_tree({"s": {"n" * 256: {}}}).root, ["input root/s", "256 bytes long"]),
    (lambda c: chain(c, 300), ["nested more than 256 levels"]),
    (lambda c: c.put_message(re_pb2.Directory(symlinks=[
        re_pb2.SymlinkNode(name="l", target="a/" * 2048)])), ["4096 bytes long", "4095"]),
])
def test_trees_past_a_limit_are_invalid_argument_once(client, stoker, make, needles):
    response = execute_once(client, stoker, make(client), ["/bin/true"])
    assert response.status.code == INVALID_ARGUMENT, response.status
    for needle in needles:
        assert needle in response.status.message


def test_a_directory_of_100k_empty_files_runs(client, stoker):
    n = 100_000
    d = re_pb2.Directory(files=[re_pb2.FileNode(name=f"f{i:06d}", digest=EMPTY)
                                for i in range(n)])
    root = client.put_message(re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="wide", digest=upload_directory(client, d))]))
    response = execute_once(client, stoker, root, ["/bin/sh", "-c", "ls wide | wc -l"])
    assert response.status.code == 0, response.status
    assert response.result.exit_code == 0
    assert client.read(response.result.stdout_digest).strip() == str(n).encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def crash(process: StokerProcess) -> None:
    """SIGKILL the supervisor and every child at once (none may close the store cleanly),
    and wait until they are gone."""
    children = [int(p.read_text()) for p in (process.data_dir / "run").glob("*.pid")]
    assert children
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    os.killpg(process.proc.pid, signal.SIGKILL)
    process.proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "children outlived SIGKILL"
        time.sleep(0.05)


def test_many_inputs_after_a_dirty_restart(stoker_factory):
    """>= 4096 cached inputs, then a crash: every blob is unverified, and staging them
    failed with IndexError (INTERNAL, retried five times) on every try."""
    process = start(stoker_factory("dirty", workers=1, concurrency=1))
    n = 4200
    contents = [f"input {i} {uuid.uuid4()}\n".encode() for i in range(n)]
    spec = {"a": {f"f{i:05d}": c for i, c in enumerate(contents[:n // 2])},
            "b": {f"f{i:05d}": c for i, c in enumerate(contents[n // 2:])}}
    script = "cat a/f00000 b/f02099; ls a b | wc -l"
    expected = contents[0] + contents[-1] + f"{n + 3}\n".encode()  # + 'a:', 'b:', blank
    client = Client(process.address)
    try:
        root = client.put_tree(spec).root
        first = execute_once(client, process, root, ["/bin/sh", "-c", script])
        assert first.status.code == 0, first.status
        assert client.read(first.result.stdout_digest) == expected
    finally:
        client.close()
    crash(process)

    for _ in range(2):  # the crash, then a clean restart with blobs still unverified
        start(process)
        client = Client(process.address)
        try:
            again = execute_once(client, process, root, ["/bin/sh", "-c", script])
            assert again.status.code == 0, again.status
            assert client.read(again.result.stdout_digest) == expected
        finally:
            client.close()
        assert process.stop() == 0


@pytest.fixture
def small_disk(base_dir: Path):
    """A 16 MiB tmpfs for a data directory; unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    point = base_dir / f"small-disk-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs",
                              str(point)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=True)
    point.rmdir()


def cached_blobs(data_dir: Path) -> list[tuple[str, int]]:
    """(hash, size) of every blob file in the local CAS (both variants)."""
    out = set()
    for path in (data_dir / "cache" / "cas" / "sha256").rglob("*"):
        parts = path.name.split("-")
        if path.is_file() and len(parts) in (2, 3):
            out.add((parts[0], int(parts[1])))
    return sorted(out)


def test_a_full_disk_is_resource_exhausted_and_leaves_a_sound_cache(base_dir, small_disk):
    # A small cache keeps the index (64 bytes a slot, sized from the cache) well inside the
    # disk: the default 10G cache's index alone is larger than this whole disk.
    # Outputs may fill the cache (the default allows half of it), so that the 10 MB output
    # below is refused for the disk's free space, not for the output limit.
    config = base_dir / f"{small_disk.name}.yaml"
    config.write_text("executor:\n  action_limits:\n    output_bytes: 12M\n")
    process = StokerProcess(small_disk / "data", base_dir / f"{small_disk.name}.log",
                            workers=1, concurrency=1,
                            extra_args=["--cache-size", "12M", "--config", str(config)])
    start(process)
    client = Client(process.address)
    try:
        small = client.run("echo small > out", output_files=["out"])
        assert small.response.status.code == 0, small.response.status
        # 10 MB fits on the disk once, not twice: it cannot go into the CAS as well.
        big = client.run("head -c 10000000 /dev/urandom > out; echo written",
                         output_files=["out"])
        status = big.response.status
        assert status.code == code_pb2.RESOURCE_EXHAUSTED, status
        # Seen before a byte is copied (the outputs' sizes against the free space), or while
        # copying: either way RESOURCE_EXHAUSTED, naming where.
        assert ("disk is full" in status.message or "of disk free" in status.message) \
            and str(small_disk) in status.message, status.message
        assert process.alive()
        again = client.run("echo again > out", output_files=["out"])
        assert again.response.status.code == 0, again.response.status
        assert client.read(again.result.output_files[0].digest) == b"again\n"
        # Everything the CAS holds, and serves, matches its digest: nothing partial.
        blobs = cached_blobs(process.data_dir)
        assert blobs
        for h, size in blobs:
            data = client.bs_read(blob_resource(re_pb2.Digest(hash=h, size_bytes=size)))
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (h, size)
    finally:
        client.close()
        process.stop()
