"""A small disk under attack: many ByteStream writes abandoned midway (free for a client to
start), then a full disk. Partial uploads must stay bounded, a full disk must be
RESOURCE_EXHAUSTED (never INTERNAL, never a hang), and once space is back (idle partials
expired, the filler gone) writes succeed again without a restart, every blob intact."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.proto import bs_pb2, re_pb2
from tests.adversarial.adv_support import (
    ROOT_ONLY,
    Guard,
    attempt,
    describe,
    served_blobs,
)
from tests.integration.support import Client, blob_resource, command, digest_of, start

pytestmark = [ROOT_ONLY, pytest.mark.timeout(150)]

MiB = 1 << 20
CACHE = 16 * MiB
EXPIRY_S = 3  # upload_idle_expiry, short so that the test can wait for it
OK_WHEN_FULL = {grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture
def tmpfs_dir(base_dir: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs (searchable by action uids) to serve as a data dir; unmounted after,
    with bounded retries (a lazy unmount as the last resort)."""
    mnt = base_dir / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mnt)],
                   check=True, timeout=10)
    yield mnt
    for _ in range(20):
        if subprocess.run(["umount", str(mnt)], timeout=10).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(mnt)], timeout=10, check=False)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def abandon(client: Client, declared: int, send: int) -> grpc.StatusCode:
    """Start a ByteStream Write of a declared-size blob, send `send` bytes of it, wait until
    the server has them (or 2 s), cancel. The call's final code."""
    data = os.urandom(declared)
    resource = blob_resource(digest_of(data), upload=str(uuid.uuid4()))
    release = threading.Event()

    def requests():
        for off in range(0, send, MiB):
            yield bs_pb2.WriteRequest(resource_name=resource if off == 0 else "",
                                      write_offset=off, data=data[off:off + MiB])
        release.wait(10)  # the stream stays open, never finished

    call = client.bs.Write.future(requests(), timeout=30)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not call.done():
        try:
            status = client.bs.QueryWriteStatus(
                bs_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=5)
            if status.committed_size >= send:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    call.cancel()
    release.set()
    return call.code()


def write_blob(client: Client, data: bytes, how: str, timeout: float = 10) -> None:
    """One complete write; raises grpc.RpcError (per-blob statuses become one too)."""
    d = digest_of(data)
    if how == "ByteStream":
        chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
        client.bs.Write(iter([bs_pb2.WriteRequest(
            resource_name=blob_resource(d, upload=str(uuid.uuid4())) if i == 0 else "",
            write_offset=i * MiB, data=c, finish_write=i == len(chunks) - 1)
            for i, c in enumerate(chunks)]), timeout=timeout)
        return
    reply = client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data)]),
        timeout=timeout)
    status = reply.responses[0].status
    if status.code != 0:
        raise _BlobError(grpc.StatusCode(_CODES[status.code]), status.message)


_CODES = {c.value[0]: c.value for c in grpc.StatusCode}


class _BlobError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


def write_eventually(client: Client, data: bytes, how: str, within: float) -> str | None:
    """Retry a write while it is RESOURCE_EXHAUSTED; None once it succeeds, else why not."""
    deadline = time.monotonic() + within
    last = "never tried"
    while time.monotonic() < deadline:
        try:
            write_blob(client, data, how)
            return None
        except grpc.RpcError as e:
            last = f"{e.code()}: {e.details()}"[:300]
            if e.code() not in OK_WHEN_FULL:
                return f"{how}: {last}"
        time.sleep(0.5)
    return f"{how} still failing after {within:.0f}s: {last}"


def fill(path: Path) -> int:
    """Write zeros to path until the filesystem is full; the bytes written."""
    written = 0
    chunk = b"\0" * MiB
    with open(path, "wb", buffering=0) as f:
        while written < 64 * MiB:
            try:
                written += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # Fill the last partial MiB too.
                for size in (64 << 10, 4 << 10):
                    try:
                        while True:
                            written += f.write(b"\0" * size)
                    except OSError:
                        pass
                break
    return written


def test_abandoned_uploads_and_a_full_disk(tmpfs_dir, stoker_factory, sentinel, base_dir,
                                           mark):
    config = base_dir / "disk.yaml"
    config.write_text(f"executor:\n  upload_idle_expiry: {EXPIRY_S}s\n")
    process = start(stoker_factory("disk", data_dir=tmpfs_dir, extra_args=[
        "--config", str(config), "--cache-size", str(CACHE)]))
    client = Client(process.address)
    problems: list[str] = []
    written: list[re_pb2.Digest] = []
    try:
        guard = Guard(process, client, sentinel, base_dir, mark)

        # 1. Twelve writes of 4 MiB blobs abandoned after 3 MiB: 36 MiB asked for, on a
        # 48 MiB disk with a 16 MiB cache.
        codes = [abandon(client, 4 * MiB, 3 * MiB) for _ in range(12)]
        bad = [c for c in codes if c not in (grpc.StatusCode.CANCELLED,
                                             grpc.StatusCode.RESOURCE_EXHAUSTED)]
        if bad:
            problems.append(f"abandoned writes ended with {bad}")
        time.sleep(0.5)
        held = dir_bytes(tmpfs_dir / "uploads")
        if held > CACHE + 2 * MiB:
            problems.append(f"{held / MiB:.1f} MiB of partial uploads held, over the "
                            f"{CACHE / MiB:.0f} MiB cache size")

        # 2. Once the partials expire (or were refused), complete writes work again.
        for how in ("ByteStream", "BatchUpdateBlobs"):
            data = os.urandom(3 * MiB if how == "ByteStream" else MiB)
            why = write_eventually(client, data, how, within=EXPIRY_S + 12)
            if why:
                problems.append(f"after the abandoned uploads: {why}")
            else:
                written.append(digest_of(data))

        # 3. A full disk: RESOURCE_EXHAUSTED within seconds, for uploads and for Execute
        # (of an action whose blobs are uploaded before the disk fills).
        root = client.put_tree({"in": os.urandom(256 << 10)}).root
        action = client.action(command(
            ["/bin/sh", "-c", "head -c 1048576 /dev/zero > out; echo done"],
            output_files=["out"]), root)
        filler = tmpfs_dir / "filler"
        filled = fill(filler)
        for how in ("ByteStream", "BatchUpdateBlobs"):
            t0 = time.monotonic()
            try:
                write_blob(client, os.urandom(2 * MiB), how)
                problems.append(f"{how} on a full disk ({filled / MiB:.0f} MiB filler) "
                                "succeeded: the filler did not fill it?")
            except grpc.RpcError as e:
                if e.code() not in OK_WHEN_FULL:
                    problems.append(f"{how} on a full disk: {e.code()} {e.details()!r} after "
                                    f"{time.monotonic() - t0:.1f}s (want RESOURCE_EXHAUSTED)"
                                    [:400])
        ex = attempt(problems, "Execute on a full disk", client.execute, action,
                     skip_cache_lookup=True, timeout=30)
        full = ex.response if ex is not None else None
        if full is not None and full.status.code not in (0, 8):
            problems.append("Execute on a full disk: " + describe(client, full))

        # 4. Space back: writes succeed again without a restart.
        filler.unlink()
        for how in ("ByteStream", "BatchUpdateBlobs"):
            data = os.urandom(2 * MiB)
            why = write_eventually(client, data, how, within=10)
            if why:
                problems.append(f"after the disk had room again: {why}")
            else:
                written.append(digest_of(data))
        try:
            served_blobs(client, written)
        except AssertionError as e:
            problems.append(str(e))
        problems += guard.problems([] if full is None else [full.result])
        assert not problems, "\n".join(problems)
    finally:
        client.close()
        process.stop(grace=20)
