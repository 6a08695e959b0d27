"""The ActionCache service, and what survives a Stoker restart (its own instance)."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest

from engine.proto import re_pb2
from tests.integration.support import Client, command, digest_of, key, start


def _result_with(stdout: re_pb2.Digest, exit_code: int = 0) -> re_pb2.ActionResult:
    result = re_pb2.ActionResult(exit_code=exit_code, stdout_digest=stdout)
    result.output_files.add(path="out/a.txt", digest=stdout)
    result.execution_metadata.worker = "a client of its own"
    return result


def _get(client: Client, action: re_pb2.Digest) -> re_pb2.ActionResult:
    return client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action),
                                     timeout=10)


def test_update_and_get(client):
    blob = client.put(b"an output " + uuid.uuid4().bytes)
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    with pytest.raises(grpc.RpcError) as e:
        _get(client, action)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert action.hash in e.value.details()

    result = _result_with(blob, exit_code=3)
    stored = client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result), timeout=10)
    assert stored == result
    assert _get(client, action) == result
    # Replacing an entry is allowed.
    result.exit_code = 0
    client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result), timeout=10)
    assert _get(client, action) == result


def test_entry_whose_outputs_are_gone_is_not_served(client):
    absent = digest_of(b"never stored " + uuid.uuid4().bytes)
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=_result_with(absent)), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        _get(client, action)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r.ClearField("action_result"), "action_result is required"),
    (lambda r: r.action_result.output_files.add(path="/etc/passwd",
                                                digest=digest_of(b"x")),
     "action_result.output_files[0].path"),
    (lambda r: r.action_result.output_files.add(path="ok", digest=re_pb2.Digest(
        hash="ab" * 32, size_bytes=-1)), "action_result.output_files[0].digest"),
    (lambda r: r.action_result.output_directories.add(path="d", tree_digest=re_pb2.Digest(
        hash="XY" * 32, size_bytes=1)), "action_result.output_directories[0].tree_digest"),
    (lambda r: r.action_digest.CopyFrom(re_pb2.Digest(hash="abc", size_bytes=1)),
     "action_digest"),
])
def test_update_rejects_bad_entries(client, mutate, field):
    request = re_pb2.UpdateActionResultRequest(
        action_digest=digest_of(b"action " + uuid.uuid4().bytes),
        action_result=re_pb2.ActionResult(exit_code=0))
    mutate(request)
    with pytest.raises(grpc.RpcError) as e:
        client.ac.UpdateActionResult(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    if request.action_digest.size_bytes >= 0 and len(request.action_digest.hash) == 64:
        with pytest.raises(grpc.RpcError) as e:
            _get(client, request.action_digest)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _pid(path) -> int:
    with open(path) as f:
        return int(f.read().strip())


def test_cache_survives_restart(stoker_factory):
    process = start(stoker_factory("restart", default_timeout="2s"))
    run_dir = process.data_dir / "run"
    pids = [_pid(run_dir / "server.pid"), _pid(run_dir / "worker-0.pid")]
    for pid in pids:
        os.kill(pid, 0)  # alive

    client = Client(process.address)
    try:
        blob = client.put(b"kept across restarts " + uuid.uuid4().bytes)
        uploaded = digest_of(b"an action " + uuid.uuid4().bytes)
        client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=uploaded, action_result=_result_with(blob)), timeout=10)
        cmd = command(["/bin/sh", "-c", "echo executed > out.txt"], output_files=["out.txt"])
        executed = client.action(cmd, client.put_tree({}).root)
        first = client.execute(executed)
        assert first.response.status.code == 0 and not first.response.cached_result

        # The default timeout applies to actions that set none.
        slow = client.run("echo started; sleep 20", {})
        assert slow.response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "after 2s" in slow.response.status.message
        assert client.read(slow.result.stdout_digest) == b"started\n"
    finally:
        client.close()

    assert process.stop() == 0, process.log_tail()  # SIGTERM drains and exits 0
    assert not (run_dir / "server.pid").exists() and not (run_dir / "worker-0.pid").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    start(process)
    client = Client(process.address)
    try:
        assert _get(client, uploaded) == _result_with(blob)
        assert client.read(blob).startswith(b"kept across restarts ")
        again = client.execute(executed)
        assert again.response.cached_result
        assert again.result == first.result
        (out,) = again.result.output_files
        assert client.read(out.digest) == b"executed\n"
        assert client.missing([out.digest]) == set()
        assert key(out.digest) == key(digest_of(b"executed\n"))
    finally:
        client.close()
