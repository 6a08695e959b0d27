"""The ActionCache service over real gRPC: what UpdateActionResult accepts (only what Stoker
could have produced: engine/server/action_result_check.py), who may write
(executor.action_cache_writes), and what survives a Stoker restart (its own instance)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine import transport
from engine.cas.remote_wire import varint
from engine.proto import re_pb2
from tests.integration.support import (
    CLIENT_OPTIONS,
    Client,
    StokerProcess,
    command,
    digest_of,
    key,
    start,
)


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


def _update(client: Client, result: re_pb2.ActionResult,
            action: re_pb2.Digest | None = None) -> re_pb2.ActionResult:
    return client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action or digest_of(b"an action " + uuid.uuid4().bytes),
        action_result=result), timeout=30)


def _refused(client: Client, result: re_pb2.ActionResult, *needles: str,
             code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """UpdateActionResult fails with code, its message holding every needle, and nothing is
    stored."""
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    with pytest.raises(grpc.RpcError) as e:
        _update(client, result, action)
    assert e.value.code() == code, e.value.details()
    for needle in needles:
        assert needle in e.value.details(), (needle, e.value.details())
    with pytest.raises(grpc.RpcError) as gone:
        _get(client, action)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    return e.value.details()


def _tree_result(client: Client, tree: bytes) -> re_pb2.ActionResult:
    result = re_pb2.ActionResult()
    result.output_directories.add(path="out/dir", tree_digest=client.put(tree))
    return result


def _message_digest(msg) -> re_pb2.Digest:
    return digest_of(msg.SerializeToString())


def _absent() -> re_pb2.Digest:
    return digest_of(b"never stored " + uuid.uuid4().bytes)


def test_a_valid_result_with_every_kind_of_output_round_trips(client):
    sub = re_pb2.Directory()
    sub.files.add(name="f.txt", digest=client.put(b"in the tree " + uuid.uuid4().bytes))
    root = re_pb2.Directory()
    root.directories.add(name="sub", digest=_message_digest(sub))
    root.symlinks.add(name="up", target="../elsewhere")
    result = _tree_result(client, re_pb2.Tree(root=root, children=[sub]).SerializeToString())
    result.output_directories.add(path="", tree_digest=client.put(
        re_pb2.Tree(root=re_pb2.Directory()).SerializeToString()))
    result.output_files.add(path="out/a.txt", digest=client.put(b"a"), is_executable=True)
    result.output_symlinks.add(path="out/link", target="/usr/bin/env")
    result.output_file_symlinks.add(path="out/link", target="/usr/bin/env")  # v2.0 mirror
    result.output_directory_symlinks.add(path="out/dlink", target="dir")
    result.stdout_digest.CopyFrom(client.put(b"stdout"))
    result.stderr_digest.CopyFrom(digest_of(b""))
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    assert _update(client, result, action) == result
    assert _get(client, action) == result


@pytest.mark.parametrize("path", ["../../tmp/x", "a/../../b", "..", "a//b", "a/", ".",
                                  "./a", "a/./b", "/tmp/x", "/", "a\0b", ""])
@pytest.mark.parametrize("field", ["output_files", "output_directories", "output_symlinks",
                                   "output_file_symlinks", "output_directory_symlinks"])
def test_output_paths_must_be_normalized_and_relative(client, field, path):
    if field == "output_directories" and path == "":
        pytest.skip("'' is the working directory, which REAPI allows an output directory")
    result = re_pb2.ActionResult()
    for p in ("ok", path):
        if field == "output_files":
            result.output_files.add(path=p, digest=client.put(b"file"))
        elif field == "output_directories":
            result.output_directories.add(path=p, tree_digest=client.put(
                re_pb2.Tree(root=re_pb2.Directory()).SerializeToString()))
        else:
            getattr(result, field).add(path=p, target="t")
    _refused(client, result, f"action_result.{field}[1].path: {path!r} is not a normalized "
             "relative path")


def test_two_outputs_with_one_path_are_refused(client):
    result = re_pb2.ActionResult()
    result.output_files.add(path="out/x", digest=client.put(b"file"))
    result.output_directory_symlinks.add(path="out/x", target="y")
    _refused(client, result, "action_result.output_directory_symlinks[0].path: 'out/x' is "
             "also the path of action_result.output_files[0]")


@pytest.mark.parametrize("target", ["", "a\0b"])
def test_symlink_targets_must_be_set_and_free_of_nul(client, target):
    result = re_pb2.ActionResult()
    result.output_symlinks.add(path="l", target=target)
    _refused(client, result, "action_result.output_symlinks[0].target: the symlink target")


@pytest.mark.parametrize(("build", "field"), [
    (lambda c, r: r.output_files.add(path="f", digest=_absent()), "output_files[1].digest"),
    (lambda c, r: r.stdout_digest.CopyFrom(_absent()), "action_result.stdout_digest"),
    (lambda c, r: r.stderr_digest.CopyFrom(_absent()), "action_result.stderr_digest"),
    (lambda c, r: r.output_directories.add(path="d", tree_digest=_absent()),
     "output_directories[0].tree_digest"),
    (lambda c, r: r.output_directories.add(path="d", tree_digest=c.put(re_pb2.Tree(
        root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=_absent())]))
        .SerializeToString())), "output_directories[0].tree_digest: a file of the Tree"),
])
def test_a_result_naming_an_absent_blob_is_refused(client, build, field):
    result = _result_with(client.put(b"an output " + uuid.uuid4().bytes))
    build(client, result)
    _refused(client, result, field, "is not in the CAS",
             code=grpc.StatusCode.FAILED_PRECONDITION)


def _chain(client: Client, depth: int) -> bytes:
    """A Tree of `depth` nested directories d/d/d/..., a file at the bottom."""
    bottom = re_pb2.Directory()
    bottom.files.add(name="f", digest=client.put(b"at the bottom"))
    dirs = [bottom]
    for _ in range(depth):
        dirs.append(re_pb2.Directory(directories=[re_pb2.DirectoryNode(
            name="d", digest=_message_digest(dirs[-1]))]))
    return re_pb2.Tree(root=dirs[-1], children=dirs[-2::-1]).SerializeToString()


def _named(name: str) -> bytes:
    sub = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name=name, target="t")])
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="sub", digest=_message_digest(sub))])
    return re_pb2.Tree(root=root, children=[sub]).SerializeToString()


@pytest.mark.parametrize(("tree", "needles"), [
    (lambda c: b"\x08\x01", ["not a Tree"]),
    (lambda c: b"\x0a\x02\x08\x01", ["the root: not a Directory"]),
    (lambda c: b"\x0a" + varint(400_002) + b"\x0a\x00" * 200_001,  # empty FileNodes
     ["the root: more than the 200000 entries allowed in one directory"]),
    (lambda c: _chain(c, 257), ["nested more than 256 levels deep"]),
    (lambda c: _named(".."), ["directory 'sub': entry name '..' is not valid"]),
    (lambda c: _named("a/b"), ["directory 'sub': entry name 'a/b' is not valid"]),
    (lambda c: _named(""), ["directory 'sub': entry name '' is not valid"]),
], ids=["not-a-tree", "root-not-a-directory", "wide", "deep", "dotdot", "slash", "empty"])
def test_bad_trees_are_refused(client, tree, needles):
    _refused(client, _tree_result(client, tree(client)),
             "action_result.output_directories[0].tree_digest: ", *needles)


def test_the_deepest_allowed_tree_is_accepted(client):
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    result = _tree_result(client, _chain(client, 256))
    _update(client, result, action)
    assert _get(client, action) == result


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


# ---- a Tree bomb, and who may write: instances of their own ------------------------------

KEY = "stoker-it-ac-writer-key-4b1d"


def _high_water_kib(process: StokerProcess) -> int:
    """The server process's peak resident memory so far (VmHWM)."""
    pid = int((process.data_dir / "run" / "server.pid").read_text().strip())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _config(base_dir: Path, name: str, writes: str) -> str:
    path = base_dir / f"{name}.yaml"
    path.write_text(f"executor:\n  action_cache_writes: {writes}\n")
    return str(path)


@pytest.fixture(scope="module")
def keyed(base_dir: Path) -> Iterator[StokerProcess]:
    """action_cache_writes: keyed, with API keys."""
    keys = base_dir / "ac-keys"
    keys.write_text(f"{KEY}\n")
    keys.chmod(0o600)
    process = StokerProcess(
        base_dir / "ac-keyed", base_dir / "ac-keyed.log",
        extra_args=["--api-key-file", str(keys),
                    "--config", _config(base_dir, "ac-keyed", "keyed")],
        metadata=((transport.API_KEY_HEADER, KEY),))
    start(process)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed_client(keyed: StokerProcess) -> Iterator[Client]:
    client = Client(keyed.address, channel=transport.open_sync_channel(
        f"grpc://{keyed.address}", api_key=KEY, options=CLIENT_OPTIONS))
    yield client
    client.close()


def test_a_tree_bomb_is_refused_fast_with_bounded_memory(keyed, keyed_client):
    """2 million empty children in 4 MB: parsed and walked, that is ~1.2 GB (Stoker used to
    store it and pay that on every lookup); counted on the wire, it is refused at once."""
    client = keyed_client
    result = _tree_result(client, b"\x12\x00" * 2_000_000)
    before = _high_water_kib(keyed)
    started = time.monotonic()
    message = _refused(client, result, "output_directories[0].tree_digest: the Tree has more "
                       "than 1000000 children")
    took = time.monotonic() - started
    grew = _high_water_kib(keyed) - before
    assert took < 5.0, (took, message)
    assert grew < 200 * 1024, f"the server's peak memory grew by {grew} KiB"
    assert keyed.alive()


def test_keyed_callers_write_and_others_are_turned_away(keyed, keyed_client):
    action = digest_of(b"an action " + uuid.uuid4().bytes)
    result = _result_with(keyed_client.put(b"a keyed output " + uuid.uuid4().bytes))
    assert _update(keyed_client, result, action) == result
    assert _get(keyed_client, action) == result
    with grpc.insecure_channel(keyed.address) as channel:  # no key
        with pytest.raises(grpc.RpcError) as e:
            Client(keyed.address, channel=channel).ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(action_digest=action,
                                                 action_result=result), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("writes", "why"), [
    ("keyed", "executor.action_cache_writes is keyed and this server has no API keys"),
    ("none", "(executor.action_cache_writes: none)"),
])
def test_without_a_key_writes_are_denied_yet_executions_are_cached(stoker_factory, base_dir,
                                                                   writes, why):
    process = start(stoker_factory(f"ac-writes-{writes}", extra_args=[
        "--config", _config(base_dir, f"ac-writes-{writes}", writes)]))
    client = Client(process.address)
    try:
        action = digest_of(b"an action " + uuid.uuid4().bytes)
        result = _result_with(client.put(b"an output " + uuid.uuid4().bytes))
        with pytest.raises(grpc.RpcError) as e:
            _update(client, result, action)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert why in e.value.details()
        with pytest.raises(grpc.RpcError) as gone:
            _get(client, action)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        # Stoker's own results are still cached, through the same checks.
        cmd = command(["/bin/sh", "-c", "mkdir -p d/e && echo x > d/e/f && echo y > o"],
                      output_paths=["d", "o"])
        executed = client.action(cmd, client.put_tree({}).root)
        first = client.execute(executed)
        assert first.response.status.code == 0 and not first.response.cached_result
        assert _get(client, executed) == first.result
        assert client.execute(executed).response.cached_result
    finally:
        client.close()
