"""The upload rate to a CAS, through the uploader the workers use (engine.cas.uploader's
AsyncUploader on a uvloop event loop, 4 calls in flight).

The outputs mirror bench/bench_upload.py's, scaled to the size asked for (equal at the
default 1 GiB): 10,000 files of 1-20 KiB per GiB, and 4 large files that bring the total to
the size. Each repetition changes every file's first bytes, so the server lacks them all and
everything goes over the wire (after FindMissingBlobs, as from a worker). The content is
random, which the uploader's sample check leaves uncompressed: the figure is the raw rate.
Digesting is not timed (a worker has the digests from output collection already), and
pending writeback is flushed before each timed upload.
"""

from __future__ import annotations

import os
import random
import time

from engine.benchmark.scratch import Workspace
from engine.digest import Digest
from engine.pipeline.outputs import digest_files

MiB = 1 << 20
GiB = 1 << 30
LARGE = 4
_HEADER = 32


class UploadUnavailable(Exception):
    """The upload rate cannot be measured in this build; the message says why."""


def _load():
    try:
        import uvloop

        from engine.cas.uploader import AsyncUploader
    except ImportError as e:
        raise UploadUnavailable(f"not measured: Stoker's uploader (engine.cas.uploader) "
                                f"cannot be loaded: {e}") from None
    return uvloop, AsyncUploader


class UploadSet:
    """A build's worth of outputs to upload, renewed before each repetition."""

    def __init__(self, ws: Workspace, scale_bytes: int):
        self.small = max(10, 10_000 * scale_bytes // GiB)
        small_dir = ws.path("upload-small")
        os.makedirs(small_dir, exist_ok=True)
        rng = random.Random(1985)
        small_paths, small_bytes = [], 0
        for i in range(self.small):
            path = os.path.join(small_dir, f"out-{i}.o")
            size = rng.randint(1024, 20 * 1024)
            with open(path, "wb") as f:
                f.write(os.urandom(size))
            small_paths.append(path)
            small_bytes += size
        # Whole MiB, rounded up: 231 MiB at 1 GiB, as bench/bench_upload.py has it.
        self.large_size = max(MiB, -(-(scale_bytes - small_bytes) // LARGE // MiB) * MiB)
        self.paths = [ws.big_file(self.large_size, name=f"upload{i}") for i in range(LARGE)]
        self.paths += small_paths
        self.bytes = sum(os.path.getsize(p) for p in self.paths)

    @property
    def label(self) -> str:
        return (f"{LARGE} x {self.large_size // MiB} MiB + {self.small:,} files of 1-20 KiB = "
                f"{self.bytes / GiB:.2f} GiB")

    def renew(self) -> list[tuple[Digest, str]]:
        """Give every file content no CAS has seen; (digest, path) of each, SHA-256."""
        return renew(self.paths)


def renew(paths: list[str], function: str = "sha256") -> list[tuple[Digest, str]]:
    """Overwrite the first bytes of every file with random ones, so no CAS has them, and
    return (digest, path) of each. bench/bench_upload.py renews its outputs the same way."""
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, os.urandom(_HEADER), 0)
        finally:
            os.close(fd)
    return list(zip(digest_files(function, paths), paths, strict=True))


def upload_seconds(target: str, items: list[tuple[Digest, str]]) -> float:
    """Seconds to upload items (digest, path) to the CAS at target (host:port), through
    FindMissingBlobs and the writes; every item must be missing there."""
    uvloop, AsyncUploader = _load()
    import grpc

    expected = sum(d.size for d, _ in items)
    os.sync()  # the previous repetition's blobs are not written back during this one

    async def go() -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            uploader = AsyncUploader(channel, function=items[0][0].function)
            await uploader.capabilities()  # the connection is set up before timing
            t0 = time.perf_counter()
            stats = await uploader.upload(items)
            elapsed = time.perf_counter() - t0
        if stats.missing != len(items) or stats.bytes != expected:
            raise RuntimeError(f"the upload sent {stats.missing} blob(s), {stats.bytes} bytes; "
                               f"expected {len(items)} of {expected} bytes in all (were some "
                               "present already?)")
        return elapsed

    return uvloop.run(go())
