"""Command and Directory blobs are read whole into memory, so each has a size cap of its own
(engine/pipeline/inputs.py MAX_COMMAND_BYTES, MAX_DIRECTORY_BYTES), checked by the digest's
size before a byte is read or fetched: past it the action is refused, naming the field."""

from __future__ import annotations

from google.rpc import code_pb2

from engine.pipeline.inputs import MAX_COMMAND_BYTES, MAX_DIRECTORY_BYTES
from engine.proto import re_pb2

ENV = {"PATH": "/usr/bin:/bin"}


def test_a_command_past_its_cap_is_refused_before_it_is_read(pipeline_rig):
    task = pipeline_rig.task(["/bin/true"], env=ENV)
    task.action.command_digest.CopyFrom(re_pb2.Digest(hash="ab" * 32,
                                                      size_bytes=MAX_COMMAND_BYTES + 1))
    outcome = _run(pipeline_rig, task)
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT, outcome.status
    assert "Action.command_digest: the Command is" in outcome.status.message
    assert f"more than the {MAX_COMMAND_BYTES} allowed" in outcome.status.message


def test_a_directory_past_its_cap_is_refused_before_it_is_read(pipeline_rig):
    b = pipeline_rig.blobs
    root = re_pb2.Directory()
    root.directories.add(name="huge", digest=re_pb2.Digest(
        hash="cd" * 32, size_bytes=MAX_DIRECTORY_BYTES + 1))
    root_digest = b.put(root.SerializeToString())
    outcome = pipeline_rig.run(["/bin/true"], env=ENV, input_root=root_digest)
    assert outcome.status.code in (code_pb2.INVALID_ARGUMENT,
                                   code_pb2.FAILED_PRECONDITION), outcome.status
    assert f"more than the {MAX_DIRECTORY_BYTES} allowed" in outcome.status.message
    task = pipeline_rig.task(["/bin/true"], env=ENV)
    task.action.input_root_digest.CopyFrom(re_pb2.Digest(
        hash="ef" * 32, size_bytes=MAX_DIRECTORY_BYTES + 1))
    outcome = _run(pipeline_rig, task)
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT, outcome.status
    assert "Action.input_root_digest: the Directory is" in outcome.status.message


def _run(rig, task):
    import asyncio

    return asyncio.run(rig.execute(task))
