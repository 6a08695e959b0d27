"""Execute, WaitExecution and Operations against a running Stoker: stages, outputs, the
action cache's part in execution, timeouts, the environment and the working directory."""

from __future__ import annotations

import queue
import socket
import threading
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from engine.proto import operations_pb2, re_pb2
from tests.integration.support import (
    BLAKE3,
    File,
    Symlink,
    command,
    digest_of,
    key,
    metadata,
    response_of,
)

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED
TIMESTAMPS = [  # the order the phases happen in
    "queued_timestamp",
    "worker_start_timestamp",
    "input_fetch_start_timestamp",
    "input_fetch_completed_timestamp",
    "execution_start_timestamp",
    "execution_completed_timestamp",
    "output_upload_start_timestamp",
    "output_upload_completed_timestamp",
    "worker_completed_timestamp",
]


def ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToNanoseconds()


def assert_ok(execution) -> re_pb2.ActionResult:
    response = execution.response
    assert response.status.code == 0, response.status
    return response.result


def test_execute_output_paths_stages_and_metadata(client):
    tool = File(b"#!/bin/sh\necho tool ran with $1\n", executable=True)
    inputs = {"src": {"in.txt": b"hello input\n"}, "tool.sh": tool,
              "link": Symlink("src/in.txt")}
    script = """set -e
        mkdir -p out/dir/sub
        cat link > out/file.txt
        printf '#!/bin/sh\\necho made\\n' > out/made.sh
        chmod 755 out/made.sh
        echo a > out/dir/a.txt
        echo b > out/dir/sub/b.txt
        ln -s a.txt out/dir/to-a
        ln -s dir/a.txt out/sym
        ./tool.sh arg1
        echo to-stderr >&2"""
    started = time.time_ns()
    ex = client.run(script, inputs, output_paths=["out/file.txt", "out/made.sh", "out/dir",
                                                  "out/sym", "out/absent"])
    finished = time.time_ns()

    # The stream: one operation name, the action's digest in every metadata, stages in order.
    assert len({op.name for op in ex.operations}) == 1 and ex.operations[0].name
    assert all(key(metadata(op).action_digest) == key(ex.action_digest) for op in ex.operations)
    # QUEUED always comes first; EXECUTING may be passed over when the action is that fast.
    assert ex.stages[0] == QUEUED and ex.stages[-1] == COMPLETED
    assert ex.stages == sorted(set(ex.stages)), ex.stages
    assert [op.done for op in ex.operations] == [False] * (len(ex.operations) - 1) + [True]

    response = ex.response
    assert not response.cached_result
    result = assert_ok(ex)
    assert result.exit_code == 0
    assert client.read(result.stdout_digest) == b"tool ran with arg1\n"
    assert client.read(result.stderr_digest) == b"to-stderr\n"

    files = {f.path: f for f in result.output_files}
    assert set(files) == {"out/file.txt", "out/made.sh"}
    assert client.read(files["out/file.txt"].digest) == b"hello input\n"
    assert not files["out/file.txt"].is_executable
    assert client.read(files["out/made.sh"].digest) == b"#!/bin/sh\necho made\n"
    assert files["out/made.sh"].is_executable
    assert [(s.path, s.target) for s in result.output_symlinks] == [("out/sym", "dir/a.txt")]

    (out_dir,) = result.output_directories
    assert out_dir.path == "out/dir"
    tree = client.output_tree(out_dir.tree_digest)
    assert key(digest_of(tree.root.SerializeToString())) == key(out_dir.root_directory_digest)
    assert [(f.name, client.read(f.digest)) for f in tree.root.files] == [("a.txt", b"a\n")]
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("to-a", "a.txt")]
    assert [d.name for d in tree.root.directories] == ["sub"]
    (sub,) = tree.children
    assert key(digest_of(sub.SerializeToString())) == key(tree.root.directories[0].digest)
    assert [(f.name, client.read(f.digest)) for f in sub.files] == [("b.txt", b"b\n")]

    md = result.execution_metadata
    assert md.worker == f"{socket.gethostname()}-0"
    stamps = [ns(getattr(md, name)) for name in TIMESTAMPS]
    assert all(stamps), dict(zip(TIMESTAMPS, stamps, strict=True))
    assert stamps == sorted(stamps), dict(zip(TIMESTAMPS, stamps, strict=True))
    assert started - 1_000_000_000 <= stamps[0] and stamps[-1] <= finished + 1_000_000_000


def test_execute_legacy_output_fields(client):
    script = """set -e
        echo prog > bin/prog
        chmod +x bin/prog
        echo log > log.txt
        ln -s log.txt log-link
        mkdir gen gen/deep
        echo g > gen/deep/g.txt
        ln -s gen gen-link"""
    ex = client.run(script, {}, output_files=["bin/prog", "log.txt", "log-link", "missing"],
                    output_directories=["gen", "gen-link", "nothing"])
    result = assert_ok(ex)
    files = {f.path: f for f in result.output_files}
    assert set(files) == {"bin/prog", "log.txt"}  # the parent bin/ was made for the action
    assert files["bin/prog"].is_executable and not files["log.txt"].is_executable
    assert client.read(files["log.txt"].digest) == b"log\n"
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("log-link", "log.txt")]
    assert [(s.path, s.target) for s in result.output_directory_symlinks] == [("gen-link",
                                                                               "gen")]
    (gen,) = result.output_directories
    assert gen.path == "gen"
    tree = client.output_tree(gen.tree_digest)
    assert [d.name for d in tree.root.directories] == ["deep"]
    assert [(f.name, client.read(f.digest)) for f in tree.children[0].files] == [("g.txt",
                                                                                  b"g\n")]
    assert not result.output_symlinks  # that field is for output_paths


def test_exit_code_is_a_result_and_not_cached(client):
    ex = client.run("echo before; echo oops >&2; exit 7", {})
    result = assert_ok(ex)  # a failing command is still a successful execution
    assert result.exit_code == 7
    assert client.read(result.stdout_digest) == b"before\n"
    assert client.read(result.stderr_digest) == b"oops\n"
    with pytest.raises(grpc.RpcError) as e:
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=ex.action_digest),
                                  timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    again = client.execute(ex.action_digest)
    assert not again.response.cached_result
    assert again.result.exit_code == 7


def test_cache_hit_then_skip_cache_lookup(client):
    cmd = command(["/bin/sh", "-c", "date +%s%N; echo out > o.txt"], output_files=["o.txt"])
    action = client.action(cmd, client.put_tree({}).root)
    first = client.execute(action)
    assert not first.response.cached_result
    first_result = assert_ok(first)

    hit = client.execute(action)
    assert hit.response.cached_result
    assert hit.stages == [COMPLETED]
    assert hit.result == first_result
    stored = client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action),
                                       timeout=10)
    assert stored == first_result

    forced = client.execute(action, skip_cache_lookup=True)
    assert not forced.response.cached_result
    forced_result = assert_ok(forced)
    # It really ran again: a later start, and `date` printed another time.
    assert ns(forced_result.execution_metadata.execution_start_timestamp) > \
        ns(first_result.execution_metadata.execution_completed_timestamp)
    assert forced_result.stdout_digest != first_result.stdout_digest
    stored = client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action),
                                       timeout=10)
    assert stored == forced_result


def test_do_not_cache(client):
    cmd = command(["/bin/sh", "-c", "date +%s%N"])
    action = client.action(cmd, client.put_tree({}).root, do_not_cache=True)
    first = client.execute(action)
    assert_ok(first)
    second = client.execute(action)
    assert not second.response.cached_result
    assert ns(second.result.execution_metadata.execution_start_timestamp) > \
        ns(first.result.execution_metadata.execution_completed_timestamp)
    with pytest.raises(grpc.RpcError) as e:
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action),
                                  timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert action.hash in e.value.details()


def test_wait_execution_and_get_operation(client):
    cmd = command(["/bin/sh", "-c", "sleep 1; echo waited"])
    action = client.action(cmd, client.put_tree({}).root)
    call = client.exe.Execute(re_pb2.ExecuteRequest(action_digest=action), timeout=30)
    first = next(call)
    call.cancel()  # the client goes away; the operation carries on
    assert not first.done
    name = first.name

    op = client.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    assert op.name == name and not op.done
    assert metadata(op).stage in (QUEUED, EXECUTING)
    assert key(metadata(op).action_digest) == key(action)

    ops = list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name), timeout=30))
    assert {o.name for o in ops} == {name}
    assert ops[-1].done and metadata(ops[-1]).stage == COMPLETED
    response = response_of(ops[-1])
    assert response.status.code == 0
    assert client.read(response.result.stdout_digest) == b"waited\n"

    done = client.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    assert done.done and response_of(done) == response
    # Waiting on a finished operation answers at once.
    again = list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name), timeout=10))
    assert len(again) == 1 and response_of(again[0]) == response

    for call_unknown in (
        lambda: client.ops.GetOperation(operations_pb2.GetOperationRequest(name="no-such-op"),
                                        timeout=10),
        lambda: list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name="no-such-op"),
                                              timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call_unknown()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-op" in e.value.details()


def _execute_in_thread(client, action, stages: queue.Queue) -> threading.Thread:
    def run():
        try:
            for op in client.exe.Execute(re_pb2.ExecuteRequest(action_digest=action),
                                         timeout=30):
                stages.put(metadata(op).stage)
        except grpc.RpcError as e:
            stages.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_queued_then_executing_then_completed(client):
    """With the worker's two slots busy, a third action is seen in each stage in turn."""
    root = client.put_tree({}).root
    busy = [client.action(command(["/bin/sleep", "1.5"]), root) for _ in range(2)]
    watchers = []
    for action in busy:
        q: queue.Queue = queue.Queue()
        watchers.append((_execute_in_thread(client, action, q), q))
    for _, q in watchers:  # both running before the third comes
        while (stage := q.get(timeout=20)) != EXECUTING:
            assert stage == QUEUED, stage
    third = client.execute(client.action(command(["/bin/echo", "third"]), root))
    assert third.stages == [QUEUED, EXECUTING, COMPLETED]
    assert client.read(third.result.stdout_digest) == b"third\n"
    for t, _ in watchers:
        t.join(timeout=20)


def test_identical_actions_in_flight_share_one_operation(client):
    action = client.action(command(["/bin/sh", "-c", "sleep 0.5; date +%s%N"]),
                           client.put_tree({}).root)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(client.execute(action)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2
    assert results[0].last.name == results[1].last.name
    assert results[0].response == results[1].response


def test_action_timeout_keeps_partial_output(client):
    script = "echo partial-output; echo partial-error >&2; sleep 30; echo never"
    t0 = time.monotonic()
    ex = client.run(script, {}, timeout=1.0)
    assert time.monotonic() - t0 < 15
    response = ex.response
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], response.status
    assert "timed out after 1s" in response.status.message
    assert client.read(response.result.stdout_digest) == b"partial-output\n"
    assert client.read(response.result.stderr_digest) == b"partial-error\n"
    with pytest.raises(grpc.RpcError) as e:
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=ex.action_digest),
                                  timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _env_of(client, ex) -> dict[str, str]:
    result = assert_ok(ex)
    assert result.exit_code == 0, client.read(result.stderr_digest)
    out = client.read(result.stdout_digest)
    return dict(item.split("=", 1) for item in out.decode().split("\0") if item)


def test_environment_is_exactly_the_commands(client):
    env = {"PATH": "/usr/bin:/bin", "A": "1", "WITH_SPACES": "x y = z", "EMPTY": "",
           "TMPDIR": "/tmp", "LANG": "C"}
    assert _env_of(client, client.run(["/usr/bin/env", "-0"], {}, env=env)) == env


def test_environment_only_adds_tmpdir(client, stoker):
    got = _env_of(client, client.run(["/usr/bin/env", "-0"], {}, env={"ONLY": "this"}))
    tmpdir = got.pop("TMPDIR")
    assert got == {"ONLY": "this"}
    # A private directory beside the exec root, not the machine's /tmp.
    assert tmpdir.startswith(str(stoker.build_dir) + "/"), tmpdir


def test_working_directory(client):
    inputs = {"sub": {"dir": {"f.txt": b"hi from sub/dir\n"}}, "top.txt": b"top\n"}
    script = "set -e; pwd; cat f.txt; cat ../../top.txt; echo made > made.txt; " \
             "mkdir o; echo d > o/x"
    ex = client.run(script, inputs, working_directory="sub/dir", output_files=["made.txt"],
                    output_directories=["o"])
    result = assert_ok(ex)
    assert result.exit_code == 0, client.read(result.stderr_digest)
    cwd, *rest = client.read(result.stdout_digest).decode().splitlines()
    assert cwd.endswith("/root/sub/dir"), cwd
    assert rest == ["hi from sub/dir", "top"]
    # Output paths are relative to the working directory.
    assert [(f.path, client.read(f.digest)) for f in result.output_files] == [("made.txt",
                                                                               b"made\n")]
    assert [d.path for d in result.output_directories] == ["o"]


def test_execute_with_blake3(client):
    inputs = {"in.txt": b"blake3 input\n"}
    ex = client.run("cat in.txt > out.txt; echo done", inputs, fn=BLAKE3,
                    output_files=["out.txt"])
    result = assert_ok(ex)
    assert client.read(result.stdout_digest, BLAKE3) == b"done\n"
    (out,) = result.output_files
    assert key(out.digest) == key(digest_of(b"blake3 input\n", BLAKE3))
    assert client.read(out.digest, BLAKE3) == b"blake3 input\n"
    hit = client.execute(ex.action_digest, fn=BLAKE3)
    assert hit.response.cached_result
