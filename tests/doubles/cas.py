"""The CAS side of a scheduler double: Stoker's own ContentAddressableStorage, ByteStream and
Capabilities servicers over a LocalDiskStore in the double's directory, plus direct access for
the test (inputs in, outputs out) without going through gRPC.

    cas = CasDouble(tmp / "cas")
    cas.add_to(server)                      # before server.start(); again after a restart
    action, digest = cas.action(command, {"in.txt": b"hi"}, timeout_s=30)
    ...
    cas.outputs(response.result)            # {"out/a.txt": b"...", ...}
    cas.action_cache.entries                # what workers put in the ActionCache
    cas.close()
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import grpc
from google.protobuf.message import Message

from engine import digest as dg
from engine.cas.local_disk import LocalDiskStore
from engine.proto import bs_grpc, re_grpc, re_pb2
from engine.server.bytestream_service import ByteStreamService
from engine.server.capabilities_service import CapabilitiesService
from engine.server.cas_service import CasService
from tests.integration.support import TreeSpec, build_tree


class ActionCacheDouble(re_grpc.ActionCacheServicer):
    """An ActionCache that keeps what it is given by (instance name, digest function, action
    digest), as bb-storage's keys it, and when (for checks of who wrote what, and in which
    order)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int, str], re_pb2.ActionResult] = {}
        self.writes: list[tuple[float, str, int, str]] = []

    async def GetActionResult(self, request, context):
        found = self.entries.get((request.instance_name, request.digest_function,
                                  f"{request.action_digest.hash}/"
                                  f"{request.action_digest.size_bytes}"))
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such action result")
        return found

    async def UpdateActionResult(self, request, context):
        key = (request.instance_name, request.digest_function,
               f"{request.action_digest.hash}/{request.action_digest.size_bytes}")
        self.entries[key] = request.action_result
        self.writes.append((time.time(), *key))
        return request.action_result


class CasDouble:
    def __init__(self, root: Path | str, *, function: str = dg.SHA256):
        self.root = Path(root)
        self.function = function
        self.store = LocalDiskStore(str(self.root / "blobs"), 0)
        self.action_cache = ActionCacheDouble()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serves the CAS on `server` (call for each new server, e.g. after a restart)."""
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), server)
        re_grpc.add_ActionCacheServicer_to_server(self.action_cache, server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(self.store), server)
        bs_grpc.add_ByteStreamServicer_to_server(
            ByteStreamService(self.store, str(self.root / "uploads"), client_max_bytes=1 << 30),
            server)

    def close(self) -> None:
        self.store.close()

    # ---- blobs -------------------------------------------------------------------------

    def _digest(self, d: re_pb2.Digest, function: str | None) -> dg.Digest:
        return dg.from_proto(function or self.function, d)

    def put(self, data: bytes, function: str | None = None) -> re_pb2.Digest:
        d = dg.of_bytes(function or self.function, data)
        self.store.write_bytes(d, data)
        return re_pb2.Digest(hash=d.hash, size_bytes=d.size)

    def put_message(self, message: Message, function: str | None = None) -> re_pb2.Digest:
        return self.put(message.SerializeToString(), function)

    def get(self, d: re_pb2.Digest, function: str | None = None) -> bytes:
        return self.store.read_bytes(self._digest(d, function))

    def has(self, d: re_pb2.Digest, function: str | None = None) -> bool:
        return self.store.has(self._digest(d, function))

    # ---- actions -----------------------------------------------------------------------

    def put_tree(self, spec: TreeSpec, function: str | None = None) -> re_pb2.Digest:
        """Every file and Directory of spec (tests/integration/support.py's TreeSpec) into
        the CAS; returns the root Directory's digest."""
        fn = function or self.function
        tree = build_tree(spec, dg.ENUM_BY_FUNCTION[fn])
        for data in tree.blobs.values():
            self.put(data, fn)
        return tree.root

    def action(self, command: re_pb2.Command, inputs: TreeSpec | None = None, *,
               timeout_s: float = 60.0, function: str | None = None,
               do_not_cache: bool = False) -> tuple[re_pb2.Action, re_pb2.Digest]:
        """Command, input root and Action into the CAS: the Action and its digest."""
        fn = function or self.function
        action = re_pb2.Action(command_digest=self.put_message(command, fn),
                               input_root_digest=self.put_tree(inputs or {}, fn),
                               do_not_cache=do_not_cache)
        if command.HasField("platform"):
            action.platform.CopyFrom(command.platform)
        if timeout_s:
            action.timeout.FromTimedelta(timedelta(seconds=timeout_s))
        return action, self.put_message(action, fn)

    def outputs(self, result: re_pb2.ActionResult, function: str | None = None
                ) -> dict[str, bytes]:
        """An ActionResult's output files, and the files of its output directories, by path."""
        files = {f.path: self.get(f.digest, function) for f in result.output_files}
        fn = function or self.function
        for out in result.output_directories:
            tree = re_pb2.Tree.FromString(self.get(out.tree_digest, fn))
            children = {dg.of_bytes(fn, c.SerializeToString()): c for c in tree.children}
            pending = [(tree.root, out.path)]
            while pending:
                directory, prefix = pending.pop()
                for f in directory.files:
                    files[f"{prefix}/{f.name}"] = self.get(f.digest, fn)
                for sub in directory.directories:
                    pending.append((children[self._digest(sub.digest, fn)],
                                    f"{prefix}/{sub.name}"))
        return files
