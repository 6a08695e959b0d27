"""Wire compatibility of our protos with upstream REAPI, ByteStream, Remote Workers,
BuildBuddy's scheduler protocol and Buildbarn's remoteworker.

The byte strings here are encoded by hand from the upstream field numbers, so a
renumbered field in protos/ fails a test even though our own code would still
round-trip with itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, field_mask_pb2, unknown_fields

from engine.proto import (
    bbcas_pb2,
    bots_grpc,
    bots_pb2,
    bs_grpc,
    bs_pb2,
    code_pb2,
    error_details_pb2,
    operations_grpc,
    operations_pb2,
    re_grpc,
    re_pb2,
    rw_grpc,
    rw_pb2,
    sched_grpc,
    sched_pb2,
    semver_pb2,
    status_pb2,
    worker_pb2,
)

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------- encoding


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vint(field: int, value: int) -> bytes:
    """Wire type 0 (varint): ints, bools, enums."""
    return varint(field << 3) + varint(value)


def ld(field: int, payload: bytes | str) -> bytes:
    """Wire type 2 (length-delimited): strings, bytes, messages, packed repeats."""
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def packed(field: int, values: list[int]) -> bytes:
    return ld(field, b"".join(varint(v) for v in values))


def digest(h: str, size: int) -> bytes:
    return ld(1, h) + vint(2, size)


HASH_A = "a" * 64
HASH_B = "b" * 64
HASH_C = "c" * 64


def decode(cls, data: bytes):
    """Parse and insist every field was known to our schema."""
    msg = cls.FromString(data)
    assert len(unknown_fields.UnknownFieldSet(msg)) == 0, f"{cls.__name__}: unknown fields"
    return msg


def set_fields(msg) -> set[str]:
    return {field.name for field, _ in msg.ListFields()}


# ------------------------------------------------------------ method names

SERVED_METHODS = [
    ("/build.bazel.remote.execution.v2.Execution/Execute", False, True),
    ("/build.bazel.remote.execution.v2.Execution/WaitExecution", False, True),
    ("/build.bazel.remote.execution.v2.ActionCache/GetActionResult", False, False),
    ("/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult", False, False),
    ("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs", False, False),
    ("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs", False, False),
    ("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs", False, False),
    ("/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree", False, True),
    ("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", False, False),
    ("/google.bytestream.ByteStream/Read", False, True),
    ("/google.bytestream.ByteStream/Write", True, False),
    ("/google.bytestream.ByteStream/QueryWriteStatus", False, False),
    ("/google.devtools.remoteworkers.v1test2.Bots/CreateBotSession", False, False),
    ("/google.devtools.remoteworkers.v1test2.Bots/UpdateBotSession", False, False),
    ("/google.longrunning.Operations/GetOperation", False, False),
    ("/google.longrunning.Operations/CancelOperation", False, False),
]

# Called by Stoker on a BuildBuddy or Buildbarn scheduler.
CALLED_METHODS = [
    ("/scheduler.Scheduler/RegisterAndStreamWork", True, True),
    ("/scheduler.Scheduler/LeaseTask", True, True),
    ("/scheduler.Scheduler/TaskExists", False, False),
    ("/scheduler.Scheduler/ReEnqueueTask", False, False),
    ("/build.bazel.remote.execution.v2.Execution/PublishOperation", True, False),
    ("/buildbarn.remoteworker.OperationQueue/Synchronize", False, False),
]

MODULE_OF_PACKAGE = {
    "build.bazel.remote.execution.v2": re_pb2,
    "google.bytestream": bs_pb2,
    "google.devtools.remoteworkers.v1test2": bots_pb2,
    "google.longrunning": operations_pb2,
    "scheduler": sched_pb2,
    "buildbarn.remoteworker": rw_pb2,
}


@pytest.mark.parametrize("path,client_streams,server_streams", SERVED_METHODS + CALLED_METHODS)
def test_method_full_name_and_streaming(path: str, client_streams: bool, server_streams: bool):
    match = re.fullmatch(r"/(.+)\.(\w+)/(\w+)", path)
    assert match, path
    package, service, method = match.groups()
    module = MODULE_OF_PACKAGE[package]
    descriptor = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert f"/{descriptor.containing_service.full_name}/{descriptor.name}" == path
    assert descriptor.client_streaming is client_streams
    assert descriptor.server_streaming is server_streams


def test_execute_streams_longrunning_operations():
    method = re_pb2.DESCRIPTOR.services_by_name["Execution"].methods_by_name["Execute"]
    assert method.input_type.full_name == "build.bazel.remote.execution.v2.ExecuteRequest"
    assert method.output_type.full_name == "google.longrunning.Operation"
    # Same descriptor object as googleapis-common-protos' Operation: one pool, no copy.
    assert method.output_type is operations_pb2.Operation.DESCRIPTOR


def test_descriptor_file_names_match_upstream_paths():
    # Reflection and any peer that resolves imports by file name see upstream names.
    assert re_pb2.DESCRIPTOR.name == "build/bazel/remote/execution/v2/remote_execution.proto"
    assert semver_pb2.DESCRIPTOR.name == "build/bazel/semver/semver.proto"
    assert bs_pb2.DESCRIPTOR.name == "google/bytestream/bytestream.proto"
    assert bots_pb2.DESCRIPTOR.name == "google/devtools/remoteworkers/v1test2/bots.proto"
    assert worker_pb2.DESCRIPTOR.name == "google/devtools/remoteworkers/v1test2/worker.proto"
    deps = {d.name for d in re_pb2.DESCRIPTOR.dependencies}
    assert "google/longrunning/operations.proto" in deps
    assert "google/rpc/status.proto" in deps


def test_buildbarn_historical_execute_response_numbers():
    """bb-remote-execution pkg/proto/cas/cas.proto: what a worker stores for an outcome it
    does not cache; field 2 stays reserved."""
    message = bbcas_pb2.HistoricalExecuteResponse.DESCRIPTOR
    assert message.full_name == "buildbarn.cas.HistoricalExecuteResponse"
    assert {f.name: f.number for f in message.fields} == {"action_digest": 1,
                                                          "execute_response": 3}
    assert message.fields_by_name["execute_response"].message_type is \
        re_pb2.ExecuteResponse.DESCRIPTOR


def test_scheduler_protocol_types():
    def method(module, service: str, name: str):
        return module.DESCRIPTOR.services_by_name[service].methods_by_name[name]

    publish = method(re_pb2, "Execution", "PublishOperation")
    assert publish.input_type is operations_pb2.Operation.DESCRIPTOR
    assert publish.output_type.full_name == (
        "build.bazel.remote.execution.v2.PublishOperationResponse"
    )
    lease = method(sched_pb2, "Scheduler", "LeaseTask")
    assert lease.input_type.full_name == "scheduler.LeaseTaskRequest"
    assert lease.output_type.full_name == "scheduler.LeaseTaskResponse"
    sync = method(rw_pb2, "OperationQueue", "Synchronize")
    assert sync.input_type.full_name == "buildbarn.remoteworker.SynchronizeRequest"
    assert sync.output_type.full_name == "buildbarn.remoteworker.SynchronizeResponse"
    # Only package names reach the wire; our file paths need not be upstream's
    # (BuildBuddy: proto/scheduler.proto; Buildbarn: pkg/proto/remoteworker/...).
    assert sched_pb2.DESCRIPTOR.name == "scheduler/scheduler.proto"
    assert rw_pb2.DESCRIPTOR.name == "buildbarn/remoteworker/remoteworker.proto"
    assert "google/rpc/status.proto" in {d.name for d in sched_pb2.DESCRIPTOR.dependencies}
    # Buildbarn's messages embed our REAPI types: one descriptor pool, no copies.
    executing = rw_pb2.DesiredState.Executing.DESCRIPTOR
    assert executing.fields_by_name["action_digest"].message_type is re_pb2.Digest.DESCRIPTOR
    assert executing.fields_by_name["action"].message_type is re_pb2.Action.DESCRIPTOR
    # BuildBuddy sends each of these on its own, never as a oneof.
    assert not sched_pb2.RegisterAndStreamWorkRequest.DESCRIPTOR.oneofs
    assert not sched_pb2.RegisterAndStreamWorkResponse.DESCRIPTOR.oneofs


# --------------------------------------------------- stubs over real gRPC


class _Capabilities(re_grpc.CapabilitiesServicer):
    def GetCapabilities(self, request, context):
        return re_pb2.ServerCapabilities(
            low_api_version=semver_pb2.SemVer(major=2),
            high_api_version=semver_pb2.SemVer(major=2, minor=int(request.instance_name or 0)),
        )


class _Execution(re_grpc.ExecutionServicer):
    def Execute(self, request, context):
        meta = re_pb2.ExecuteOperationMetadata(
            stage=re_pb2.ExecutionStage.QUEUED, action_digest=request.action_digest
        )
        op = operations_pb2.Operation(name="op-1")
        op.metadata.Pack(meta)
        yield op
        done = operations_pb2.Operation(name="op-1", done=True)
        done.response.Pack(re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=3)))
        yield done

    def PublishOperation(self, request_iterator, context):
        names = [op.name for op in request_iterator]
        if names != ["task-1", "task-1"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, ",".join(names))
        return re_pb2.PublishOperationResponse()


class _Scheduler(sched_grpc.SchedulerServicer):
    def LeaseTask(self, request_iterator, context):
        for i, req in enumerate(request_iterator):
            resp = sched_pb2.LeaseTaskResponse(lease_duration_seconds=10, lease_id="lease-1")
            if i == 0:
                task = re_pb2.ExecutionTask(execution_id=req.task_id, jwt="j")
                resp.serialized_task = task.SerializeToString()
            if req.finalize:
                resp.closed_cleanly = True
                yield resp
                return
            yield resp


class _OperationQueue(rw_grpc.OperationQueueServicer):
    def Synchronize(self, request, context):
        resp = rw_pb2.SynchronizeResponse()
        resp.next_synchronization_at.seconds = 1700000000
        if request.current_state.WhichOneof("worker_state") == "idle":
            executing = resp.desired_state.executing
            executing.action_digest.hash = HASH_A
            executing.instance_name_suffix = request.worker_id["thread"]
        return resp


class _ByteStream(bs_grpc.ByteStreamServicer):
    def Write(self, request_iterator, context):
        size = 0
        for req in request_iterator:
            size += len(req.data)
        return bs_pb2.WriteResponse(committed_size=size)


class _Bots(bots_grpc.BotsServicer):
    def UpdateBotSession(self, request, context):
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        session.name = request.name
        for lease in session.leases:
            lease.state = bots_pb2.CANCELLED
        return session


class _Operations(operations_grpc.OperationsServicer):
    def GetOperation(self, request, context):
        return operations_pb2.Operation(name=request.name, done=True)


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(), server)
    re_grpc.add_ExecutionServicer_to_server(_Execution(), server)
    bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(), server)
    bots_grpc.add_BotsServicer_to_server(_Bots(), server)
    operations_grpc.add_OperationsServicer_to_server(_Operations(), server)
    sched_grpc.add_SchedulerServicer_to_server(_Scheduler(), server)
    rw_grpc.add_OperationQueueServicer_to_server(_OperationQueue(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    chan = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield chan
    finally:
        chan.close()
        server.stop(None)


def _raw_unary(channel: grpc.Channel, path: str, body: bytes) -> bytes:
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return call(body, timeout=10)


def test_capabilities_served_at_upstream_path_with_raw_bytes(channel):
    reply = _raw_unary(
        channel, "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", ld(1, "7")
    )
    # ServerCapabilities.low_api_version=4, high_api_version=5; SemVer major=1, minor=2.
    assert reply == ld(4, vint(1, 2)) + ld(5, vint(1, 2) + vint(2, 7))


def test_execute_stub_streams_operations(channel):
    stub = re_grpc.ExecutionStub(channel)
    request = re_pb2.ExecuteRequest(action_digest=re_pb2.Digest(hash=HASH_A, size_bytes=5))
    ops = list(stub.Execute(request, timeout=10))
    assert [op.done for op in ops] == [False, True]
    meta = re_pb2.ExecuteOperationMetadata()
    assert ops[0].metadata.Unpack(meta)
    assert meta.stage == re_pb2.ExecutionStage.QUEUED
    assert meta.action_digest.hash == HASH_A
    response = re_pb2.ExecuteResponse()
    assert ops[1].response.Unpack(response)
    assert response.result.exit_code == 3


def test_bytestream_write_is_client_streaming_at_upstream_path(channel):
    call = channel.stream_unary(
        "/google.bytestream.ByteStream/Write",
        request_serializer=None,
        response_deserializer=None,
    )
    name = f"uploads/u/blobs/{HASH_A}/6"
    chunks = [ld(1, name) + vint(2, 0) + ld(10, b"abc"), vint(2, 3) + vint(3, 1) + ld(10, b"def")]
    reply = call(iter(chunks), timeout=10)
    assert reply == vint(1, 6)  # WriteResponse.committed_size=1


def test_bots_update_session_at_upstream_path(channel):
    lease = ld(7, "lease-1") + vint(2, bots_pb2.ACTIVE)
    session = ld(2, "bot-1") + vint(3, bots_pb2.OK) + ld(5, lease)
    request = ld(1, "sessions/s1") + ld(2, session) + ld(3, ld(1, "leases"))
    reply = _raw_unary(
        channel, "/google.devtools.remoteworkers.v1test2.Bots/UpdateBotSession", request
    )
    got = decode(bots_pb2.BotSession, reply)
    assert got.name == "sessions/s1"
    assert got.bot_id == "bot-1"
    assert [(le.id, le.state) for le in got.leases] == [("lease-1", bots_pb2.CANCELLED)]


def test_operations_service_from_googleapis(channel):
    stub = operations_grpc.OperationsStub(channel)
    op = stub.GetOperation(operations_pb2.GetOperationRequest(name="op-9"), timeout=10)
    assert op.name == "op-9" and op.done


def test_publish_operation_is_client_streaming_at_upstream_path(channel):
    call = channel.stream_unary(
        "/build.bazel.remote.execution.v2.Execution/PublishOperation",
        request_serializer=None,
        response_deserializer=None,
    )
    # Operation.name=1, done=3.
    reply = call(iter([ld(1, "task-1"), ld(1, "task-1") + vint(3, 1)]), timeout=10)
    assert reply == b""  # PublishOperationResponse is empty


def test_lease_task_is_bidi_at_upstream_path(channel):
    call = channel.stream_stream(
        "/scheduler.Scheduler/LeaseTask", request_serializer=None, response_deserializer=None
    )
    claim = ld(1, "task-1") + ld(4, "exec-1") + vint(7, 1)  # task_id, executor_id, reconnect
    done = ld(1, "task-1") + vint(2, 1) + ld(4, "exec-1")  # finalize
    replies = [decode(sched_pb2.LeaseTaskResponse, r) for r in call(iter([claim, done]))]
    assert [r.closed_cleanly for r in replies] == [False, True]
    assert replies[0].lease_duration_seconds == 10 and replies[0].lease_id == "lease-1"
    task = decode(re_pb2.ExecutionTask, replies[0].serialized_task)
    assert (task.execution_id, task.jwt) == ("task-1", "j")
    assert replies[1].serialized_task == b""


def test_synchronize_at_upstream_path(channel):
    request = ld(1, ld(1, "thread") + ld(2, "3")) + ld(4, ld(1, b""))  # worker_id, idle
    reply = _raw_unary(channel, "/buildbarn.remoteworker.OperationQueue/Synchronize", request)
    got = decode(rw_pb2.SynchronizeResponse, reply)
    assert got.next_synchronization_at.seconds == 1700000000
    assert got.desired_state.WhichOneof("worker_state") == "executing"
    assert got.desired_state.executing.action_digest.hash == HASH_A
    assert got.desired_state.executing.instance_name_suffix == "3"


# ---------------------------------------------------------- wire numbers


def test_action_field_numbers():
    data = (
        ld(1, digest(HASH_A, 10))  # command_digest
        + ld(2, digest(HASH_B, 20))  # input_root_digest
        + ld(6, vint(1, 90))  # timeout (Duration.seconds=1)
        + vint(7, 1)  # do_not_cache
        + ld(9, b"salt")
        + ld(10, ld(1, ld(1, "OSFamily") + ld(2, "Linux")))  # platform.properties
    )
    action = decode(re_pb2.Action, data)
    assert action.command_digest == re_pb2.Digest(hash=HASH_A, size_bytes=10)
    assert action.input_root_digest == re_pb2.Digest(hash=HASH_B, size_bytes=20)
    assert action.timeout == duration_pb2.Duration(seconds=90)
    assert action.do_not_cache is True
    assert action.salt == b"salt"
    assert [(p.name, p.value) for p in action.platform.properties] == [("OSFamily", "Linux")]
    assert action.SerializeToString() == data


def test_action_reserved_numbers_stay_unknown():
    # 3-5 and 8 moved to Command long ago; old clients' bytes must not alias new fields.
    action = re_pb2.Action.FromString(vint(3, 1) + vint(8, 1))
    assert set_fields(action) == set()
    assert len(unknown_fields.UnknownFieldSet(action)) == 2


def test_command_field_numbers():
    data = (
        ld(1, "/bin/sh")
        + ld(1, "-c")
        + ld(2, ld(1, "PATH") + ld(2, "/bin"))  # environment_variables
        + ld(3, "old/file")  # output_files
        + ld(4, "old/dir")  # output_directories
        + ld(5, ld(1, ld(1, "k") + ld(2, "v")))  # platform (deprecated)
        + ld(6, "sub")  # working_directory
        + ld(7, "out/a")  # output_paths
        + ld(8, "MTime")  # output_node_properties
        + vint(9, re_pb2.Command.DIRECTORY_ONLY)  # output_directory_format
    )
    cmd = decode(re_pb2.Command, data)
    assert list(cmd.arguments) == ["/bin/sh", "-c"]
    assert [(e.name, e.value) for e in cmd.environment_variables] == [("PATH", "/bin")]
    assert list(cmd.output_files) == ["old/file"]
    assert list(cmd.output_directories) == ["old/dir"]
    assert cmd.platform.properties[0].name == "k"
    assert cmd.working_directory == "sub"
    assert list(cmd.output_paths) == ["out/a"]
    assert list(cmd.output_node_properties) == ["MTime"]
    assert cmd.output_directory_format == 1
    assert cmd.SerializeToString() == data


def test_directory_and_node_field_numbers():
    file_node = ld(1, "run.sh") + ld(2, digest(HASH_A, 3)) + vint(4, 1)
    file_node += ld(6, ld(3, vint(1, 0o755)))  # node_properties.unix_mode
    dir_node = ld(1, "lib") + ld(2, digest(HASH_B, 80))
    link = ld(1, "cur") + ld(2, "lib") + ld(4, ld(1, ld(1, "p") + ld(2, "q")))
    data = ld(1, file_node) + ld(2, dir_node) + ld(3, link) + ld(5, ld(2, vint(1, 1700000000)))
    d = decode(re_pb2.Directory, data)
    assert d.files[0].name == "run.sh" and d.files[0].is_executable
    assert d.files[0].digest.size_bytes == 3
    assert d.files[0].node_properties.unix_mode.value == 0o755
    assert d.directories[0].name == "lib" and d.directories[0].digest.hash == HASH_B
    assert d.symlinks[0].target == "lib"
    assert d.symlinks[0].node_properties.properties[0].value == "q"
    assert d.node_properties.mtime.seconds == 1700000000
    assert d.SerializeToString() == data
    tree = decode(re_pb2.Tree, ld(1, data) + ld(2, b"") + ld(2, b""))
    assert tree.root == d and len(tree.children) == 2


def test_execute_request_field_numbers():
    data = (
        ld(1, "main")
        + vint(3, 1)  # skip_cache_lookup
        + ld(6, digest(HASH_A, 140))  # action_digest
        + ld(7, vint(1, -5))  # execution_policy.priority
        + ld(8, vint(1, 2))  # results_cache_policy.priority
        + vint(9, 9)  # digest_function = BLAKE3
        + vint(10, 1)  # inline_stdout
        + vint(11, 1)  # inline_stderr
        + ld(12, "out/a")  # inline_output_files
    )
    req = decode(re_pb2.ExecuteRequest, data)
    assert req.instance_name == "main"
    assert req.skip_cache_lookup is True
    assert req.action_digest.size_bytes == 140
    assert req.execution_policy.priority == -5
    assert req.results_cache_policy.priority == 2
    assert req.digest_function == re_pb2.DigestFunction.BLAKE3
    assert req.inline_stdout and req.inline_stderr
    assert list(req.inline_output_files) == ["out/a"]
    assert req.SerializeToString() == data


def test_action_result_field_numbers():
    out_file = ld(1, "out/a") + ld(2, digest(HASH_A, 1)) + vint(4, 1) + ld(5, b"x")
    out_dir = ld(1, "out/d") + ld(3, digest(HASH_B, 2)) + vint(4, 1) + ld(5, digest(HASH_C, 3))
    out_link = ld(1, "out/l") + ld(2, "a")
    meta = (
        ld(1, "worker-1")
        + ld(2, vint(1, 1))  # queued_timestamp
        + ld(3, vint(1, 2))  # worker_start_timestamp
        + ld(4, vint(1, 9))  # worker_completed_timestamp
        + ld(5, vint(1, 3))  # input_fetch_start_timestamp
        + ld(6, vint(1, 4))  # input_fetch_completed_timestamp
        + ld(7, vint(1, 5))  # execution_start_timestamp
        + ld(8, vint(1, 6))  # execution_completed_timestamp
        + ld(9, vint(1, 7))  # output_upload_start_timestamp
        + ld(10, vint(1, 8))  # output_upload_completed_timestamp
        + ld(12, vint(1, 1))  # virtual_execution_duration
    )
    data = (
        ld(2, out_file)
        + ld(3, out_dir)
        + vint(4, 2)  # exit_code
        + ld(5, b"hello")  # stdout_raw
        + ld(6, digest(HASH_A, 5))
        + ld(7, b"oops")  # stderr_raw
        + ld(8, digest(HASH_B, 4))
        + ld(9, meta)
        + ld(10, out_link)  # output_file_symlinks
        + ld(11, out_link)  # output_directory_symlinks
        + ld(12, out_link)  # output_symlinks
    )
    result = decode(re_pb2.ActionResult, data)
    assert result.output_files[0].contents == b"x" and result.output_files[0].is_executable
    od = result.output_directories[0]
    assert od.tree_digest.hash == HASH_B and od.is_topologically_sorted
    assert od.root_directory_digest.hash == HASH_C
    assert result.exit_code == 2
    assert (result.stdout_raw, result.stderr_raw) == (b"hello", b"oops")
    assert (result.stdout_digest.size_bytes, result.stderr_digest.size_bytes) == (5, 4)
    em = result.execution_metadata
    assert em.worker == "worker-1"
    assert [
        em.queued_timestamp.seconds,
        em.worker_start_timestamp.seconds,
        em.input_fetch_start_timestamp.seconds,
        em.input_fetch_completed_timestamp.seconds,
        em.execution_start_timestamp.seconds,
        em.execution_completed_timestamp.seconds,
        em.output_upload_start_timestamp.seconds,
        em.output_upload_completed_timestamp.seconds,
        em.worker_completed_timestamp.seconds,
    ] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert em.virtual_execution_duration.seconds == 1
    assert result.output_file_symlinks[0].path == "out/l"
    assert result.output_directory_symlinks[0].path == "out/l"
    assert result.output_symlinks[0].target == "a"
    assert result.SerializeToString() == data


def test_cas_request_field_numbers():
    upd = decode(
        re_pb2.BatchUpdateBlobsRequest,
        ld(1, "i") + ld(2, ld(1, digest(HASH_A, 3)) + ld(2, b"abc") + vint(3, 1)) + vint(5, 9),
    )
    assert upd.requests[0].data == b"abc"
    assert upd.requests[0].compressor == re_pb2.Compressor.ZSTD
    assert upd.digest_function == re_pb2.DigestFunction.BLAKE3

    read_resp = decode(
        re_pb2.BatchReadBlobsResponse,
        ld(1, ld(1, digest(HASH_A, 3)) + ld(2, b"zz") + ld(3, vint(1, 5)) + vint(4, 1)),
    )
    r = read_resp.responses[0]
    assert r.data == b"zz" and r.compressor == re_pb2.Compressor.ZSTD
    assert r.status.code == code_pb2.NOT_FOUND

    read_req = decode(
        re_pb2.BatchReadBlobsRequest, ld(2, digest(HASH_A, 3)) + packed(3, [1]) + vint(4, 1)
    )
    assert list(read_req.acceptable_compressors) == [re_pb2.Compressor.ZSTD]
    assert read_req.digest_function == re_pb2.DigestFunction.SHA256

    missing = decode(re_pb2.FindMissingBlobsResponse, ld(2, digest(HASH_B, 1)))
    assert missing.missing_blob_digests[0].hash == HASH_B
    find = decode(re_pb2.FindMissingBlobsRequest, ld(2, digest(HASH_B, 1)) + vint(3, 9))
    assert find.digest_function == re_pb2.DigestFunction.BLAKE3

    tree_req = decode(
        re_pb2.GetTreeRequest,
        ld(1, "i") + ld(2, digest(HASH_C, 9)) + vint(3, 100) + ld(4, "tok") + vint(5, 1),
    )
    assert (tree_req.page_size, tree_req.page_token, tree_req.digest_function) == (100, "tok", 1)
    tree_resp = decode(re_pb2.GetTreeResponse, ld(1, b"") + ld(2, "next"))
    assert len(tree_resp.directories) == 1 and tree_resp.next_page_token == "next"


def test_action_cache_request_field_numbers():
    get = decode(
        re_pb2.GetActionResultRequest,
        ld(1, "i") + ld(2, digest(HASH_A, 1)) + vint(3, 1) + vint(4, 1) + ld(5, "f") + vint(6, 9),
    )
    assert get.inline_stdout and get.inline_stderr and list(get.inline_output_files) == ["f"]
    assert get.digest_function == re_pb2.DigestFunction.BLAKE3
    upd = decode(
        re_pb2.UpdateActionResultRequest,
        ld(2, digest(HASH_A, 1)) + ld(3, vint(4, 1)) + ld(4, vint(1, 1)) + vint(5, 1),
    )
    assert upd.action_result.exit_code == 1
    assert upd.results_cache_policy.priority == 1
    assert upd.digest_function == re_pb2.DigestFunction.SHA256


def test_operation_metadata_and_capabilities_field_numbers():
    meta = decode(
        re_pb2.ExecuteOperationMetadata,
        vint(1, 3)
        + ld(2, digest(HASH_A, 1))
        + ld(3, "so")
        + ld(4, "se")
        + ld(5, ld(1, "w"))
        + vint(6, 9),
    )
    assert meta.stage == re_pb2.ExecutionStage.EXECUTING
    assert (meta.stdout_stream_name, meta.stderr_stream_name) == ("so", "se")
    assert meta.partial_execution_metadata.worker == "w"
    assert meta.digest_function == re_pb2.DigestFunction.BLAKE3

    cache = (
        packed(1, [1, 9])  # digest_functions
        + ld(2, vint(1, 1))  # action_cache_update_capabilities.update_enabled
        + ld(3, ld(1, vint(1, -10) + vint(2, 10)))  # cache_priority_capabilities
        + vint(4, 4 << 20)  # max_batch_total_size_bytes
        + vint(5, 1)  # symlink_absolute_path_strategy = DISALLOWED
        + packed(6, [1])  # supported_compressors
        + packed(7, [1])  # supported_batch_update_compressors
        + vint(8, 1 << 30)  # max_cas_blob_size_bytes
    )
    execution = vint(1, 1) + vint(2, 1) + ld(4, "MTime") + packed(5, [1, 9])
    caps = decode(
        re_pb2.ServerCapabilities,
        ld(1, cache)
        + ld(2, execution)
        + ld(3, vint(1, 2))
        + ld(4, vint(1, 2))
        + ld(5, vint(1, 2) + vint(2, 3)),
    )
    cc = caps.cache_capabilities
    assert list(cc.digest_functions) == [1, 9]
    assert cc.action_cache_update_capabilities.update_enabled
    assert cc.cache_priority_capabilities.priorities[0].min_priority == -10
    assert cc.max_batch_total_size_bytes == 4 << 20
    assert cc.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    assert list(cc.supported_compressors) == list(cc.supported_batch_update_compressors) == [1]
    assert cc.max_cas_blob_size_bytes == 1 << 30
    ec = caps.execution_capabilities
    assert ec.digest_function == 1 and ec.exec_enabled
    assert list(ec.supported_node_properties) == ["MTime"] and list(ec.digest_functions) == [1, 9]
    assert caps.high_api_version.minor == 3 and caps.deprecated_api_version.major == 2
    assert caps.SerializeToString() == ld(1, cache) + ld(2, execution) + ld(3, vint(1, 2)) + ld(
        4, vint(1, 2)
    ) + ld(5, vint(1, 2) + vint(2, 3))


def test_request_metadata_field_numbers():
    md = decode(
        re_pb2.RequestMetadata,
        ld(1, ld(1, "bazel") + ld(2, "8.0.0"))
        + ld(2, "a")
        + ld(3, "inv")
        + ld(4, "corr")
        + ld(5, "CppCompile")
        + ld(6, "//x:y")
        + ld(7, "k8-fastbuild"),
    )
    assert md.tool_details.tool_name == "bazel" and md.tool_details.tool_version == "8.0.0"
    assert (md.action_id, md.tool_invocation_id, md.correlated_invocations_id) == (
        "a",
        "inv",
        "corr",
    )
    assert (md.action_mnemonic, md.target_id, md.configuration_id) == (
        "CppCompile",
        "//x:y",
        "k8-fastbuild",
    )


def test_enum_numbers():
    df = re_pb2.DigestFunction
    assert (df.UNKNOWN, df.SHA256, df.SHA1, df.MD5, df.VSO) == (0, 1, 2, 3, 4)
    assert (df.SHA384, df.SHA512, df.MURMUR3, df.SHA256TREE, df.BLAKE3) == (5, 6, 7, 8, 9)
    c = re_pb2.Compressor
    assert (c.IDENTITY, c.ZSTD, c.DEFLATE, c.BROTLI) == (0, 1, 2, 3)
    s = re_pb2.ExecutionStage
    assert (s.UNKNOWN, s.CACHE_CHECK, s.QUEUED, s.EXECUTING, s.COMPLETED) == (0, 1, 2, 3, 4)
    f = re_pb2.Command
    assert (f.TREE_ONLY, f.DIRECTORY_ONLY, f.TREE_AND_DIRECTORY) == (0, 1, 2)
    assert bots_pb2.LeaseState.Value("ACTIVE") == 2
    assert (bots_pb2.PENDING, bots_pb2.COMPLETED, bots_pb2.CANCELLED) == (1, 4, 5)
    assert (bots_pb2.OK, bots_pb2.UNHEALTHY, bots_pb2.HOST_REBOOTING) == (1, 2, 3)
    assert (bots_pb2.BOT_TERMINATING, bots_pb2.INITIALIZING) == (4, 5)


def test_bytestream_field_numbers():
    read = decode(bs_pb2.ReadRequest, ld(1, "blobs/x/1") + vint(2, 5) + vint(3, 7))
    assert (read.resource_name, read.read_offset, read.read_limit) == ("blobs/x/1", 5, 7)
    assert decode(bs_pb2.ReadResponse, ld(10, b"data")).data == b"data"
    write = decode(bs_pb2.WriteRequest, ld(1, "r") + vint(2, 4) + vint(3, 1) + ld(10, b"d"))
    assert (write.resource_name, write.write_offset, write.finish_write, write.data) == (
        "r",
        4,
        True,
        b"d",
    )
    # committed_size is -1 for an already-present compressed upload: int64, 10-byte varint.
    assert decode(bs_pb2.WriteResponse, vint(1, -1)).committed_size == -1
    status = decode(bs_pb2.QueryWriteStatusResponse, vint(1, 9) + vint(2, 1))
    assert status.committed_size == 9 and status.complete
    assert decode(bs_pb2.QueryWriteStatusRequest, ld(1, "r")).resource_name == "r"


def test_lease_and_bot_session_field_numbers():
    payload = any_pb2.Any()
    payload.Pack(re_pb2.Action(do_not_cache=True))
    worker = (
        ld(1, ld(1, "host-1") + ld(2, ld(1, "os") + ld(2, "linux")))
        + ld(2, ld(1, "pool") + ld(2, "default"))
        + ld(3, ld(1, "DockerImage") + ld(2, ""))
    )
    lease = (
        ld(1, "old")  # assignment (deprecated)
        + vint(2, 1)  # state = PENDING
        + ld(3, vint(1, 9))  # status.code
        + ld(4, worker)  # requirements
        + ld(5, vint(1, 100))  # expire_time
        + ld(6, b"")  # inline_assignment (deprecated)
        + ld(7, "lease-1")  # id
        + ld(8, payload.SerializeToString())  # payload
        + ld(9, b"")  # result
    )
    got = decode(bots_pb2.Lease, lease)
    assert got.id == "lease-1"
    assert got.state == bots_pb2.PENDING
    assert got.status.code == code_pb2.FAILED_PRECONDITION
    assert got.requirements.devices[0].handle == "host-1"
    assert got.expire_time.seconds == 100
    assert got.assignment == "old"
    assert set_fields(got) >= {"inline_assignment", "result", "payload"}
    action = re_pb2.Action()
    assert got.payload.Unpack(action) and action.do_not_cache

    session = (
        ld(1, "s/1")
        + ld(2, "bot")
        + vint(3, 5)
        + ld(4, worker)
        + ld(5, lease)
        + ld(6, vint(1, 7))
        + ld(7, "stoker-0.1")
    )
    bs = decode(bots_pb2.BotSession, session)
    assert (bs.name, bs.bot_id, bs.status, bs.version) == ("s/1", "bot", 5, "stoker-0.1")
    w = bs.worker
    assert w.devices[0].properties[0].key == "os" and w.properties[0].value == "default"
    assert w.configs[0].key == "DockerImage"
    assert bs.leases[0].id == "lease-1" and bs.expire_time.seconds == 7

    create = decode(bots_pb2.CreateBotSessionRequest, ld(1, "farm") + ld(2, session))
    assert create.parent == "farm" and create.bot_session.bot_id == "bot"
    update = decode(bots_pb2.UpdateBotSessionRequest, ld(1, "s/1") + ld(3, ld(1, "leases")))
    assert update.update_mask == field_mask_pb2.FieldMask(paths=["leases"])


def test_admin_temp_field_numbers():
    admin = decode(bots_pb2.AdminTemp, vint(1, 3) + ld(2, "bye"))
    assert admin.command == bots_pb2.AdminTemp.BOT_TERMINATE and admin.arg == "bye"


# ----------------------------------------------- BuildBuddy scheduler protocol


def _execution_node() -> bytes:
    return (
        ld(1, "10.0.0.5")  # host
        + vint(2, 1)  # port (deprecated)
        + vint(3, 25 << 30)  # assignable_memory_bytes
        + vint(4, 7000)  # assignable_milli_cpu
        + ld(5, "linux")  # os_family
        + ld(6, "amd64")  # arch
        + ld(7, "ci")  # pool
        + ld(8, "stoker-0.1")  # version
        + ld(9, "exec-uuid")  # executor_id
        + ld(10, "host-id")  # executor_host_id
        + ld(12, "none")  # supported_isolation_types
        + vint(13, 4)  # current_queue_length
        + vint(14, 2)  # active_action_count
        + vint(18, 1)  # supports_proactive_cancellation
        + ld(21, vint(1, 1700000000))  # start_time
    )


def test_register_and_stream_work_request_field_numbers():
    data = ld(1, ld(1, _execution_node()))  # register_executor_request.node
    req = decode(sched_pb2.RegisterAndStreamWorkRequest, data)
    node = req.register_executor_request.node
    assert (node.host, node.port) == ("10.0.0.5", 1)
    assert (node.assignable_memory_bytes, node.assignable_milli_cpu) == (25 << 30, 7000)
    assert (node.os_family, node.arch, node.pool, node.version) == (
        "linux",
        "amd64",
        "ci",
        "stoker-0.1",
    )
    assert (node.executor_id, node.executor_host_id) == ("exec-uuid", "host-id")
    assert list(node.supported_isolation_types) == ["none"]
    assert (node.current_queue_length, node.active_action_count) == (4, 2)
    assert node.supports_proactive_cancellation
    assert node.start_time.seconds == 1700000000
    assert req.SerializeToString() == data

    # enqueue_task_reservation_response=2, shutting_down_request=3, ask_for_more_work_request=4;
    # not a oneof, so all of them survive together.
    data = ld(2, ld(1, "t1")) + ld(3, ld(1, "t2") + ld(1, "t3")) + ld(4, b"")
    req = decode(sched_pb2.RegisterAndStreamWorkRequest, data)
    assert req.enqueue_task_reservation_response.task_id == "t1"
    assert list(req.shutting_down_request.task_id) == ["t2", "t3"]
    assert set_fields(req) == {
        "enqueue_task_reservation_response",
        "shutting_down_request",
        "ask_for_more_work_request",
    }
    assert req.SerializeToString() == data


def test_register_and_stream_work_response_field_numbers():
    task_size = vint(1, 1 << 30) + vint(2, 1500) + vint(3, 4 << 30)
    metadata = (
        ld(1, vint(1, 1))  # task_size (deprecated)
        + ld(2, "linux")  # os
        + ld(3, "arm64")  # arch
        + ld(4, "ci")  # pool
        + ld(5, "GR1")  # executor_group_id
        + ld(6, "GR2")  # task_group_id
        + vint(11, -3)  # priority
    )
    reservation = (
        ld(1, "task-1")
        + ld(2, task_size)
        + ld(3, metadata)
        + ld(4, "exec-uuid")
        + ld(5, vint(1, 2))  # delay
        + ld(6, "jwt-1")
    )
    data = (
        ld(3, reservation)  # enqueue_task_reservation_request
        + ld(4, ld(1, vint(1, 5)))  # ask_for_more_work_response.delay
        + ld(5, ld(1, "task-0"))  # cancel_task_reservation_request
    )
    resp = decode(sched_pb2.RegisterAndStreamWorkResponse, data)
    r = resp.enqueue_task_reservation_request
    assert (r.task_id, r.executor_id, r.jwt) == ("task-1", "exec-uuid", "jwt-1")
    assert (r.task_size.estimated_memory_bytes, r.task_size.estimated_milli_cpu) == (1 << 30, 1500)
    assert r.task_size.estimated_free_disk_bytes == 4 << 30
    assert r.delay == duration_pb2.Duration(seconds=2)
    m = r.scheduling_metadata
    assert (m.os, m.arch, m.pool) == ("linux", "arm64", "ci")
    assert (m.executor_group_id, m.task_group_id, m.priority) == ("GR1", "GR2", -3)
    assert m.task_size.estimated_memory_bytes == 1
    assert resp.ask_for_more_work_response.delay.seconds == 5
    assert resp.cancel_task_reservation_request.task_id == "task-0"
    assert resp.SerializeToString() == data


def test_lease_task_field_numbers():
    data = (
        ld(1, "task-1")
        + vint(2, 1)  # finalize
        + ld(4, "exec-uuid")
        + vint(5, 1)  # re_enqueue
        + ld(6, vint(1, 14) + ld(2, "worker lost"))  # re_enqueue_reason
        + vint(7, 1)  # supports_reconnect
        + ld(8, "lease-1")  # reconnect_token
        + ld(9, "host-a")  # executor_hostname
    )
    req = decode(sched_pb2.LeaseTaskRequest, data)
    assert (req.task_id, req.finalize, req.executor_id) == ("task-1", True, "exec-uuid")
    assert req.re_enqueue and req.re_enqueue_reason.code == code_pb2.UNAVAILABLE
    assert req.re_enqueue_reason.message == "worker lost"
    assert req.supports_reconnect and req.reconnect_token == "lease-1"
    assert req.executor_hostname == "host-a"
    assert req.SerializeToString() == data

    data = ld(1, b"task") + vint(2, 10) + vint(3, 1) + ld(5, "lease-1") + vint(6, 1)
    resp = decode(sched_pb2.LeaseTaskResponse, data)
    assert (resp.serialized_task, resp.lease_duration_seconds) == (b"task", 10)
    assert resp.closed_cleanly and resp.supports_reconnect and resp.lease_id == "lease-1"
    assert resp.SerializeToString() == data


def test_task_exists_and_re_enqueue_field_numbers():
    assert decode(sched_pb2.TaskExistsRequest, ld(1, "t")).task_id == "t"
    assert decode(sched_pb2.TaskExistsResponse, vint(1, 1)).exists
    req = decode(sched_pb2.ReEnqueueTaskRequest, ld(1, "t") + ld(2, "why") + ld(3, "lease-1"))
    assert (req.task_id, req.reason, req.lease_id) == ("t", "why", "lease-1")


def test_undeclared_upstream_fields_survive_a_re_encode():
    # ExecutionNode.labels=22 is not declared here.
    data = _execution_node() + ld(22, ld(1, "k") + ld(2, "v"))
    node = sched_pb2.ExecutionNode.FromString(data)
    assert len(unknown_fields.UnknownFieldSet(node)) == 1
    assert node.SerializeToString() == data
    # LeaseTaskResponse.reconnect_token=4 is (some servers resume leases by it alone).
    resp = sched_pb2.LeaseTaskResponse.FromString(ld(4, "old") + ld(5, "lease-1"))
    assert (resp.reconnect_token, resp.lease_id) == ("old", "lease-1")
    assert len(unknown_fields.UnknownFieldSet(resp)) == 0


def test_execution_task_field_numbers():
    execute_request = ld(1, "main") + ld(6, digest(HASH_A, 140)) + vint(9, 1)
    data = (
        ld(1, execute_request)
        + ld(2, "jwt-1")
        + ld(3, "inv-1")
        + ld(4, ld(1, digest(HASH_B, 20)) + ld(6, vint(1, 60)))  # action
        + ld(5, ld(1, "/bin/true") + ld(7, "out"))  # command
        + ld(6, f"main/uploads/u/blobs/{HASH_A}/140")  # execution_id
        + ld(7, vint(1, 1700000000))  # queued_timestamp
        + ld(8, ld(1, ld(1, "container-image") + ld(2, "none")))  # platform_overrides
    )
    task = decode(re_pb2.ExecutionTask, data)
    assert task.execute_request.instance_name == "main"
    assert task.execute_request.action_digest.size_bytes == 140
    assert (task.jwt, task.invocation_id) == ("jwt-1", "inv-1")
    assert task.action.command_digest.hash == HASH_B
    assert task.action.timeout.seconds == 60
    assert list(task.command.arguments) == ["/bin/true"]
    assert list(task.command.output_paths) == ["out"]
    assert task.execution_id.endswith(f"/blobs/{HASH_A}/140")
    assert task.queued_timestamp.seconds == 1700000000
    assert task.platform_overrides.properties[0].name == "container-image"
    assert task.SerializeToString() == data


def test_execution_progress_in_partial_execution_metadata():
    s = re_pb2.ExecutionProgress.ExecutionState
    assert (s.UNKNOWN_EXECUTION_STATE, s.PULLING_CONTAINER_IMAGE, s.DOWNLOADING_INPUTS) == (0, 1, 2)
    assert (s.BOOTING_VM, s.RESUMING_VM, s.EXECUTING_COMMAND, s.UPLOADING_OUTPUTS) == (3, 4, 5, 6)
    progress = decode(re_pb2.ExecutionProgress, ld(1, vint(1, 1700000000)) + vint(2, 5))
    assert progress.timestamp.seconds == 1700000000
    assert progress.execution_state == s.EXECUTING_COMMAND

    meta = re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.EXECUTING)
    meta.partial_execution_metadata.auxiliary_metadata.add().Pack(progress)
    wire = meta.SerializeToString()
    back = decode(re_pb2.ExecuteOperationMetadata, wire)
    aux = back.partial_execution_metadata.auxiliary_metadata[0]
    assert aux.type_url == "type.googleapis.com/build.bazel.remote.execution.v2.ExecutionProgress"
    got = re_pb2.ExecutionProgress()
    assert aux.Unpack(got) and got == progress
    # ExecuteOperationMetadata.partial_execution_metadata=5, auxiliary_metadata=11.
    any_bytes = ld(1, aux.type_url) + ld(2, progress.SerializeToString())
    assert wire == vint(1, 3) + ld(5, ld(11, any_bytes))


# ---------------------------------------------------- Buildbarn remoteworker


def test_synchronize_request_field_numbers():
    platform = ld(1, ld(1, "OSFamily") + ld(2, "linux"))
    completed = ld(1, vint(4, 1))  # ExecuteResponse.result.exit_code
    executing = ld(1, digest(HASH_A, 140)) + ld(6, completed)
    data = (
        ld(1, ld(1, "thread") + ld(2, "0"))  # worker_id
        + ld(2, "main")  # instance_name_prefix
        + ld(3, platform)
        + ld(4, ld(2, executing))  # current_state.executing
        + vint(5, 2)  # size_class
        + vint(6, 1)  # prefer_being_idle
    )
    req = decode(rw_pb2.SynchronizeRequest, data)
    assert dict(req.worker_id) == {"thread": "0"}
    assert req.instance_name_prefix == "main"
    assert req.platform.properties[0].value == "linux"
    assert (req.size_class, req.prefer_being_idle) == (2, True)
    ex = req.current_state.executing
    assert req.current_state.WhichOneof("worker_state") == "executing"
    assert ex.action_digest.hash == HASH_A
    assert ex.WhichOneof("execution_state") == "completed"
    assert ex.completed.result.exit_code == 1
    assert req.SerializeToString() == data

    stages = {2: "started", 3: "fetching_inputs", 4: "running", 5: "uploading_outputs"}
    for number, name in stages.items():
        state = decode(rw_pb2.CurrentState.Executing, ld(number, b""))
        assert state.WhichOneof("execution_state") == name
    assert decode(rw_pb2.CurrentState, ld(1, b"")).WhichOneof("worker_state") == "idle"
    # 7 was the old per-action prefer_being_idle; reserved, so it stays unknown.
    old = rw_pb2.CurrentState.Executing.FromString(vint(7, 1))
    assert set_fields(old) == set() and len(unknown_fields.UnknownFieldSet(old)) == 1


def test_synchronize_response_field_numbers():
    aux = any_pb2.Any()
    aux.Pack(re_pb2.RequestMetadata(action_id="a"))
    executing = (
        ld(1, digest(HASH_A, 140))  # action_digest
        + ld(2, ld(1, digest(HASH_B, 20)) + ld(6, vint(1, 60)))  # action
        + ld(4, vint(1, 1700000000))  # queued_timestamp
        + ld(6, aux.SerializeToString())  # auxiliary_metadata
        + ld(7, "suffix/a")  # instance_name_suffix
        + vint(9, 9)  # digest_function = BLAKE3
    )
    data = ld(1, vint(1, 1700000010)) + ld(2, ld(2, executing))
    resp = decode(rw_pb2.SynchronizeResponse, data)
    assert resp.next_synchronization_at.seconds == 1700000010
    ex = resp.desired_state.executing
    assert ex.action_digest.size_bytes == 140
    assert ex.action.timeout.seconds == 60
    assert ex.queued_timestamp.seconds == 1700000000
    assert ex.instance_name_suffix == "suffix/a"
    assert ex.digest_function == re_pb2.DigestFunction.BLAKE3
    assert ex.auxiliary_metadata[0] == aux
    assert resp.SerializeToString() == data

    idle = decode(rw_pb2.SynchronizeResponse, ld(2, ld(1, b"")))
    assert idle.desired_state.WhichOneof("worker_state") == "idle"
    # w3c_trace_context=8 (a map) is not read but kept.
    traced = executing + ld(8, ld(1, "traceparent") + ld(2, "00-x"))
    got = rw_pb2.DesiredState.Executing.FromString(traced)
    assert len(unknown_fields.UnknownFieldSet(got)) == 1
    assert got.SerializeToString() == traced


# ------------------------------------------------------ google.* interop


def test_operation_round_trips_execute_response_in_any():
    details = any_pb2.Any()
    details.Pack(
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="MISSING", subject=f"blobs/{HASH_A}/3"
                )
            ]
        )
    )
    response = re_pb2.ExecuteResponse(
        result=re_pb2.ActionResult(exit_code=1, stdout_digest=re_pb2.Digest(hash=HASH_B)),
        cached_result=True,
        status=status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message="missing input", details=[details]
        ),
        message="see logs",
    )
    response.server_logs["worker"].digest.hash = HASH_C
    op = operations_pb2.Operation(name="operations/abc", done=True)
    op.response.Pack(response)
    op.metadata.Pack(re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.COMPLETED))

    wire = op.SerializeToString()
    back = operations_pb2.Operation.FromString(wire)
    assert back.name == "operations/abc" and back.done
    assert back.WhichOneof("result") == "response"
    assert back.response.type_url == (
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
    )
    assert back.response.Is(re_pb2.ExecuteResponse.DESCRIPTOR)
    got = re_pb2.ExecuteResponse()
    assert back.response.Unpack(got)
    assert got == response
    assert got.server_logs["worker"].digest.hash == HASH_C
    pf = error_details_pb2.PreconditionFailure()
    assert got.status.details[0].Unpack(pf)
    assert pf.violations[0].subject == f"blobs/{HASH_A}/3"
    meta = re_pb2.ExecuteOperationMetadata()
    assert back.metadata.Unpack(meta) and meta.stage == re_pb2.ExecutionStage.COMPLETED
    # ExecuteResponse.status=3 holds a google.rpc.Status (code=1).
    assert re_pb2.ExecuteResponse.FromString(ld(3, vint(1, 9))).status.code == 9


# ------------------------------------------------------- generated files


def test_generated_code_targets_protobuf_6_31():
    """gencode stamped newer than 6.31 would refuse to load on older runtimes."""
    stamps = set()
    for path in (ROOT / "engine" / "_proto").rglob("*_pb2.py"):
        text = path.read_text()
        match = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
            r"(\d+),\s*(\d+),\s*(\d+),",
            text,
        )
        assert match, f"{path} has no runtime version stamp"
        stamps.add(tuple(int(g) for g in match.groups()))
        # Our modules import each other through engine._proto, never top-level.
        assert not re.search(
            r"^from (build|buildbarn|scheduler|google\.bytestream|google\.devtools)\b", text, re.M
        )
    assert stamps == {(6, 31, 0)}
