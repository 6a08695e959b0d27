"""What the action cache accepts (engine/server/action_result_check.py) and what it serves
(engine/server/action_cache.py), over a real local CAS: fast, no Stoker started."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import digest as dg
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote_wire import varint
from engine.errors import FailedPrecondition, InvalidArgument
from engine.pipeline.inputs import MAX_DEPTH, MAX_DIRECTORY_ENTRIES
from engine.pipeline.outputs import collect_outputs
from engine.proto import re_pb2
from engine.server import action_result_check
from engine.server.action_cache import ActionCache
from engine.server.action_result_check import check

FN = "sha256"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalDiskStore]:
    with LocalDiskStore(str(tmp_path / "cas")) as store:
        yield store


def put(cas: LocalDiskStore, data: bytes) -> re_pb2.Digest:
    d = dg.of_bytes(FN, data)
    cas.write_bytes(d, data)
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


def absent(data: bytes) -> re_pb2.Digest:
    d = dg.of_bytes(FN, data)
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


def record(field: int, data: bytes) -> bytes:
    """One length-delimited field, as the wire has it."""
    return bytes([field << 3 | 2]) + varint(len(data)) + data


def tree_of(root: re_pb2.Directory, *children: re_pb2.Directory) -> bytes:
    return re_pb2.Tree(root=root, children=list(children)).SerializeToString()


def digest_of_message(msg) -> re_pb2.Digest:
    return absent(msg.SerializeToString())


def with_tree(cas: LocalDiskStore, data: bytes, **fields) -> re_pb2.ActionResult:
    result = re_pb2.ActionResult()
    result.output_directories.add(path="out", tree_digest=put(cas, data), **fields)
    return result


def refused(cas: LocalDiskStore, result: re_pb2.ActionResult, *needles: str,
            error: type[Exception] = InvalidArgument) -> str:
    with pytest.raises(error) as e:
        check(FN, result, cas)
    for needle in needles:
        assert needle in str(e.value)
    return str(e.value)


# ---- paths ------------------------------------------------------------------------------

BAD_PATHS = ["../../tmp/x", "a/../b", "..", "a//b", "a/", ".", "./a", "a/./b", "/abs",
             "/", "a\0b", "", "x/" + "n" * 256, "d/" * 1600 + "f"]
PATH_FIELDS = ["output_files", "output_directories", "output_symlinks",
               "output_file_symlinks", "output_directory_symlinks"]


def _output(cas: LocalDiskStore, result: re_pb2.ActionResult, field: str, path: str) -> None:
    if field == "output_files":
        result.output_files.add(path=path, digest=put(cas, b"f"))
    elif field == "output_directories":
        result.output_directories.add(path=path, tree_digest=put(cas, tree_of(
            re_pb2.Directory())))
    else:
        getattr(result, field).add(path=path, target="t")


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("path", BAD_PATHS)
def test_every_output_path_must_be_normalized_and_relative(cas, field, path):
    if path == "" and field == "output_directories":
        pytest.skip("'' is the working directory, which REAPI allows an output directory")
    result = re_pb2.ActionResult()
    _output(cas, result, field, "fine/path")
    _output(cas, result, field, path)
    message = refused(cas, result, f"action_result.{field}[1].path: ")
    if len(path) < 100 and "\0" not in path:
        assert f"{path!r} is not a normalized relative path" in message


def test_the_message_reads_as_the_spec_says(cas):
    result = re_pb2.ActionResult()
    for name in ("a", "b", "../x"):
        result.output_files.add(path=name, digest=put(cas, b"f"))
    refused(cas, result, "action_result.output_files[2].path: '../x' is not a normalized "
            "relative path")


def test_an_output_directory_may_be_the_working_directory(cas):
    result = re_pb2.ActionResult()
    _output(cas, result, "output_directories", "")
    check(FN, result, cas)


@pytest.mark.parametrize(("first", "second"), [
    ("output_files", "output_files"), ("output_files", "output_directories"),
    ("output_directories", "output_symlinks"), ("output_symlinks", "output_file_symlinks"),
    ("output_file_symlinks", "output_directory_symlinks"),
])
def test_no_two_outputs_have_one_path(cas, first, second):
    result = re_pb2.ActionResult()
    _output(cas, result, first, "same/path")
    if second == "output_file_symlinks":  # a mirrored output_symlinks entry has its target
        result.output_file_symlinks.add(path="same/path", target="another")
    else:
        _output(cas, result, second, "same/path")
    refused(cas, result, ".path: 'same/path' is also the path of action_result."
            f"{first}[0]")


def test_output_symlinks_may_be_mirrored_once_in_a_legacy_field(cas):
    result = re_pb2.ActionResult()
    result.output_symlinks.add(path="l", target="../t")
    result.output_file_symlinks.add(path="l", target="../t")
    result.output_symlinks.add(path="m", target="/abs/target")
    result.output_directory_symlinks.add(path="m", target="/abs/target")
    check(FN, result, cas)
    result.output_directory_symlinks.add(path="l", target="../t")
    refused(cas, result, "action_result.output_directory_symlinks[1].path: 'l' is also")


@pytest.mark.parametrize(("target", "needle"), [
    ("", "the symlink target is empty"), ("a\0b", "contains NUL"),
    ("t" * 4096, "more than the 4095"),
])
@pytest.mark.parametrize("field", ["output_symlinks", "output_file_symlinks",
                                   "output_directory_symlinks"])
def test_symlink_targets(cas, field, target, needle):
    result = re_pb2.ActionResult()
    getattr(result, field).add(path="l", target=target)
    refused(cas, result, f"action_result.{field}[0].target: ", needle)


def test_too_many_outputs_are_refused_before_any_is_looked_at(cas):
    result = re_pb2.ActionResult.FromString(record(2, b"") * (MAX_DIRECTORY_ENTRIES + 1))
    refused(cas, result, f"more than the {MAX_DIRECTORY_ENTRIES} allowed")


# ---- blobs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "needle"), [
    (lambda r: r.output_files.add(path="f", digest=absent(b"gone")), "output_files[1].digest"),
    (lambda r: r.stdout_digest.CopyFrom(absent(b"out")), "action_result.stdout_digest"),
    (lambda r: r.stderr_digest.CopyFrom(absent(b"err")), "action_result.stderr_digest"),
    (lambda r: r.output_directories.add(path="d", tree_digest=absent(b"tree")),
     "output_directories[0].tree_digest"),
])
def test_every_referenced_blob_must_be_in_the_cas(cas, build, needle):
    result = re_pb2.ActionResult()
    result.output_files.add(path="present", digest=put(cas, b"here"))
    build(result)
    refused(cas, result, needle, "is not in the CAS", error=FailedPrecondition)


def test_files_inside_a_tree_must_be_in_the_cas(cas):
    root = re_pb2.Directory()
    root.files.add(name="gone", digest=absent(b"not uploaded"))
    refused(cas, with_tree(cas, tree_of(root)), "output_directories[0].tree_digest: a file "
            "of the Tree", error=FailedPrecondition)


def test_malformed_digests_and_a_false_empty_blob(cas):
    result = re_pb2.ActionResult()
    result.output_files.add(path="f", digest=re_pb2.Digest(hash="ab" * 32, size_bytes=0))
    refused(cas, result, "output_files[0].digest: size 0 with a hash that is not the empty")
    result = re_pb2.ActionResult()
    result.output_files.add(path="f", digest=re_pb2.Digest(hash="XY", size_bytes=1))
    refused(cas, result, "output_files[0].digest: malformed sha256 hash")


def test_inline_bytes_are_not_stored_and_need_their_digest(cas):
    result = re_pb2.ActionResult(stdout_raw=b"out", stdout_digest=put(cas, b"out"),
                                 stderr_raw=b"err", stderr_digest=put(cas, b"err"))
    result.output_files.add(path="f", digest=put(cas, b"f"), contents=b"f")
    stored = check(FN, result, cas).result
    assert not stored.stdout_raw and not stored.stderr_raw
    assert not stored.output_files[0].contents
    assert stored.stdout_digest == result.stdout_digest
    refused(cas, re_pb2.ActionResult(stderr_raw=b"err"), "action_result.stderr_raw: ")


# ---- Trees ------------------------------------------------------------------------------


def test_a_tree_must_parse_as_a_tree(cas):
    refused(cas, with_tree(cas, b"\x08\x01"), "tree_digest: not a Tree")  # a varint field
    refused(cas, with_tree(cas, b"\x0a\x05ab"), "tree_digest: not a Tree")  # truncated
    refused(cas, with_tree(cas, record(3, b"x")), "tree_digest: not a Tree: field 3")
    refused(cas, with_tree(cas, record(1, b"") + record(1, b"")), "a second root")
    refused(cas, with_tree(cas, record(1, b"\x08\x01")), "the root: not a Directory")
    refused(cas, with_tree(cas, record(1, record(1, b"\xff"))), "the root: not a Directory")


@pytest.mark.parametrize(("name", "needle"), [
    ("", "not valid"), (".", "not valid"), ("..", "not valid"), ("a/b", "not valid"),
    ("a\0b", "not valid"), ("n" * 256, "longer than 255 bytes"),
])
def test_names_inside_a_tree(cas, name, needle):
    sub = re_pb2.Directory()
    sub.files.add(name=name, digest=put(cas, b"f"))
    root = re_pb2.Directory()
    root.directories.add(name="sub", digest=digest_of_message(sub))
    refused(cas, with_tree(cas, tree_of(root, sub)), "tree_digest: directory 'sub': entry "
            "name", needle)


def test_a_name_used_twice_in_a_directory(cas):
    root = re_pb2.Directory()
    root.files.add(name="x", digest=put(cas, b"f"))
    root.symlinks.add(name="x", target="y")
    refused(cas, with_tree(cas, tree_of(root)), "the root: entry name 'x' is used twice")


def test_symlinks_inside_a_tree(cas):
    root = re_pb2.Directory()
    root.symlinks.add(name="abs", target="/usr/bin/env")
    root.symlinks.add(name="up", target="../../x")
    check(FN, with_tree(cas, tree_of(root)), cas)
    root.symlinks.add(name="empty", target="")
    refused(cas, with_tree(cas, tree_of(root)), "'empty': the symlink target is empty")


def test_too_many_children_bomb_is_refused_fast_and_small():
    """2 million empty children in 4 MB: protobuf would take ~30x that to parse it and
    Python ~300x to walk it; it is refused while counting, in a fresh process whose peak
    memory is measured."""
    script = textwrap.dedent("""
        import resource, sys, tempfile, time
        from engine import digest as dg
        from engine.cas.local_disk import LocalDiskStore
        from engine.errors import InvalidArgument
        from engine.proto import re_pb2
        from engine.server.action_result_check import check
        with tempfile.TemporaryDirectory() as tmp, LocalDiskStore(tmp) as cas:
            bomb = b"\\x12\\x00" * 2_000_000
            d = dg.of_bytes("sha256", bomb)
            cas.write_bytes(d, bomb)
            result = re_pb2.ActionResult()
            result.output_directories.add(path="out", tree_digest=re_pb2.Digest(
                hash=d.hash, size_bytes=d.size))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.monotonic()
            try:
                check("sha256", result, cas)
            except InvalidArgument as e:
                message = str(e)
            took = time.monotonic() - start
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(took, grew, message, sep="\\n")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    took, grew_kib, message = float(out[0]), int(out[1]), out[2]
    assert "more than 1000000 children" in message
    assert took < 5.0, took
    assert grew_kib < 64 * 1024, f"peak memory grew by {grew_kib} KiB"


def test_too_many_entries_in_one_directory_is_refused_before_parsing(cas):
    root = record(1, record(1, b"") * (MAX_DIRECTORY_ENTRIES + 1))  # empty FileNodes
    refused(cas, with_tree(cas, root), f"the root: more than the {MAX_DIRECTORY_ENTRIES} "
            "entries allowed")


def test_an_entry_stuffed_with_properties_is_refused_before_parsing(cas):
    node = record(1, b"f") + record(6, record(1, b"") * 20_000)  # FileNode.node_properties
    refused(cas, with_tree(cas, record(1, record(1, node))), "the root: an entry of")


def _chain(cas: LocalDiskStore, depth: int) -> bytes:
    """A Tree of `depth` nested directories d/d/d/..., a file at the bottom."""
    inner = re_pb2.Directory()
    inner.files.add(name="f", digest=put(cas, b"bottom"))
    dirs = [inner]
    for _ in range(depth):
        parent = re_pb2.Directory()
        parent.directories.add(name="d", digest=digest_of_message(dirs[-1]))
        dirs.append(parent)
    return tree_of(dirs[-1], *reversed(dirs[:-1]))


def test_depth(cas):
    check(FN, with_tree(cas, _chain(cas, MAX_DEPTH), is_topologically_sorted=True), cas)
    refused(cas, with_tree(cas, _chain(cas, MAX_DEPTH + 1)),
            f"nested more than {MAX_DEPTH} levels deep")


def test_a_dag_that_expands_past_the_entry_limit(cas):
    """A Directory named twice in each of 30 levels: 2^30 paths in a few KB."""
    d = re_pb2.Directory()
    d.files.add(name="f", digest=put(cas, b"leaf"))
    dirs = [d]
    for _ in range(30):
        parent = re_pb2.Directory()
        for name in ("a", "b"):
            parent.directories.add(name=name, digest=digest_of_message(dirs[-1]))
        dirs.append(parent)
    refused(cas, with_tree(cas, tree_of(dirs[-1], *reversed(dirs[:-1]))),
            "the Tree has more than 1000000 entries")


def test_children_must_be_present_and_reachable(cas):
    sub = re_pb2.Directory()
    sub.files.add(name="f", digest=put(cas, b"f"))
    root = re_pb2.Directory()
    root.directories.add(name="sub", digest=digest_of_message(sub))
    refused(cas, with_tree(cas, tree_of(root)), "directory 'sub': Directory",
            "is not among the Tree's children")
    stray = re_pb2.Directory()
    stray.symlinks.add(name="s", target="t")
    refused(cas, with_tree(cas, tree_of(root, sub, stray)), "children[1]",
            "is not reachable from the root")
    # An empty subdirectory need not be listed: it is the empty blob.
    root.directories.add(name="void", digest=digest_of_message(re_pb2.Directory()))
    check(FN, with_tree(cas, tree_of(root, sub)), cas)


def test_is_topologically_sorted_must_be_true_when_set(cas):
    leaf = re_pb2.Directory()
    leaf.files.add(name="f", digest=put(cas, b"f"))
    mid = re_pb2.Directory()
    mid.directories.add(name="leaf", digest=digest_of_message(leaf))
    root = re_pb2.Directory()
    root.directories.add(name="mid", digest=digest_of_message(mid))
    check(FN, with_tree(cas, tree_of(root, mid, leaf), is_topologically_sorted=True), cas)
    check(FN, with_tree(cas, tree_of(root, leaf, mid)), cas)  # unsorted, and says so
    refused(cas, with_tree(cas, tree_of(root, leaf, mid), is_topologically_sorted=True),
            "children[0] comes before every Directory that names it")
    refused(cas, with_tree(cas, tree_of(root, mid, leaf, leaf), is_topologically_sorted=True),
            "children[2] repeats an earlier child")


def test_root_directory_digest(cas):
    root = re_pb2.Directory()
    root.files.add(name="f", digest=put(cas, b"f"))
    tree = tree_of(root)
    refused(cas, with_tree(cas, tree, root_directory_digest=absent(b"other")),
            "root_directory_digest: ", "is not the digest of the Tree's root")
    # Set, it promises the Directories themselves in the CAS.
    refused(cas, with_tree(cas, tree, root_directory_digest=digest_of_message(root)),
            "root_directory_digest: a Directory of the Tree", error=FailedPrecondition)
    put(cas, root.SerializeToString())
    check(FN, with_tree(cas, tree, root_directory_digest=digest_of_message(root)), cas)


def test_the_trees_of_one_result_share_the_byte_budget(cas, monkeypatch):
    monkeypatch.setattr(action_result_check, "MAX_TREE_BYTES", 100)
    root = re_pb2.Directory()
    root.symlinks.add(name="s", target="t" * 60)
    result = with_tree(cas, tree_of(root))
    check(FN, result, cas)
    result.output_directories.add(path="again", tree_digest=result.output_directories[0]
                                  .tree_digest)
    refused(cas, result, "output_directories[1].tree_digest: the Trees of one result may hold")


# ---- Stoker's own results, stored and served --------------------------------------------


def test_stokers_own_outputs_pass_and_round_trip(cas, tmp_path):
    root = tmp_path / "root"
    (root / "gen/sub/deeper").mkdir(parents=True)
    (root / "gen/empty").mkdir()
    (root / "gen/sub/deeper/x.txt").write_bytes(b"x")
    (root / "gen/a.txt").write_bytes(b"a")
    (root / "gen/sub/a.txt").write_bytes(b"a")
    os.symlink("a.txt", root / "gen/link")
    (root / "out.txt").write_bytes(b"out")
    os.symlink("out.txt", root / "alias")
    for cmd in (re_pb2.Command(arguments=["x"], output_paths=["alias", "gen", "out.txt"]),
                re_pb2.Command(arguments=["x"], output_files=["out.txt", "alias"],
                               output_directories=["gen", ""])):
        outputs = collect_outputs(FN, cmd, str(root), cas)
        result = re_pb2.ActionResult(exit_code=0)
        outputs.fill(result)
        result.stdout_digest.CopyFrom(put(cas, b"stdout"))
        cache = ActionCache(str(tmp_path / "ac"), cas)
        action = dg.of_bytes(FN, cmd.SerializeToString())
        assert cache.put(action, result) == result
        assert cache.get(action) == result


def test_an_entry_is_served_only_while_its_tree_files_are_in_the_cas(cas, tmp_path):
    root = re_pb2.Directory()
    root.files.add(name="f", digest=put(cas, b"inside the tree"))
    result = with_tree(cas, tree_of(root))
    cache = ActionCache(str(tmp_path / "ac"), cas)
    action = dg.of_bytes(FN, b"action")
    cache.put(action, result)
    assert cache.get(action) == result
    os.unlink(cas.blob_path(dg.of_bytes(FN, b"inside the tree")))  # as if evicted
    assert cache.get(action) is None


def test_entries_of_the_unchecked_format_are_dropped(cas, tmp_path):
    cache = ActionCache(str(tmp_path / "ac"), cas)
    action = dg.of_bytes(FN, b"old action")
    path = cache._path(action)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:  # a bare ActionResult, as written before entries were checked
        f.write(re_pb2.ActionResult(exit_code=0).SerializeToString())
    assert cache.get(action) is None
    assert not os.path.exists(path)
