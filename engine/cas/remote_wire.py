"""What a REAPI CAS client needs that is independent of the gRPC flavour (sync or asyncio):
the server's capabilities, ByteStream resource names, hand-encoded WriteRequest frames,
batch planning by serialized size, and the errors that name the blobs that failed.

engine/cas/remote.py (sync, the BlobStore protocol) and engine/cas/uploader.py (grpc.aio,
the worker's upload path) are the two transports over this module.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import zstandard

from engine import digest as dg
from engine import native
from engine.digest import Digest
from engine.proto import re_pb2

# Blob bytes per ByteStream message: 1 MiB keeps gRPC's per-message cost small and stays
# far below every server's message limit.
CHUNK_SIZE = 1 << 20
FIND_MISSING_BATCH = 10_000  # digests per FindMissingBlobs (Buildbarn flushes at this count)
# gRPC's default receive limit: what a server that advertises no batch limit still enforces.
DEFAULT_MESSAGE_LIMIT = 4 << 20
MIN_HEADROOM = 4 << 10
# A sample whose zstd level-1 output is above this fraction of its size is not compressed.
COMPRESS_SAMPLE = 128 << 10
COMPRESS_MAX_RATIO = 0.9

COMPRESSOR_NAMES = {re_pb2.Compressor.ZSTD: "zstd"}
SUPPORTED_COMPRESSORS = frozenset(COMPRESSOR_NAMES.values())
COMPRESS_MODES = ("auto", "always", "never")

# What an upload item's content comes from: a file path, or the bytes themselves.
Source = str | os.PathLike | bytes | bytearray | memoryview


# ---- errors ---------------------------------------------------------------------------


class RemoteCasError(Exception):
    """A CAS call failed as a whole (not one blob of it)."""


@dataclass(frozen=True)
class BlobFailure:
    digest: Digest
    reason: str
    source: str = ""  # the file the blob came from, if any

    def __str__(self) -> str:
        where = f" (from {self.source})" if self.source else ""
        return f"{self.digest}{where}: {self.reason}"


class UploadError(RemoteCasError):
    """Some blobs did not reach the CAS; .failures names each one and why."""

    def __init__(self, failures: list[BlobFailure], total: int):
        self.failures = failures
        shown = "; ".join(str(f) for f in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {total} blob(s) failed to upload: {shown}{more}")


def source_name(source: Source) -> str:
    return "" if isinstance(source, bytes | bytearray | memoryview) else os.fspath(source)


def rpc_reason(err: BaseException) -> str:
    """A short 'CODE: details' for a grpc error (sync or aio), or the exception text."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # noqa: BLE001 - a call object without a status yet
            pass
    return f"{type(err).__name__}: {err}"


# ---- capabilities -------------------------------------------------------------------------


@dataclass(frozen=True)
class CasCapabilities:
    max_batch_total_size_bytes: int  # as advertised; 0 = no limit advertised
    digest_functions: frozenset[str]  # the ones both sides support
    compressors: frozenset[str]  # ByteStream compressors both sides support
    max_cas_blob_size_bytes: int  # 0 = no limit

    @classmethod
    def from_proto(cls, caps: re_pb2.ServerCapabilities) -> CasCapabilities:
        cache = caps.cache_capabilities
        # A server from before digest_functions existed supports SHA-256 only.
        functions = {dg.FUNCTION_BY_ENUM[v] for v in cache.digest_functions
                     if v in dg.FUNCTION_BY_ENUM} or {dg.SHA256}
        compressors = {COMPRESSOR_NAMES[c] for c in cache.supported_compressors
                       if c in COMPRESSOR_NAMES}
        return cls(cache.max_batch_total_size_bytes, frozenset(functions),
                   frozenset(compressors), cache.max_cas_blob_size_bytes)

    def check_function(self, function: str) -> None:
        if function not in self.digest_functions:
            raise RemoteCasError(f"the remote CAS does not support digest function "
                                 f"{function!r} (it offers {sorted(self.digest_functions)})")

    def batch_budget(self, max_batch_bytes: int | None) -> int:
        """The most serialized BatchUpdateBlobsRequest bytes to send.

        max_batch_total_size_bytes is read as the serialized request size (remote-apis#344),
        the stricter reading, with headroom below it; max_batch_bytes may lower it further.
        """
        limit = self.max_batch_total_size_bytes or DEFAULT_MESSAGE_LIMIT
        budget = limit - max(MIN_HEADROOM, limit // 64)
        if max_batch_bytes is not None:
            if max_batch_bytes <= 0:
                raise ValueError(f"max_batch_bytes must be positive, got {max_batch_bytes}")
            budget = min(budget, max_batch_bytes)
        return budget


def choose_compressors(wanted: Iterable[str] | None) -> frozenset[str]:
    """The compressors the client may use: None = all it implements."""
    if wanted is None:
        return SUPPORTED_COMPRESSORS
    wanted = frozenset(wanted)
    unknown = wanted - SUPPORTED_COMPRESSORS
    if unknown:
        raise ValueError(f"compressors: {sorted(unknown)} not supported "
                         f"(known: {sorted(SUPPORTED_COMPRESSORS)})")
    return wanted


def check_compress_mode(mode: str) -> str:
    if mode not in COMPRESS_MODES:
        raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {mode!r}")
    return mode


def function_enum(function: str) -> re_pb2.DigestFunction.Value:
    # The number is the enum's value; the stubs type enum fields by their own int subclass.
    return cast("re_pb2.DigestFunction.Value", dg.ENUM_BY_FUNCTION[function])


def digest_pb(d: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


# ---- resource names -----------------------------------------------------------------------


def _blob_path(d: Digest, compressor: str | None) -> str:
    kind = f"compressed-blobs/{compressor}" if compressor else "blobs"
    # SHA-256 is inferred from the hash length; BLAKE3 must name itself.
    fn = "" if d.function == dg.SHA256 else f"{d.function}/"
    return f"{kind}/{fn}{d.hash}/{d.size}"


def _prefixed(instance: str, rest: str) -> str:
    return f"{instance}/{rest}" if instance else rest


def upload_resource(instance: str, d: Digest, compressor: str | None = None) -> str:
    return _prefixed(instance, f"uploads/{uuid.uuid4()}/{_blob_path(d, compressor)}")


def read_resource(instance: str, d: Digest, compressor: str | None = None) -> str:
    return _prefixed(instance, _blob_path(d, compressor))


# ---- WriteRequest frames --------------------------------------------------------------------
# WriteRequest is encoded by hand: a protobuf bytes field only takes bytes, so building the
# message would copy every chunk twice (into the message, then out of it); joining a few
# header bytes with the mmap'd slice copies it once. Field order is the canonical tag order.

_RESOURCE_TAG = b"\x0a"  # 1: resource_name
_OFFSET_TAG = b"\x10"  # 2: write_offset
_FINISH = b"\x18\x01"  # 3: finish_write = true
_DATA_TAG = b"\x52"  # 10: data


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_frame(data, offset: int, resource: str = "", finish: bool = False) -> bytes:
    """One serialized WriteRequest carrying data (any buffer) at offset."""
    parts: list = []
    if resource:
        name = resource.encode()
        parts += (_RESOURCE_TAG, varint(len(name)), name)
    if offset:
        parts += (_OFFSET_TAG, varint(offset))
    if finish:
        parts.append(_FINISH)
    if len(data):
        parts += (_DATA_TAG, varint(len(data)), data)
    return b"".join(parts)


def file_chunks(source: Source, chunk_size: int):
    """Read-only memoryview slices of a file (mapped, not copied) or of a bytes source; the
    reader has .size. The native core does the mapping when it is built."""
    if isinstance(source, bytes | bytearray | memoryview):
        return _BufferChunks(source, chunk_size)
    return native.chunks(source, chunk_size)


class _BufferChunks:
    def __init__(self, data, chunk_size: int):
        self._view = memoryview(data).cast("B")
        self.size = self._view.nbytes
        self._chunk = chunk_size

    def __iter__(self) -> Iterator[memoryview]:
        for start in range(0, self.size, self._chunk):
            yield self._view[start:start + self._chunk]


def worth_compressing(first: memoryview | bytes) -> bool:
    """Whether zstd level 1 shrinks a sample of the blob enough to pay for itself."""
    sample = first[:COMPRESS_SAMPLE]
    if not len(sample):
        return False
    out = zstandard.ZstdCompressor(level=1).compress(sample)
    return len(out) <= COMPRESS_MAX_RATIO * len(sample)


def plain_frames(resource: str, reader, chunk_size: int) -> Iterator[bytes]:
    """The WriteRequests of an uncompressed upload of reader's bytes."""
    size = reader.size
    offset = 0
    for piece in reader:
        end = offset + len(piece)
        yield write_frame(piece, offset, resource if offset == 0 else "", end == size)
        offset = end


def zstd_frames(resource: str, reader, chunk_size: int, level: int = 1) -> Iterator[bytes]:
    """The WriteRequests of a compressed-blobs/zstd upload. write_offset counts compressed
    bytes; the last frame carries finish_write, so one frame is held back."""
    chunker = zstandard.ZstdCompressor(level=level).chunker(size=reader.size,
                                                            chunk_size=chunk_size)
    offset = 0
    held: bytes | None = None

    def outputs() -> Iterator[bytes]:
        for piece in reader:
            yield from chunker.compress(piece)
        yield from chunker.finish()

    for out in outputs():
        if held is not None:
            yield write_frame(held, offset, resource if offset == 0 else "")
            offset += len(held)
        held = out
    yield write_frame(held or b"", offset, resource if offset == 0 else "", True)


def frames_for(resource: str, reader, chunk_size: int, compressor: str | None) -> Iterator[bytes]:
    if compressor == "zstd":
        return zstd_frames(resource, reader, chunk_size)
    return plain_frames(resource, reader, chunk_size)


def committed_ok(d: Digest, compressor: str | None, committed: int) -> bool:
    """Whether a finished Write's committed_size means the blob is stored. A compressed
    upload that someone else completed first reports -1."""
    if compressor:
        return committed == -1 or committed > 0
    return committed == d.size


# ---- batch planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    digest: Digest
    source: Source


def _field_size(n: int) -> int:
    """Bytes of a length-delimited field of n bytes with a one-byte tag."""
    return 1 + len(varint(n)) + n


def batch_entry_size(d: Digest) -> int:
    """Serialized bytes one blob adds to a BatchUpdateBlobsRequest (the Request message and
    its field framing), measured with ByteSize() for the digest part."""
    inner = re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_pb(d)).ByteSize()
    if d.size:
        inner += _field_size(d.size)
    return _field_size(inner)


def batch_base_size(instance: str, function: str) -> int:
    return re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, digest_function=function_enum(function)).ByteSize()


@dataclass
class Plan:
    batches: list[list[Item]] = field(default_factory=list)  # each fits the budget
    streams: list[Item] = field(default_factory=list)  # too big for a batch: ByteStream


def plan(items: Iterable[Item], instance: str, function: str, budget: int) -> Plan:
    """Pack items (of one digest function) into batches whose serialized request stays
    within budget bytes; what cannot fit a batch on its own goes to ByteStream."""
    out = Plan()
    base = batch_base_size(instance, function)
    batch: list[Item] = []
    used = base
    for item in items:
        size = batch_entry_size(item.digest)
        if base + size > budget:
            out.streams.append(item)
            continue
        if used + size > budget:
            out.batches.append(batch)
            batch, used = [], base
        batch.append(item)
        used += size
    if batch:
        out.batches.append(batch)
    return out


def read_source(item: Item) -> bytes:
    """A small item's content as bytes; OSError or ValueError when it is not as declared."""
    src = item.source
    if isinstance(src, bytes):
        data = src
    elif isinstance(src, bytearray | memoryview):
        data = bytes(src)
    else:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, item.digest.size + 1)  # one byte more reveals a grown file
        finally:
            os.close(fd)
    if len(data) != item.digest.size:
        raise ValueError(f"source has {len(data)} bytes but the digest says "
                         f"{item.digest.size}")
    return data


# BatchUpdateBlobsRequest is encoded by hand too: building the message copies each blob in,
# serializing copies it out again, and for 10,000 small files that was as slow as reading
# them. The encoding is the canonical one (tests/cas/test_remote.py compares with protobuf).
_REQUEST_TAG = b"\x12"  # BatchUpdateBlobsRequest 2: requests; Request 2: data
_FUNCTION_TAG = b"\x28"  # BatchUpdateBlobsRequest 5: digest_function


def _digest_bytes(d: Digest) -> bytes:
    """A serialized Digest: 1 hash (64 hex), 2 size_bytes (left out when 0)."""
    h = d.hash.encode()
    out = b"\x0a" + varint(len(h)) + h
    return out + b"\x10" + varint(d.size) if d.size else out


def encode_batch(instance: str, function: str, entries: list[tuple[Digest, bytes]],
                 budget: int) -> bytes:
    """A serialized BatchUpdateBlobsRequest of entries (digest, content), no larger than
    budget bytes; plan() sized the batch, this checks it."""
    parts: list[bytes] = []
    if instance:
        name = instance.encode()
        parts += (_RESOURCE_TAG, varint(len(name)), name)
    for d, data in entries:
        digest = _digest_bytes(d)
        inner = 1 + len(varint(len(digest))) + len(digest)
        if data:
            inner += _field_size(len(data))
        parts += (_REQUEST_TAG, varint(inner), b"\x0a", varint(len(digest)), digest)
        if data:
            parts += (_REQUEST_TAG, varint(len(data)), data)
    enum = function_enum(function)
    if enum:
        parts += (_FUNCTION_TAG, varint(enum))
    request = b"".join(parts)
    if len(request) > budget:  # plan() guarantees this; the check costs nothing
        raise AssertionError(f"batch of {len(request)} serialized bytes exceeds the "
                             f"{budget} budget")
    return request


def batch_failures(response: re_pb2.BatchUpdateBlobsResponse,
                   items: list[Item]) -> list[BlobFailure]:
    """The blobs of a batch the server did not store, each with its status."""
    status = {}
    for r in response.responses:
        status[(r.digest.hash, r.digest.size_bytes)] = r.status
    failures = []
    for item in items:
        d = item.digest
        s = status.get((d.hash, d.size))
        if s is None:
            failures.append(BlobFailure(d, "the server returned no status for it",
                                        source_name(item.source)))
        elif s.code != 0:
            failures.append(BlobFailure(d, f"status {s.code}: {s.message}",
                                        source_name(item.source)))
    return failures


def unique_items(items: Iterable[tuple[Digest, Source]]) -> dict[Digest, Item]:
    """One item per digest, the empty blob left out (every server has it)."""
    out: dict[Digest, Item] = {}
    for d, src in items:
        if not isinstance(d, Digest):
            raise TypeError(f"upload items are (Digest, source) pairs, got {type(d).__name__}")
        if d.size and d not in out:
            out[d] = Item(d, src)
    return out


# ---- one upload, either transport ----------------------------------------------------------


@dataclass
class UploadStats:
    blobs: int = 0  # distinct non-empty blobs asked for
    missing: int = 0  # of those, what the CAS lacked and was sent
    batches: int = 0  # BatchUpdateBlobs calls
    streams: int = 0  # ByteStream Writes
    compressed_streams: int = 0  # of those, compressed-blobs/zstd
    bytes: int = 0  # uncompressed bytes sent

    def add(self, other: UploadStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _sample(source: Source) -> bytes | memoryview:
    if isinstance(source, bytes | bytearray | memoryview):
        return memoryview(source).cast("B")[:COMPRESS_SAMPLE]
    with open(source, "rb") as f:
        return f.read(COMPRESS_SAMPLE)


@dataclass
class Stream:
    """A ByteStream upload ready to send: its resource name and its serialized frames."""

    item: Item
    compressor: str | None
    frames: Iterator[bytes]


def open_stream(item: Item, instance: str, chunk_size: int, compressors: frozenset[str],
                mode: str) -> Stream:
    """Map the source and choose the encoding; OSError or ValueError if the source is not
    what the digest declares."""
    reader = file_chunks(item.source, chunk_size)
    if reader.size != item.digest.size:
        raise ValueError(f"source has {reader.size} bytes but the digest says "
                         f"{item.digest.size}")
    compressor = None
    if "zstd" in compressors and mode != "never" and (
            mode == "always" or worth_compressing(_sample(item.source))):
        compressor = "zstd"
    resource = upload_resource(instance, item.digest, compressor)
    return Stream(item, compressor, frames_for(resource, reader, chunk_size, compressor))


def too_big(item: Item, caps: CasCapabilities) -> BlobFailure | None:
    limit = caps.max_cas_blob_size_bytes
    if limit and item.digest.size > limit:
        return BlobFailure(item.digest, f"larger than the server's max_cas_blob_size_bytes "
                                        f"{limit}", source_name(item.source))
    return None


def by_function(items: Iterable[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for item in items:
        out.setdefault(item.digest.function, []).append(item)
    return out


def find_missing_requests(instance: str, digests: Iterable[Digest]
                          ) -> Iterator[tuple[re_pb2.FindMissingBlobsRequest, dict]]:
    """FindMissingBlobs requests of at most FIND_MISSING_BATCH digests, one digest function
    each, with a map from (hash, size) back to the Digest."""
    for function, group in by_function(Item(d, b"") for d in digests).items():
        for start in range(0, len(group), FIND_MISSING_BATCH):
            part = [i.digest for i in group[start:start + FIND_MISSING_BATCH]]
            yield (re_pb2.FindMissingBlobsRequest(
                instance_name=instance, blob_digests=[digest_pb(d) for d in part],
                digest_function=function_enum(function)),
                {(d.hash, d.size): d for d in part})


def stream_timeout(timeout: float, size: int) -> float:
    # Slower than 1 MB/s counts as a hung server.
    return timeout + size / 1e6


@dataclass
class Work:
    """What one upload sends, once FindMissingBlobs answered."""

    batches: list[tuple[str, list[Item]]] = field(default_factory=list)  # (function, items)
    streams: list[Item] = field(default_factory=list)
    failures: list[BlobFailure] = field(default_factory=list)  # refused before sending


def plan_upload(missing: list[Item], caps: CasCapabilities, instance: str, budget: int,
                stats: UploadStats) -> Work:
    work = Work()
    for fn, group in by_function(missing).items():
        ok = []
        for item in group:
            failure = too_big(item, caps)
            if failure:
                work.failures.append(failure)
            else:
                ok.append(item)
        p = plan(ok, instance, fn, budget)
        work.batches += [(fn, batch) for batch in p.batches]
        work.streams += p.streams
    work.streams.sort(key=lambda i: -i.digest.size)  # longest first keeps the calls busy
    stats.missing = len(missing)
    stats.batches = len(work.batches)
    stats.streams = len(work.streams)
    stats.bytes = sum(i.digest.size for i in missing)
    return work


def read_batch(items: list[Item]) -> tuple[list[tuple[Digest, bytes]], list[Item],
                                           list[BlobFailure]]:
    """The contents of a batch's items: (entries, the items read, failures of the rest)."""
    entries, read, failures = [], [], []
    for item in items:
        try:
            entries.append((item.digest, read_source(item)))
            read.append(item)
        except (OSError, ValueError) as e:
            failures.append(BlobFailure(item.digest, str(e), source_name(item.source)))
    return entries, read, failures
