"""RemoteCasClient: the scheduler's CAS as a joined worker's pipeline sees it
(engine/pipeline/storage.py RemoteCas): inputs down into the shared local CAS with the
RemoteFetcher, outputs up from it with the AsyncUploader (FindMissingBlobs first).

One fetcher and one uploader per instance name and digest function, made on first use: a
scheduler may hand out tasks of several instances, and capabilities are asked once each.
"""

from __future__ import annotations

import grpc

from engine import transport
from engine.cas.fetcher import FetchStats, RemoteFetcher
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote_wire import UploadStats
from engine.cas.uploader import AsyncUploader
from engine.digest import Digest

Metadata = tuple[tuple[str, str | bytes], ...]


class RemoteCasClient:
    def __init__(self, channel: grpc.aio.Channel, store: LocalDiskStore, *,
                 timeout_s: float = 60.0):
        self._channel = channel
        self._store = store
        self._timeout_s = timeout_s  # executor.fetch_timeout
        self._fetchers: dict[str, RemoteFetcher] = {}
        self._uploaders: dict[tuple[str, str], AsyncUploader] = {}

    def _fetcher(self, instance_name: str) -> RemoteFetcher:
        fetcher = self._fetchers.get(instance_name)
        if fetcher is None:
            fetcher = self._fetchers[instance_name] = RemoteFetcher(
                self._channel, self._store, instance_name, timeout=self._timeout_s)
        return fetcher

    async def fetch_tree(self, instance_name: str, function: str, root: Digest,
                         metadata: Metadata = ()) -> None:
        await self._fetcher(instance_name).fetch_tree(function, root, metadata)

    async def fetch_blobs(self, instance_name: str, function: str, digests: list[Digest],
                          metadata: Metadata = ()) -> FetchStats:
        return await self._fetcher(instance_name).fetch_blobs(function, digests, metadata)

    async def upload(self, instance_name: str, function: str, digests: list[Digest],
                     metadata: Metadata = ()) -> UploadStats:
        items = [(d, self._store.blob_path(d)) for d in dict.fromkeys(digests) if d.size]
        if not items:  # a no-op's empty stdout and stderr: nothing to ask about
            return UploadStats()
        uploader = self._uploaders.get((instance_name, function))
        if uploader is None:
            uploader = self._uploaders[(instance_name, function)] = AsyncUploader(
                self._channel, instance_name, function)
        with transport.task_metadata(metadata):  # the uploader's calls carry the task's
            return await uploader.upload(items)

    def close(self) -> None:
        for fetcher in self._fetchers.values():
            fetcher.close()
