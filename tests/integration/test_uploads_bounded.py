"""Partial ByteStream uploads are bounded: counted against the cache size, capped per client,
deleted when idle; a full disk is RESOURCE_EXHAUSTED for the write that hit it and Stoker
recovers without a restart (engine/server/bytestream_service.py)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.proto import bs_pb2, re_pb2
from tests.integration.support import Client, StokerProcess, blob_resource, digest_of, start

MiB = 1 << 20


def _config(path: Path, expiry: str, client_max: str) -> str:
    path.write_text(f"executor:\n  upload_idle_expiry: {expiry}\n"
                    f"  upload_client_max_bytes: {client_max}\n")
    return str(path)


def _abandon(client: Client, data: bytes, sent: int, chunk: int = MiB) -> tuple[str, grpc.RpcError]:
    """Send the first `sent` bytes of data and end the stream without finish_write."""
    resource = blob_resource(digest_of(data), upload=str(uuid.uuid4()))
    chunks = [data[i:i + chunk] for i in range(0, sent, chunk)]
    with pytest.raises(grpc.RpcError) as info:
        client.bs_write(resource, chunks, finish=False)
    return resource, info.value


def _committed(client: Client, resource: str) -> int:
    return client.bs.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=10).committed_size


def _batch(client: Client, blobs: list[bytes]) -> list[int]:
    reply = client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs]),
        timeout=30)
    return [r.status.code for r in reply.responses]


def _healthz(stoker: StokerProcess) -> int:
    with urllib.request.urlopen(f"{stoker.health_url}/healthz", timeout=5) as r:
        return r.status


@pytest.fixture
def small_disk(base_dir: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = base_dir / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def test_a_disk_full_of_abandoned_uploads_recovers_when_they_expire(small_disk, base_dir):
    # The cache may grow past the disk: the disk, not the budget, runs out.
    config = _config(base_dir / "full-disk.yaml", "3s", "1G")
    stoker = StokerProcess(small_disk / "data", base_dir / "full-disk.log",
                           extra_args=["--config", config, "--cache-size", "1G"])
    start(stoker)
    client = Client(stoker.address)
    try:
        kept = [os.urandom(100_000) for _ in range(10)]
        assert _batch(client, kept) == [0] * 10
        big = os.urandom(2 * MiB)
        client.bs_write(blob_resource(digest_of(big), upload=str(uuid.uuid4())),
                        [big[:MiB], big[MiB:]])

        # Abandon uploads, ever smaller, until not even 64 KiB more fits.
        abandoned: list[tuple[str, bytes]] = []
        full_errors = []
        for size in (4 * MiB, MiB, 256 << 10, 64 << 10):
            for _ in range(64):
                data = os.urandom(size + 1)  # declared one byte more than is sent
                resource, err = _abandon(client, data, size, chunk=min(size, MiB))
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    full_errors.append(err.details())
                    break
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                abandoned.append((resource, data))
            else:
                pytest.fail(f"the disk never filled with uploads of {size} bytes")
        assert all("no space left" in e for e in full_errors), full_errors
        assert len(abandoned) >= 5
        first, first_data = abandoned[0]
        assert _committed(client, first) == 4 * MiB

        # The disk is full: a batch gets a status per blob, a write its own status.
        fresh = [os.urandom(MiB), os.urandom(MiB)]
        assert _batch(client, fresh) == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 2
        with pytest.raises(grpc.RpcError) as info:
            client.bs_write(blob_resource(digest_of(fresh[0]), upload=str(uuid.uuid4())),
                            [fresh[0]])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert client.missing([digest_of(b) for b in fresh]) == \
            {(digest_of(b).hash, len(b)) for b in fresh}  # nothing partial was published
        assert _healthz(stoker) == 200

        # Idle uploads expire; their clients see committed_size 0 and start again at 0.
        deadline = time.monotonic() + 15
        while _committed(client, abandoned[-1][0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _committed(client, abandoned[-1][0]) == 0
        assert _committed(client, first) == 0
        assert os.listdir(stoker.data_dir / "uploads") == []
        with pytest.raises(grpc.RpcError) as info:
            client.bs_write(first, [first_data[4 * MiB:]], start=4 * MiB)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.bs_write(first, [first_data[i:i + MiB] for i in range(0, len(first_data), MiB)])

        # Writes work again, without a restart, and every blob served matches its digest.
        assert _batch(client, fresh) == [0, 0]
        for data in [*kept, big, first_data, *fresh]:
            d = digest_of(data)
            assert client.bs_read(blob_resource(d)) == data
        assert _healthz(stoker) == 200
        assert stoker.alive()
    finally:
        client.close()
        assert stoker.stop() == 0, stoker.log_tail()


def test_partial_uploads_count_against_the_cache_and_are_capped_per_client(base_dir):
    data_dir = base_dir / "bounded"
    uploads = data_dir / "uploads"
    uploads.mkdir(parents=True)
    leftover = uploads / "tmp-left-by-a-crash"
    leftover.write_bytes(b"x" * 1000)
    config = _config(base_dir / "bounded.yaml", "4s", "12M")
    stoker = StokerProcess(data_dir, base_dir / "bounded.log", monitor=False,
                           extra_args=["--config", config, "--cache-size", "16M"])
    start(stoker)
    client = Client(stoker.address)
    try:
        assert not leftover.exists(), "partial uploads of an earlier run survive a start"
        blobs = [os.urandom(MiB) for _ in range(10)]
        client.upload(blobs)
        digests = [digest_of(b) for b in blobs]
        assert client.missing(digests) == set()

        # 10 MiB of partial uploads: the cache keeps cached + partial within its 16 MiB, so
        # at most 6 of the 1 MiB blobs stay (fewer if eviction ran as the uploads grew).
        partial = []
        for _ in range(5):
            data = os.urandom(4 * MiB)
            resource, err = _abandon(client, data, 2 * MiB)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            partial.append(resource)
        deadline = time.monotonic() + 10
        while len(client.missing(digests)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(client.missing(digests)) >= 4, "partial uploads were not counted"

        # One client may hold 12 MiB: a write past that is refused, naming the limit, and
        # its bytes are deleted at once.
        data = os.urandom(4 * MiB)
        resource, err = _abandon(client, data, 4 * MiB)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "upload_client_max_bytes" in err.details()
        assert _committed(client, resource) == 0
        assert _committed(client, partial[0]) == 2 * MiB

        # Once the idle ones expire, the whole budget is the cache's again.
        deadline = time.monotonic() + 10
        while _committed(client, partial[-1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [_committed(client, r) for r in partial] == [0] * 5
        client.upload(blobs)
        assert client.missing(digests) == set()
        for data in blobs:
            assert client.bs_read(blob_resource(digest_of(data))) == data
    finally:
        client.close()
        assert stoker.stop() == 0, stoker.log_tail()


def test_a_zstd_bomb_cannot_pass_the_limits(stoker_factory, tmp_path):
    """A few KiB of zstd can declare and decompress to hundreds of MiB: the limits hold as
    the bytes land, not after the message."""
    import zstandard

    stoker = start(stoker_factory("zbomb", extra_args=["--cache-size", "8M"]))
    client = Client(stoker.address)
    try:
        data = b"\0" * (64 << 20)
        frame = zstandard.ZstdCompressor(level=19).compress(data)
        assert len(frame) < (64 << 10)
        d = digest_of(data)
        resource = blob_resource(d, compressed=True, upload=str(uuid.uuid4()))
        with pytest.raises(grpc.RpcError) as err:
            client.bs_write(resource, [frame])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        uploads = stoker.data_dir / "uploads"
        assert sum(p.stat().st_size for p in uploads.iterdir() if p.is_file()) <= 8 << 20
        assert client.missing([d])  # nothing published
    finally:
        client.close()


def test_a_silent_write_stream_is_dropped_after_the_idle_expiry(stoker_factory, tmp_path):
    config = tmp_path / "executor.yaml"
    config.write_text("executor:\n  upload_idle_expiry: 2s\n")
    stoker = start(stoker_factory("silent", extra_args=["--config", str(config)]))
    client = Client(stoker.address)
    try:
        data = os.urandom(3 << 20)
        d = digest_of(data)
        resource = blob_resource(d, upload=str(uuid.uuid4()))

        def requests():
            yield bs_pb2.WriteRequest(resource_name=resource, write_offset=0,
                                      data=data[:1 << 20])
            time.sleep(6)  # silent, stream still open

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.bs.Write(requests(), timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert "upload_idle_expiry" in err.value.details()
        assert time.monotonic() - t0 < 15
    finally:
        client.close()
