"""Actions through the in-process pipeline (tests/pipeline/conftest.py): the whole path from
a task to its outcome (fetch, stage, run, collect) in milliseconds, without Stoker."""

from __future__ import annotations

import os
import time

from google.rpc import code_pb2

from engine import digest as digests
from tests.pipeline.conftest import PipelineRig
from tests.worker.worker_helpers import FN, dg


def test_stdout_stderr_and_exit_code_come_back(pipeline_rig: PipelineRig):
    outcome = pipeline_rig.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert outcome.ok and not outcome.retry, outcome.status
    assert outcome.result.exit_code == 3
    assert pipeline_rig.read(outcome.result.stdout_digest) == b"out\n"
    assert pipeline_rig.read(outcome.result.stderr_digest) == b"err\n"


def test_an_output_file_is_collected_into_the_store_by_its_digest(pipeline_rig: PipelineRig):
    blobs = pipeline_rig.blobs
    root = blobs.directory(dirs=[("src", blobs.directory(files=[("in.txt", b"hello\n",
                                                                  False)]))])
    outcome = pipeline_rig.run(["/bin/sh", "-c", "mkdir -p out && tr a-z A-Z < src/in.txt "
                                "> out/up.txt && chmod +x out/up.txt"],
                               input_root=root, output_paths=["out/up.txt"])
    assert outcome.ok and outcome.result.exit_code == 0, \
        pipeline_rig.read(outcome.result.stderr_digest)
    [out] = outcome.result.output_files
    assert out.path == "out/up.txt" and out.is_executable
    assert dg(out.digest) == digests.of_bytes(FN, b"HELLO\n")
    assert pipeline_rig.read(out.digest) == b"HELLO\n"


def test_a_missing_working_directory_is_invalid_argument(pipeline_rig: PipelineRig):
    outcome = pipeline_rig.run(["/bin/true"], working_directory="no/such/dir")
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT
    assert "working_directory" in outcome.status.message and not outcome.retry


def test_a_timeout_is_deadline_exceeded_and_ends_the_action(pipeline_rig: PipelineRig):
    start = time.monotonic()
    outcome = pipeline_rig.run(["/bin/sh", "-c", "echo started; sleep 30"], timeout_s=0.3)
    assert time.monotonic() - start < 10
    assert outcome.status.code == code_pb2.DEADLINE_EXCEEDED
    assert "timed out" in outcome.status.message
    assert pipeline_rig.read(outcome.result.stdout_digest) == b"started\n"  # partial result


def test_the_action_runs_as_a_slot_uid_when_stoker_is_root(pipeline_rig: PipelineRig):
    outcome = pipeline_rig.run(["/bin/sh", "-c", "id -u; id -g"])
    assert outcome.ok and outcome.result.exit_code == 0, \
        pipeline_rig.read(outcome.result.stderr_digest)
    uid, gid = (int(x) for x in pipeline_rig.read(outcome.result.stdout_digest).split())
    if os.geteuid() == 0:
        assert uid in pipeline_rig.identities.uids and gid == uid
    else:
        assert (uid, gid) == (os.geteuid(), os.getegid())


def test_an_action_writing_to_its_input_never_changes_the_cached_blob(make_pipeline_rig):
    # As root, run_as auto hardlinks inputs the slot uid cannot write; run_as self (what
    # every action gets when Stoker is not root) stages copies instead.
    for run_as in ("auto", "self"):
        rig = make_pipeline_rig(run_as=run_as)
        root = rig.blobs.directory(files=[("in.txt", b"original\n", False)])
        outcome = rig.run(["/bin/sh", "-c", "chmod u+w in.txt; echo changed > in.txt; "
                           "cat in.txt"], input_root=root)
        assert outcome.ok, outcome.status
        blob = digests.of_bytes(FN, b"original\n")
        assert rig.store.read_bytes(blob) == b"original\n", run_as
        with open(rig.store.blob_path(blob), "rb") as f:
            assert f.read() == b"original\n", run_as
