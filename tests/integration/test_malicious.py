"""Hostile input over raw gRPC: every request gets a clear status naming the field or problem,
nothing outside the exec root changes (the sentinel next to the data directory stays as it
was, no canary file appears outside data/build, no secret reaches the CAS), and the server
keeps serving.

The actions here run as 'nobody' without a filesystem sandbox (the bare runner), so a
command could always write to a world-writable directory by its absolute path. What these
tests check is that Stoker itself never creates, follows or uploads anything outside the
exec root on a client's behalf: the commands only write through the hostile structures.
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest
import zstandard
from google.protobuf import duration_pb2

from engine.proto import bs_pb2, operations_pb2, re_pb2
from tests.integration.support import (
    BLAKE3,
    CANARY,
    MAX_BATCH,
    SECRET,
    UP_TO_BASE,
    UP_TO_SLASH,
    File,
    Symlink,
    blob_resource,
    command,
    digest_of,
    key,
    precondition_failure,
    status_of,
)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
AC = "/build.bazel.remote.execution.v2.ActionCache/"
EXECUTION = "/build.bazel.remote.execution.v2.Execution/"
BYTESTREAM = "/google.bytestream.ByteStream/"
SECRET_DIGEST = digest_of(SECRET)


@pytest.fixture(autouse=True)
def _guarded(no_escape, client):
    yield
    # The server answers a normal call after every attack, and never stored the secret.
    assert client.missing([SECRET_DIGEST, digest_of(b"")]) == {key(SECRET_DIGEST)}


@pytest.fixture(scope="module", autouse=True)
def _secret_unreadable_by_actions(sentinel):
    # Readable by Stoker (root) only: it reaches the CAS only if Stoker follows a link out.
    (sentinel / "secret.txt").chmod(0o600)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def assert_invalid(err: grpc.RpcError, *needles: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for needle in needles:
        assert needle in err.details(), (needle, err.details())
    # The same status travels as a google.rpc.Status for clients that read details.
    status = status_of(err)
    assert status.code == INVALID_ARGUMENT and status.message == err.details()


def assert_not_run(response: re_pb2.ExecuteResponse, code: int, *needles: str) -> None:
    """The execution failed with code before the command ran."""
    assert response.status.code == code, response.status
    for needle in needles:
        assert needle in response.status.message, (needle, response.status.message)
    assert not response.result.HasField("stdout_digest"), "the command ran"
    assert not response.cached_result


# ---- malformed messages ---------------------------------------------------------------------

GARBAGE = [
    b"\xff\xff\xff\xff",  # a tag with wire type 7
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\x0a\x05ab",  # truncated string
    b"\x0a\x01\xff",  # field 1 (a string everywhere below) that is not UTF-8
]
UNARY = [CAS + "FindMissingBlobs", CAS + "BatchUpdateBlobs", CAS + "BatchReadBlobs",
         AC + "GetActionResult", AC + "UpdateActionResult",
         "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
         BYTESTREAM + "QueryWriteStatus", "/google.longrunning.Operations/GetOperation"]
SERVER_STREAMING = [EXECUTION + "Execute", EXECUTION + "WaitExecution", CAS + "GetTree",
                    BYTESTREAM + "Read"]


@pytest.mark.parametrize("garbage", GARBAGE, ids=["wiretype7", "overlong", "truncated",
                                                  "not-utf8"])
def test_garbage_bytes(client, garbage):
    """Raw bytes through identity serializers to every method."""
    for method in UNARY:
        call = client.channel.unary_unary(method)
        err = rpc_error(lambda call=call: call(garbage, timeout=10))
        assert_invalid(err, "malformed request", "Error parsing message")
    for method in SERVER_STREAMING:
        call = client.channel.unary_stream(method)
        err = rpc_error(lambda call=call: list(call(garbage, timeout=10)))
        assert_invalid(err, "malformed request", "Error parsing message")
    write = client.channel.stream_unary(BYTESTREAM + "Write")
    err = rpc_error(lambda: write(iter([garbage]), timeout=10))
    assert_invalid(err, "malformed request", "google.bytestream.WriteRequest")
    # Garbage after a good first message of a stream.
    data = uuid.uuid4().bytes * 4
    first = bs_pb2.WriteRequest(resource_name=blob_resource(digest_of(data), upload="u1"),
                                data=data[:10]).SerializeToString()
    err = rpc_error(lambda: write(iter([first, garbage]), timeout=10))
    assert_invalid(err, "malformed request")


def test_unknown_method(client):
    err = rpc_error(lambda: client.channel.unary_unary(CAS + "DropAllBlobs")(b"", timeout=10))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- hostile input trees --------------------------------------------------------------------


def raw_directory(client, *, files=(), dirs=(), links=(), fn=re_pb2.DigestFunction.SHA256):
    """Upload a Directory with its entries exactly as given (order and names unchecked);
    files are (name, data) and are uploaded too. Returns its digest."""
    d = re_pb2.Directory()
    for name, data in files:
        d.files.add(name=name, digest=client.put(data, fn))
    for name, digest in dirs:
        d.directories.add(name=name, digest=digest)
    for name, target in links:
        d.symlinks.add(name=name, target=target)
    return client.put_message(d, fn)


def run_root(client, root, script: str, **command_fields) -> re_pb2.ExecuteResponse:
    cmd = command(["/bin/sh", "-c", script], **command_fields)
    return client.execute(client.action(cmd, root)).response


def chain_to_sentinel(client, name: str):
    """name/name/.../sentinel/CANARY: five levels of `name`, as '..' would have to be."""
    d = raw_directory(client, files=[(CANARY, b"planted by staging\n")])
    d = raw_directory(client, dirs=[("sentinel", d)])
    for _ in range(5):
        d = raw_directory(client, dirs=[(name, d)])
    return d


PLANT = f"echo pwned > {CANARY}"  # harmless where it runs: the exec root


def test_escape_paths_lead_to_the_sentinel(client, sentinel):
    """The attacks below climb UP_TO_BASE from the exec root: check that, seen from the host
    (where Stoker stages and collects), it does lead to the sentinel, so that an escape would
    really have touched it. (The action itself no longer sees it where its exec root is under
    /tmp: its /tmp is private, with only its own directories bound in.)"""
    response = client.run("pwd", {}).response
    [cwd] = client.read(response.result.stdout_digest).decode().splitlines()
    assert os.path.normpath(os.path.join(cwd, UP_TO_BASE, "sentinel")) == str(sentinel)
    assert os.listdir(sentinel) == ["secret.txt"]


@pytest.mark.parametrize(("make_root", "needle"), [
    (lambda c: raw_directory(c, files=[("", b"x")]), "invalid entry name ''"),
    (lambda c: raw_directory(c, files=[(".", b"x")]), "invalid entry name '.'"),
    (lambda c: raw_directory(c, files=[("..", b"x")]), "invalid entry name '..'"),
    (lambda c: raw_directory(c, dirs=[(".", c.put_tree({}).root)]),
     "invalid entry name '.'"),
    (lambda c: chain_to_sentinel(c, ".."), "invalid entry name '..'"),
    (lambda c: raw_directory(c, files=[(UP_TO_BASE + "sentinel/" + CANARY, b"x")]),
     "invalid entry name '../"),
    (lambda c: raw_directory(c, files=[(UP_TO_SLASH + "tmp/" + CANARY, b"x")]),
     "invalid entry name '../"),
    (lambda c: raw_directory(c, files=[("/tmp/" + CANARY, b"x")]),
     f"invalid entry name '/tmp/{CANARY}'"),
    (lambda c: raw_directory(c, files=[("a/b", b"x")]), "invalid entry name 'a/b'"),
    (lambda c: raw_directory(c, files=[("nul\0byte", b"x")]), "invalid entry name"),
    (lambda c: raw_directory(c, links=[("..", "x")]), "invalid entry name '..'"),
    (lambda c: raw_directory(c, dirs=[("ok", raw_directory(c, files=[("..", b"x")]))]),
     "input root/ok: invalid entry name '..'"),
])
def test_bad_entry_names(client, make_root, needle):
    response = run_root(client, make_root(client), PLANT)
    assert_not_run(response, INVALID_ARGUMENT, needle)


@pytest.mark.parametrize(("entries", "needle"), [
    ({"files": [("b", b"1"), ("a", b"2")]}, "file 'a' not sorted by name"),
    ({"files": [("a", b"1"), ("a", b"2")]}, "file 'a' duplicated"),
    ({"links": [("z", "a"), ("y", "b")]}, "symlink 'y' not sorted by name"),
    ({"links": [("s", "a"), ("s", "b")]}, "symlink 's' duplicated"),
    ({"files": [("x", b"1")], "links": [("x", UP_TO_BASE + "sentinel")]},
     "name 'x' is used by more than one entry"),
    ({"files": [("x", b"1")], "dirs": [("x", None)]}, "name 'x' is used by more than one"),
    ({"dirs": [("b", None), ("a", None)]}, "directory 'a' not sorted by name"),
    ({"dirs": [("d", None), ("d", None)]}, "directory 'd' duplicated"),
])
def test_unsorted_or_duplicate_entries(client, entries, needle):
    empty = client.put_tree({}).root
    dirs = [(n, empty) for n, _ in entries.get("dirs", ())]
    root = raw_directory(client, files=entries.get("files", ()), dirs=dirs,
                         links=entries.get("links", ()))
    assert_not_run(run_root(client, root, PLANT), INVALID_ARGUMENT, needle)


@pytest.mark.parametrize(("links", "needle"), [
    ([("esc", "SENTINEL")], "absolute symlink target"),
    ([("esc", "/")], "absolute symlink target '/'"),
    ([("esc", UP_TO_BASE + "sentinel")], "points outside the input root"),
    ([("esc", UP_TO_SLASH + "SENTINEL_REL")], "points outside the input root"),
    ([("esc", "..")], "points outside the input root"),
    ([("esc", "a/../../sentinel")], "points outside the input root"),
    ([("esc", "s/" + UP_TO_BASE + "sentinel"), ("s", ".")], "points outside the input root"),
    # Lexically inside, but 's' is '.' so 's/..' is the exec root's parent (and 't/..' its
    # grandparent).
    ([("esc", "s/.."), ("s", ".")], "points outside the input root"),
    ([("esc", "t/.."), ("t", "u/.."), ("u", ".")], "points outside the input root"),
])
def test_input_symlinks_escaping_the_exec_root(client, sentinel, links, needle):
    links = [(n, t.replace("SENTINEL_REL", str(sentinel)[1:]).replace("SENTINEL",
                                                                         str(sentinel)))
             for n, t in sorted(links)]
    root = raw_directory(client, links=links)
    response = run_root(client, root, f"echo pwned > esc/{CANARY}; cat esc/secret.txt")
    assert_not_run(response, INVALID_ARGUMENT, needle, "esc")


def test_input_symlink_in_a_subdirectory_escaping(client):
    inner = raw_directory(client, links=[("esc", "../../" + UP_TO_BASE + "sentinel")])
    root = raw_directory(client, dirs=[("a", raw_directory(client, dirs=[("b", inner)]))])
    response = run_root(client, root, f"echo pwned > a/b/esc/{CANARY}")
    assert_not_run(response, INVALID_ARGUMENT, "input root/a/b/esc", "outside the input root")


def test_symlinks_inside_the_root_are_fine(client):
    tree = client.put_tree({"d": {"f.txt": b"inside\n"}, "up": {"link": Symlink("../d/f.txt")},
                            "self": Symlink(".")})
    response = run_root(client, tree.root, "cat up/link self/d/f.txt")
    assert response.status.code == 0, response.status
    assert client.read(response.result.stdout_digest) == b"inside\ninside\n"


def test_input_tree_dag_bomb(client):
    """Thirty levels that each name the next Directory twice: 2^30 paths in 31 blobs."""
    d = client.put_tree({"f": b"x"}).root
    for _ in range(30):
        d = raw_directory(client, dirs=[("a", d), ("b", d)])
    t0 = time.monotonic()
    response = run_root(client, d, PLANT)
    assert time.monotonic() - t0 < 30
    assert_not_run(response, INVALID_ARGUMENT, "more than", "entries")


# ---- missing inputs -------------------------------------------------------------------------


def subjects(response: re_pb2.ExecuteResponse) -> set[str]:
    failure = precondition_failure(response.status)
    assert {v.type for v in failure.violations} == {"MISSING"}
    return {v.subject for v in failure.violations}


def subject(d: re_pb2.Digest, fn: str = "") -> str:
    return f"blobs/{fn}{d.hash}/{d.size_bytes}"


def absent(tag: str = "") -> tuple[bytes, re_pb2.Digest]:
    data = f"never uploaded {tag} {uuid.uuid4()}".encode()
    return data, digest_of(data)


def test_missing_files_and_command(client):
    _, f1 = absent("f1")
    _, f2 = absent("f2")
    sub = re_pb2.Directory()
    sub.files.add(name="deep.txt", digest=f2)
    sub_digest = client.put_message(sub)
    root = re_pb2.Directory()
    root.files.add(name="a.txt", digest=f1)
    root.files.add(name="present.txt", digest=client.put(b"present"))
    root.directories.add(name="sub", digest=sub_digest)
    cmd = command(["/bin/true"], env={"NONCE": str(uuid.uuid4())})
    cmd_digest = digest_of(cmd.SerializeToString())
    action = client.action(cmd, client.put_message(root), upload_command=False)
    response = client.execute(action).response
    assert_not_run(response, FAILED_PRECONDITION, "missing")
    assert subjects(response) == {subject(f1), subject(f2), subject(cmd_digest)}
    # Once uploaded, the same action runs.
    client.put(cmd.SerializeToString())
    again = client.execute(action).response
    assert subjects(again) == {subject(f1), subject(f2)}


def test_missing_directory_and_command(client):
    _, missing_dir = absent("dir")
    root = re_pb2.Directory()
    root.directories.add(name="gone", digest=missing_dir)
    cmd = command(["/bin/true"], env={"NONCE": str(uuid.uuid4())})
    cmd_digest = digest_of(cmd.SerializeToString())
    action = client.action(cmd, client.put_message(root), upload_command=False)
    response = client.execute(action).response
    assert_not_run(response, FAILED_PRECONDITION)
    assert subjects(response) == {subject(missing_dir), subject(cmd_digest)}


def test_missing_input_root(client):
    _, root = absent("root")
    action = client.action(command(["/bin/true"]), root)
    response = client.execute(action).response
    assert_not_run(response, FAILED_PRECONDITION)
    assert subjects(response) == {subject(root)}


def test_missing_action(client):
    _, action = absent("action")
    ex = client.execute(action)
    assert ex.last.done
    assert_not_run(ex.response, FAILED_PRECONDITION, action.hash)
    assert subjects(ex.response) == {subject(action)}


def test_missing_blake3_input_names_the_function(client):
    data = f"never uploaded b3 {uuid.uuid4()}".encode()
    f = digest_of(data, BLAKE3)
    root = re_pb2.Directory()
    root.files.add(name="x", digest=f)
    root_digest = client.put_message(root, BLAKE3)
    cmd = command(["/bin/true"])
    action = client.action(cmd, root_digest, fn=BLAKE3)
    response = client.execute(action, fn=BLAKE3).response
    assert_not_run(response, FAILED_PRECONDITION)
    assert subjects(response) == {subject(f, "blake3/")}


@pytest.mark.parametrize(("what", "needle"), [
    ("action", "is not an Action"),
    ("command", "is not a Command"),
    ("root", "is not a valid Directory message"),
    ("empty-arguments", "Command.arguments must not be empty"),
])
def test_blobs_of_the_wrong_type(client, what, needle):
    junk = client.put(b"\xff\xff junk " + uuid.uuid4().bytes)
    cmd = command(["/bin/true"]) if what != "empty-arguments" else command([])
    cmd_digest = junk if what == "command" else client.put_message(cmd)
    root = junk if what == "root" else client.put_tree({}).root
    action = re_pb2.Action(command_digest=cmd_digest, input_root_digest=root,
                           salt=uuid.uuid4().bytes)
    action_digest = junk if what == "action" else client.put_message(action)
    if what == "action":
        assert_invalid(rpc_error(lambda: client.execute(action_digest)), needle)
    else:
        assert_not_run(client.execute(action_digest).response, INVALID_ARGUMENT, needle)


# ---- CAS writes that do not match their digests ----------------------------------------------


def test_batch_update_mismatches(client):
    good = b"good " + uuid.uuid4().bytes
    other = b"other " + uuid.uuid4().bytes
    wrong_size = digest_of(other)
    wrong_size.size_bytes += 1
    wrong_hash = re_pb2.Digest(hash=digest_of(b"something else").hash,
                               size_bytes=len(other))
    requests = [
        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(good), data=good),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=wrong_size, data=other),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=wrong_hash, data=other),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=re_pb2.Digest(hash="AB" * 32,
                                                                    size_bytes=1), data=b"x"),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(other), data=other,
                                               compressor=re_pb2.Compressor.ZSTD),
    ]
    reply = client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests),
                                        timeout=10)
    codes = [r.status.code for r in reply.responses]
    assert codes == [0] + [INVALID_ARGUMENT] * 4
    messages = [r.status.message for r in reply.responses]
    assert "requests[1]" in messages[1] and "bytes but the digest says" in messages[1]
    assert "requests[2]" in messages[2] and "does not match" in messages[2]
    assert "requests[3].digest" in messages[3] and "malformed sha256 hash" in messages[3]
    assert "requests[4].compressor" in messages[4]
    assert client.missing([wrong_size, wrong_hash, digest_of(other)]) == {
        key(wrong_size), key(wrong_hash), key(digest_of(other))}
    assert client.read(digest_of(good)) == good


def _write(client, resource: str, chunks: list[bytes], finish: bool = True):
    return rpc_error(lambda: client.bs_write(resource, chunks, finish=finish))


def test_bytestream_write_mismatches(client):
    data = b"bytestream " + uuid.uuid4().bytes
    d = digest_of(data)
    upload = lambda: blob_resource(d, upload=str(uuid.uuid4()))  # noqa: E731

    swapped = bytearray(data)
    swapped[0] ^= 1
    assert_invalid(_write(client, upload(), [bytes(swapped)]), "does not match")
    assert_invalid(_write(client, upload(), [data, b"extra"]), "more data than the",
                   str(len(data)))
    assert_invalid(_write(client, upload(), [data[:-1]]), "finish_write after",
                   str(len(data) - 1))
    reqs = [bs_pb2.WriteRequest(resource_name=upload(), write_offset=0, data=data[:5]),
            bs_pb2.WriteRequest(write_offset=7, data=data[5:], finish_write=True)]
    assert_invalid(rpc_error(lambda: client.bs.Write(iter(reqs), timeout=10)),
                   "write_offset 7")
    reqs = [bs_pb2.WriteRequest(resource_name=upload(), data=data[:5]),
            bs_pb2.WriteRequest(resource_name=upload(), write_offset=5, data=data[5:],
                                finish_write=True)]
    assert_invalid(rpc_error(lambda: client.bs.Write(iter(reqs), timeout=10)),
                   "resource_name changed")
    assert_invalid(rpc_error(lambda: client.bs.Write(iter([bs_pb2.WriteRequest(
        data=data, finish_write=True)]), timeout=10)), "resource_name is required")
    assert_invalid(_write(client, blob_resource(d, compressed=True, upload="z"),
                          [b"not zstd at all"]), "not valid zstd")
    assert client.missing([d]) == {key(d)}
    # Resuming at an offset nobody wrote.
    assert_invalid(rpc_error(lambda: client.bs_write(upload(), [data[5:]], start=5)),
                   "write_offset 5")


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_bytestream_zstd_bomb(client, stoker):
    """64 KiB of zstd (one frame) that inflates to 2 GiB, declared as 100 bytes: refused
    without the server ever holding the inflated bytes."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(64 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(32)) + compressor.flush()
    assert len(bomb) < 100_000
    server = int((stoker.data_dir / "run" / "server.pid").read_text())
    before = _peak_rss(server)
    d = digest_of(b"\0" * 100)
    err = _write(client, blob_resource(d, compressed=True, upload=str(uuid.uuid4())),
                 [bomb[:40_000], bomb[40_000:]])
    assert_invalid(err, "more data than the 100 bytes")
    assert _peak_rss(server) - before < 64 << 20


@pytest.mark.parametrize(("resource", "needle"), [
    ("uploads/u/blobs/abc/3", "malformed sha256 hash 'abc'"),
    ("uploads/u/blobs/" + "A" * 64 + "/3", "malformed sha256 hash"),
    ("uploads/u/blobs/" + "a" * 64 + "/-3", "size '-3'"),
    ("uploads/u/blobs/" + "a" * 64 + "/x", "size 'x'"),
    ("uploads/u/blobs/md5/" + "a" * 32 + "/3", "resource_name"),
    ("uploads/u/compressed-blobs/gzip/" + "a" * 64 + "/3", "compressor 'gzip'"),
    ("blobs/" + "a" * 64 + "/3", "malformed; expected"),
    ("uploads/u", "malformed; expected"),
    ("../../../etc/passwd", "malformed; expected"),
])
def test_bytestream_bad_write_resource_names(client, resource, needle):
    assert_invalid(_write(client, resource, [b"abc"]), "resource_name", needle)
    assert_invalid(rpc_error(lambda: client.bs.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=10)), needle)


@pytest.mark.parametrize(("resource", "needle"), [
    ("blobs/" + "a" * 63 + "/3", "malformed sha256 hash"),
    ("blobs/" + "a" * 64, "malformed; expected"),
    ("blobs/blake3/" + "G" * 64 + "/3", "malformed blake3 hash"),
    ("compressed-blobs/br/" + "a" * 64 + "/3", "compressor 'br'"),
    ("/etc/passwd", "malformed; expected"),
    ("blobs/../../../../etc/passwd/1", "size '..' is not a non-negative integer"),
])
def test_bytestream_bad_read_resource_names(client, resource, needle):
    assert_invalid(rpc_error(lambda: client.bs_read(resource)), "resource_name", needle)


# ---- batch limits --------------------------------------------------------------------------


def test_batches_over_the_advertised_limit(client):
    half = MAX_BATCH // 2
    a = uuid.uuid4().bytes * (half // 16)
    b = uuid.uuid4().bytes * (half // 16) + b"!"  # one byte over in total
    requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(x), data=x)
                for x in (a, b)]
    err = rpc_error(lambda: client.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(requests=requests), timeout=30))
    assert_invalid(err, f"{MAX_BATCH + 1} bytes", "max_batch_total_size_bytes")
    assert client.missing([digest_of(a), digest_of(b)]) == {key(digest_of(a)),
                                                            key(digest_of(b))}

    # Exactly at the limit is fine, both ways.
    b = b[:-1]
    reply = client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(x), data=x)
                  for x in (a, b)]), timeout=30)
    assert [r.status.code for r in reply.responses] == [0, 0]
    reply = client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[digest_of(a), digest_of(b)]), timeout=30)
    assert [r.data for r in reply.responses] == [a, b]

    # Reading more than the limit in one batch, counted from the declared sizes.
    over = [digest_of(a), digest_of(b), digest_of(b"1")]
    err = rpc_error(lambda: client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=over), timeout=30))
    assert_invalid(err, "max_batch_total_size_bytes")
    huge = re_pb2.Digest(hash="ab" * 32, size_bytes=1 << 62)
    err = rpc_error(lambda: client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[huge]), timeout=30))
    assert_invalid(err, "max_batch_total_size_bytes")


def test_message_over_the_grpc_limit(client):
    data = b"\0" * (4 * MAX_BATCH)
    err = rpc_error(lambda: client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(data), data=data)]),
        timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()


# ---- digest functions and malformed digests -------------------------------------------------

GOOD = digest_of(b"x")
BAD_FUNCTION_CALLS = {
    "FindMissingBlobs": lambda c, fn: c.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[GOOD], digest_function=fn), timeout=10),
    "BatchUpdateBlobs": lambda c, fn: c.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=GOOD, data=b"x")],
        digest_function=fn), timeout=10),
    "BatchReadBlobs": lambda c, fn: c.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[GOOD], digest_function=fn), timeout=10),
    "GetTree": lambda c, fn: list(c.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=GOOD, digest_function=fn), timeout=10)),
    "GetActionResult": lambda c, fn: c.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=GOOD, digest_function=fn), timeout=10),
    "UpdateActionResult": lambda c, fn: c.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=GOOD, digest_function=fn,
                                         action_result=re_pb2.ActionResult()), timeout=10),
    "Execute": lambda c, fn: list(c.exe.Execute(re_pb2.ExecuteRequest(
        action_digest=GOOD, digest_function=fn), timeout=10)),
}


@pytest.mark.parametrize("fn", [re_pb2.DigestFunction.MD5, re_pb2.DigestFunction.SHA1,
                                re_pb2.DigestFunction.SHA256TREE, 99])
@pytest.mark.parametrize("method", sorted(BAD_FUNCTION_CALLS))
def test_unknown_digest_functions(client, method, fn):
    err = rpc_error(lambda: BAD_FUNCTION_CALLS[method](client, fn))
    assert_invalid(err, "digest_function", f"unsupported digest_function {fn}")


BAD_DIGESTS = [
    (re_pb2.Digest(hash="A" * 64, size_bytes=1), "malformed sha256 hash"),  # uppercase
    (re_pb2.Digest(hash="ab" * 31, size_bytes=1), "malformed sha256 hash"),  # too short
    (re_pb2.Digest(hash="ab" * 33, size_bytes=1), "malformed sha256 hash"),  # too long
    (re_pb2.Digest(hash="zz" * 32, size_bytes=1), "malformed sha256 hash"),  # not hex
    (re_pb2.Digest(hash="", size_bytes=0), "malformed sha256 hash"),
    (re_pb2.Digest(hash="ab" * 32, size_bytes=-1), "negative size_bytes -1"),
]
BAD_DIGEST_CALLS = {
    "FindMissingBlobs": (lambda c, d: c.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[GOOD, d]), timeout=10), "blob_digests[1]"),
    "BatchReadBlobs": (lambda c, d: c.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[d]), timeout=10), "digests[0]"),
    "GetTree": (lambda c, d: list(c.cas.GetTree(re_pb2.GetTreeRequest(root_digest=d),
                                                timeout=10)), "root_digest"),
    "GetActionResult": (lambda c, d: c.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=d), timeout=10), "action_digest"),
    "Execute": (lambda c, d: list(c.exe.Execute(re_pb2.ExecuteRequest(action_digest=d),
                                                timeout=10)), "action_digest"),
}


@pytest.mark.parametrize(("digest", "needle"), BAD_DIGESTS,
                         ids=["upper", "short", "long", "nonhex", "empty", "negative"])
@pytest.mark.parametrize("method", sorted(BAD_DIGEST_CALLS))
def test_malformed_digests(client, method, digest, needle):
    call, field = BAD_DIGEST_CALLS[method]
    assert_invalid(rpc_error(lambda: call(client, digest)), field, needle)


@pytest.mark.parametrize("field", ["command_digest", "input_root_digest"])
def test_malformed_digests_inside_the_action(client, field):
    action = re_pb2.Action(command_digest=client.put_message(command(["/bin/true"])),
                           input_root_digest=client.put_tree({}).root, salt=uuid.uuid4().bytes)
    getattr(action, field).CopyFrom(re_pb2.Digest(hash="Ab" * 32, size_bytes=3))
    err = rpc_error(lambda: client.execute(client.put_message(action)))
    assert_invalid(err, f"Action.{field}", "malformed sha256 hash")


def test_malformed_digest_in_the_input_tree(client):
    root = re_pb2.Directory()
    root.files.add(name="x", digest=re_pb2.Digest(hash="AB" * 32, size_bytes=1))
    response = run_root(client, client.put_message(root), PLANT)
    assert_not_run(response, INVALID_ARGUMENT, "input root/x", "malformed sha256 hash")


# ---- outputs and working directories outside the exec root -----------------------------------


@pytest.mark.parametrize(("fields", "needle"), [
    ({"output_files": [f"../{CANARY}"]}, "output_files: path '../"),
    ({"output_files": [UP_TO_BASE + "sentinel/secret.txt"]}, "leads outside"),
    ({"output_files": [f"/tmp/{CANARY}"]}, "is absolute"),
    ({"output_directories": [UP_TO_BASE + "sentinel"]}, "output_directories: path"),
    ({"output_directories": ["/"]}, "is absolute"),
    ({"output_paths": [f"../{CANARY}"]}, "output_paths: path '../"),
    ({"output_paths": [f"a/../../{CANARY}"]}, "leads outside"),
    ({"output_paths": [f"/abs/{CANARY}"]}, "is absolute"),
    ({"output_paths": ["a//b"]}, "empty component"),
    ({"output_paths": ["out", "out/"]}, "trailing slash"),
    ({"working_directory": ".."}, "working_directory"),
    ({"working_directory": "/tmp"}, "working_directory"),
    ({"working_directory": "nonexistent"}, "working_directory"),
    ({"working_directory": "sub", "output_files": [f"../../{CANARY}"]}, "output_files"),
])
def test_outputs_outside_the_exec_root(client, fields, needle):
    tree = client.put_tree({"sub": {"f": b"x"}})
    script = f"echo pwned > {CANARY}; cat {UP_TO_BASE}sentinel/secret.txt"
    assert_not_run(run_root(client, tree.root, script, **fields), INVALID_ARGUMENT, needle)


def test_output_parent_symlinked_outside_is_not_followed(client, sentinel):
    script = f"rm -rf d; ln -s {sentinel} d"
    for fields in ({"output_files": ["d/secret.txt"]}, {"output_paths": ["d/secret.txt"]},
                   {"output_directories": ["d/x"]}):
        response = run_root(client, client.put_tree({}).root, script, **fields)
        (field,) = fields
        assert response.status.code == INVALID_ARGUMENT, response.status
        assert f"{field}: 'd/" in response.status.message
        assert "outside the exec root" in response.status.message


def test_output_symlinks_are_reported_not_followed(client, sentinel):
    script = f"""set -e
        ln -s {UP_TO_BASE}sentinel/secret.txt leak
        mkdir d
        ln -s {UP_TO_BASE[3:]}../sentinel d/up
        ln -s {UP_TO_BASE}sentinel/secret.txt d/leak"""
    response = run_root(client, client.put_tree({}).root, script, output_files=["leak"],
                        output_directories=["d"])
    assert response.status.code == 0, response.status
    result = response.result
    assert not result.output_files
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [
        ("leak", f"{UP_TO_BASE}sentinel/secret.txt")]
    tree = client.output_tree(result.output_directories[0].tree_digest)
    assert not tree.root.files and not tree.children
    assert sorted(s.name for s in tree.root.symlinks) == ["leak", "up"]


@pytest.mark.parametrize(("script", "fields", "needle"), [
    ("ln -s SENTINEL/secret.txt leak", {"output_files": ["leak"]}, "absolute path"),
    ("ln -s SENTINEL/secret.txt leak", {"output_paths": ["leak"]}, "absolute path"),
    ("mkdir d; ln -s SENTINEL d/leak", {"output_directories": ["d"]}, "absolute path"),
    ("mkfifo pipe", {"output_files": ["pipe"]}, "not a regular file"),
    ("mkdir d; echo x > d/x", {"output_files": ["d"]}, "is a directory"),
    ("echo x > f", {"output_directories": ["f"]}, "is a file"),
])
def test_unusable_outputs_fail_the_action(client, sentinel, script, fields, needle):
    """Outputs that cannot be reported (absolute symlinks are DISALLOWED in Capabilities)
    fail the action with FAILED_PRECONDITION at once; they are not retried elsewhere."""
    script = script.replace("SENTINEL", str(sentinel))
    t0 = time.monotonic()
    response = run_root(client, client.put_tree({}).root, script, **fields)
    assert time.monotonic() - t0 < 10
    assert response.status.code == FAILED_PRECONDITION, response.status
    assert needle in response.status.message
    assert next(iter(fields.values()))[0] in response.status.message


def test_action_cannot_modify_the_cas_through_its_inputs(client):
    original = b"cached content " + uuid.uuid4().bytes + b"\n"
    d = digest_of(original)
    tree = client.put_tree({"victim": original, "exe": File(original, executable=True)})
    script = """chmod 666 victim exe; echo EVIL >> victim; echo EVIL >> exe
        : > victim; truncate -s 0 exe; cat victim exe"""
    response = run_root(client, tree.root, script)
    assert response.status.code == 0, response.status
    assert client.read(d) == original
    assert client.bs_read(blob_resource(d)) == original
    again = run_root(client, tree.root, "cat victim exe")
    assert client.read(again.result.stdout_digest) == original * 2


# ---- timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("timeout", "needle"), [
    (duration_pb2.Duration(seconds=-5), "Action.timeout -5.0s is negative"),
    (duration_pb2.Duration(seconds=0, nanos=-1), "is negative"),
    (duration_pb2.Duration(seconds=3601), "Action.timeout 3601.0s exceeds"),
    (duration_pb2.Duration(seconds=315_576_000_000), "exceeds this server's max_timeout"),
])
def test_bad_timeouts(client, timeout, needle):
    cmd = command(["/bin/sh", "-c", PLANT])
    action = client.action(cmd, client.put_tree({}).root, timeout=timeout)
    assert_invalid(rpc_error(lambda: client.execute(action)), needle)


# ---- operations ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../../etc/passwd", "x" * 100_000, "\u2603" * 20_000])
def test_unknown_operation_names(client, name):
    """Echoed in the error, but bounded: a long name must not overflow the trailers."""
    for call in (lambda: client.ops.GetOperation(operations_pb2.GetOperationRequest(name=name),
                                                 timeout=10),
                 lambda: list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name),
                                                       timeout=10))):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert err.details().startswith(f"operation {name[:100]!r}"[:-1])
        if len(name) > 1000:
            assert err.details().endswith("... (truncated)")
            assert len(err.details().encode()) < 1100
        else:
            assert "is not known" in err.details()


def test_long_resource_name(client):
    name = "x/" * 200_000 + "blobs/" + "A" * 64 + "/1"
    assert_invalid(rpc_error(lambda: client.bs_read(name)), "resource_name", "(truncated)")


# ---- still serving -------------------------------------------------------------------------


def test_server_still_executes_after_all_of_the_above(client, stoker):
    response = client.run("echo alive > out.txt; echo ok", {"in": b"x"},
                          output_files=["out.txt"]).response
    assert response.status.code == 0
    assert client.read(response.result.stdout_digest) == b"ok\n"
    assert client.read(response.result.output_files[0].digest) == b"alive\n"
    assert stoker.alive()
