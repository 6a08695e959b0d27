"""The server's upload paths over real gRPC: ByteStream writes hashed as they arrive (and
written with O_DIRECT from the size the service picks), and BatchUpdateBlobs through
LocalDiskStore.write_many. Only the CAS services run, in this process on their own loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid

import grpc
import pytest
import zstandard

from engine import digest as dg
from engine.cas.local_disk import LocalDiskStore
from engine.proto import bs_grpc, bs_pb2, re_grpc, re_pb2
from engine.server import bytestream_service
from engine.server.bytestream_service import ByteStreamService
from engine.server.cas_service import CasService
from engine.server.decode_guard import DecodeGuard

MiB = 1 << 20


class Server:
    def __init__(self, root: str):
        self.store = LocalDiskStore(os.path.join(root, "cache"))
        self.uploads = os.path.join(root, "uploads")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.bs = bs_grpc.ByteStreamStub(self.channel)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)

    async def _start(self):
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 * MiB)],
                                 interceptors=[DecodeGuard()])
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(self.store), server)
        bs_grpc.add_ByteStreamServicer_to_server(ByteStreamService(self.store, self.uploads),
                                                 server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.channel.close()
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.store.close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    # Small thresholds, so that small test blobs take the direct path with several buffers.
    monkeypatch.setattr(bytestream_service, "DIRECT_MIN_BYTES", 64 << 10)
    monkeypatch.setattr(bytestream_service, "DIRECT_BUFFER", 64 << 10)
    s = Server(str(tmp_path))
    yield s
    s.close()


def pb_digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def resource(d: re_pb2.Digest, compressed: bool = False) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return f"uploads/{uuid.uuid4()}/{kind}/{d.hash}/{d.size_bytes}"


def write(server: Server, name: str, chunks: list[bytes], *, start: int = 0,
          finish: bool = True) -> bs_pb2.WriteResponse:
    reqs = []
    offset = start
    for i, c in enumerate(chunks):
        reqs.append(bs_pb2.WriteRequest(resource_name=name if i == 0 else "",
                                        write_offset=offset, data=c,
                                        finish_write=finish and i == len(chunks) - 1))
        offset += len(c)
    return server.bs.Write(iter(reqs), timeout=30)


def _d(d: re_pb2.Digest) -> dg.Digest:
    return dg.Digest(dg.SHA256, d.hash, d.size_bytes)


def stored(server: Server, d: re_pb2.Digest) -> bytes:
    return server.store.read_bytes(_d(d))


def split(data: bytes, step: int) -> list[bytes]:
    return [data[i:i + step] for i in range(0, len(data), step)]


def test_large_write_lands_intact_and_leaves_no_temp_file(server):
    data = os.urandom(3 * MiB + 4097)  # whole buffers, then an unaligned tail
    d = pb_digest(data)
    assert write(server, resource(d), split(data, 100_003)).committed_size == len(data)
    assert stored(server, d) == data
    assert os.listdir(server.uploads) == []


def test_wrong_content_is_refused_after_the_last_chunk(server):
    data = os.urandom(MiB + 5)
    d = pb_digest(data)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(grpc.RpcError) as e:
        write(server, resource(d), split(bad, 1 << 16))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match digest" in e.value.details()
    assert server.store.find_missing([_d(d)]) == [_d(d)]
    assert os.listdir(server.uploads) == []


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_resumed_write_is_verified_end_to_end(server, corrupt):
    data = os.urandom(MiB + 12_345)
    d = pb_digest(data)
    name = resource(d)
    cut = 300_001  # not a multiple of the page size: the direct buffer had a tail
    with pytest.raises(grpc.RpcError) as e:
        write(server, name, split(data[:cut], 70_000), finish=False)
    assert "finish_write" in e.value.details()
    status = server.bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name),
                                        timeout=10)
    assert status.committed_size == cut
    rest = data[cut:]
    if corrupt:
        rest = bytes([rest[0] ^ 1]) + rest[1:]
        with pytest.raises(grpc.RpcError) as e:
            write(server, name, split(rest, 1 << 18), start=cut)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert server.store.find_missing([_d(d)]) == [_d(d)]
    else:
        assert write(server, name, split(rest, 1 << 18), start=cut).committed_size == \
            len(data)
        assert stored(server, d) == data
    assert os.listdir(server.uploads) == []


def test_zstd_write_through_the_direct_path(server):
    data = os.urandom(4096) * 200  # 800 KiB, compresses well
    d = pb_digest(data)
    compressed = zstandard.ZstdCompressor().compress(data)
    reply = write(server, resource(d, compressed=True), split(compressed, 5000))
    assert reply.committed_size == len(compressed)
    assert stored(server, d) == data


def test_too_much_data_is_refused(server):
    data = os.urandom(200_000)
    d = pb_digest(data[:150_000])
    with pytest.raises(grpc.RpcError) as e:
        write(server, resource(d), split(data, 1 << 16))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more data than the 150000 bytes" in e.value.details()
    assert os.listdir(server.uploads) == []


def test_batch_update_stores_many_and_reports_each(server):
    blobs = [os.urandom(1000 + i) for i in range(300)]
    bad = os.urandom(50)
    requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=pb_digest(b), data=b)
                for b in blobs]
    requests.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=pb_digest(b"x" * 50),
                                                           data=bad))
    requests.append(re_pb2.BatchUpdateBlobsRequest.Request(
        digest=re_pb2.Digest(hash="ab" * 32, size_bytes=9), data=b"short"))
    requests.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=pb_digest(b""), data=b""))
    reply = server.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests),
                                        timeout=30)
    codes = [r.status.code for r in reply.responses]
    assert codes[:300] == [0] * 300 and codes[302] == 0
    assert codes[300] == codes[301] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "requests[300]" in reply.responses[300].status.message
    assert "9" in reply.responses[301].status.message
    assert [r.digest for r in reply.responses] == [r.digest for r in requests]
    for b in blobs:
        assert stored(server, pb_digest(b)) == b
    assert server.store.find_missing([_d(pb_digest(b"x" * 50))]) == [_d(pb_digest(b"x" * 50))]
