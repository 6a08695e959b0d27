import os
import stat

import pytest
from worker_helpers import FN, Blobs, pb

from engine import digest as digests
from engine.proto import re_pb2
from engine.worker.inputs import (
    InputError,
    InputFile,
    InputSymlink,
    MissingBlobs,
    resolve_tree,
    stage,
)


def resolve(blobs: Blobs, root):
    return resolve_tree(FN, root, blobs.get)


def test_resolves_nested_tree_with_shared_subtree():
    b = Blobs()
    leaf = b.directory(files=[("x.h", b"header", False)])
    sub = b.directory(files=[("run.sh", b"#!/bin/sh\n", True)], dirs=[("inc", leaf)],
                      symlinks=[("up", "../top.txt")])
    root = b.directory(files=[("top.txt", b"top", False)],
                       dirs=[("a", sub), ("b", sub), ("c", leaf)],
                       symlinks=[("link", "a/run.sh")])
    t = resolve(b, root)
    assert t.dirs == ["a", "a/inc", "b", "b/inc", "c"]
    assert sorted(f.path for f in t.files) == [
        "a/inc/x.h", "a/run.sh", "b/inc/x.h", "b/run.sh", "c/x.h", "top.txt"]
    by_path = {f.path: f for f in t.files}
    assert by_path["a/run.sh"].is_executable and not by_path["top.txt"].is_executable
    assert by_path["c/x.h"].digest == digests.of_bytes(FN, b"header")
    assert sorted(t.symlinks) == [InputSymlink("a/up", "../top.txt"),
                                  InputSymlink("b/up", "../top.txt"),
                                  InputSymlink("link", "a/run.sh")]
    assert t.blob_digests() == {digests.of_bytes(FN, c) for c in (b"header", b"#!/bin/sh\n",
                                                                   b"top")}


def test_empty_root():
    b = Blobs()
    t = resolve(b, b.directory())
    assert (t.dirs, t.files, t.symlinks) == ([], [], [])


BAD_NAMES = ["", ".", "..", "a/b", "a\0b"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_rejects_bad_names(kind, name):
    b = Blobs()
    empty = b.directory()
    spec = {"file": {"files": [(name, b"x", False)]}, "dir": {"dirs": [(name, empty)]},
            "symlink": {"symlinks": [(name, "t")]}}[kind]
    root = b.directory(**spec)
    with pytest.raises(InputError, match="invalid entry name"):
        resolve(b, root)


@pytest.mark.parametrize("spec,problem", [
    ({"files": [("b", b"1", False), ("a", b"2", False)]}, "not sorted"),
    ({"files": [("a", b"1", False), ("a", b"2", False)]}, "duplicated"),
    ({"dirs": [("b", "E"), ("a", "E")]}, "not sorted"),
    ({"dirs": [("a", "E"), ("a", "E")]}, "duplicated"),
    ({"symlinks": [("z", "t"), ("y", "t")]}, "not sorted"),
    ({"symlinks": [("y", "t"), ("y", "u")]}, "duplicated"),
    ({"files": [("a", b"1", False)], "dirs": [("a", "E")]}, "more than one entry"),
    ({"files": [("a", b"1", False)], "symlinks": [("a", "t")]}, "more than one entry"),
    ({"dirs": [("a", "E")], "symlinks": [("a", "t")]}, "more than one entry"),
    # Code point order, not locale order: 'B' (0x42) sorts before 'a' (0x61).
    ({"files": [("a", b"1", False), ("B", b"2", False)]}, "not sorted"),
])
def test_rejects_unsorted_or_duplicate_entries(spec, problem):
    b = Blobs()
    empty = b.directory()
    if "dirs" in spec:
        spec = dict(spec, dirs=[(n, empty) for n, _ in spec["dirs"]])
    root = b.directory(**spec)
    with pytest.raises(InputError, match=problem):
        resolve(b, root)


def test_accepts_code_point_order():
    b = Blobs()
    root = b.directory(files=[("B", b"1", False), ("a", b"2", False), ("\u00e9", b"3", False)])
    assert [f.path for f in resolve(b, root).files] == ["B", "a", "\u00e9"]


def test_rejects_problem_in_nested_directory_naming_its_path():
    b = Blobs()
    bad = b.directory(files=[("z", b"1", False), ("y", b"2", False)])
    root = b.directory(dirs=[("pkg", b.directory(dirs=[("sub", bad)]))])
    with pytest.raises(InputError, match="pkg/sub"):
        resolve(b, root)


@pytest.mark.parametrize("where,target", [
    ("", "/etc/passwd"),
    ("", ".."),
    ("", "../x"),
    ("", "a/../../x"),
    ("sub", "../../x"),
    ("sub", "../sub/../.."),
    ("", ""),
])
def test_rejects_absolute_escaping_or_empty_symlinks(where, target):
    b = Blobs()
    if where:
        root = b.directory(dirs=[(where, b.directory(symlinks=[("l", target)]))])
    else:
        root = b.directory(symlinks=[("l", target)])
    with pytest.raises(InputError, match="symlink"):
        resolve(b, root)


@pytest.mark.parametrize("where,target", [
    ("sub", ".."),
    ("sub", "../x"),
    ("", "missing/../x"),
    ("", "./a/./b"),
    ("sub", "../sub/../sub/f"),
])
def test_accepts_symlinks_that_stay_inside(where, target):
    b = Blobs()
    if where:
        root = b.directory(dirs=[(where, b.directory(symlinks=[("l", target)]))])
    else:
        root = b.directory(symlinks=[("l", target)])
    t = resolve(b, root)
    assert [s.target for s in t.symlinks] == [target]


def test_rejects_escape_through_another_symlink():
    # Lexically 's/..' is the root, but 's' is itself a symlink to '.', so on disk it climbs
    # out of the root.
    b = Blobs()
    root = b.directory(symlinks=[("a", "s/.."), ("s", ".")])
    with pytest.raises(InputError, match="'s/..' points outside"):
        resolve(b, root)
    ok = b.directory(dirs=[("d", b.directory())], symlinks=[("a", "s/.."), ("s", "d")])
    assert len(resolve(b, ok).symlinks) == 2


def test_symlink_loop_is_not_an_escape():
    b = Blobs()
    root = b.directory(symlinks=[("a", "b"), ("b", "a")])
    assert len(resolve(b, root).symlinks) == 2


@pytest.mark.parametrize("hash_,size,problem", [
    ("ab" * 31, 1, "malformed"),
    ("AB" * 32, 1, "malformed"),
    ("zz" * 32, 1, "malformed"),
    ("ab" * 32, -1, "negative"),
    ("", 0, "malformed"),
])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_rejects_malformed_digests(kind, hash_, size, problem):
    b = Blobs()
    msg = re_pb2.Directory()
    bad = re_pb2.Digest(hash=hash_, size_bytes=size)
    if kind == "file":
        msg.files.add(name="f", digest=bad)
    else:
        msg.directories.add(name="f", digest=bad)
    root = b.put(msg.SerializeToString())
    with pytest.raises(InputError, match=f"input root/f: .*{problem}"):
        resolve(b, root)


def test_empty_directory_needs_no_blob():
    b = Blobs()
    empty = digests.empty(FN)
    root = b.directory(files=[("e", empty, False)], dirs=[("d", empty)])
    assert empty not in b.data  # stores need not hold the empty blob
    t = resolve(b, root)
    assert t.dirs == ["d"] and t.files == [InputFile("e", empty, False)]


def test_rejects_size_zero_with_another_hash():
    b = Blobs()
    msg = re_pb2.Directory()
    msg.files.add(name="f", digest=re_pb2.Digest(hash="ab" * 32, size_bytes=0))
    with pytest.raises(InputError, match="input root/f: size 0"):
        resolve(b, b.put(msg.SerializeToString()))


def test_rejects_directory_bytes_not_matching_digest():
    b = Blobs()
    sub = b.directory(files=[("f", b"1", False)])
    root = b.directory(dirs=[("sub", sub)])
    b.data[sub] = re_pb2.Directory().SerializeToString() + b""  # other content, same key
    with pytest.raises(InputError, match="input root/sub: Directory blob does not match"):
        resolve(b, root)
    # Right hash, wrong size claimed by the parent.
    b2 = Blobs()
    sub2 = b2.directory(files=[("f", b"1", False)])
    wrong = digests.Digest(FN, sub2.hash, sub2.size + 1)
    b2.data[wrong] = b2.data[sub2]
    with pytest.raises(InputError, match="does not match"):
        resolve(b2, b2.directory(dirs=[("sub", wrong)]))


def test_rejects_bytes_that_are_not_a_directory():
    b = Blobs()
    junk = b.put(b"\xff\xff\xff\xff")
    with pytest.raises(InputError, match="not a valid Directory"):
        resolve(b, b.directory(dirs=[("d", junk)]))


def test_collects_every_missing_directory():
    b = Blobs()
    m1 = digests.of_bytes(FN, b"missing one")
    m2 = digests.of_bytes(FN, b"missing two")
    present = b.directory(dirs=[("deep", m2)])
    root = b.directory(dirs=[("a", m1), ("b", present), ("c", m1)])
    with pytest.raises(MissingBlobs) as ei:
        resolve(b, root)
    assert sorted(ei.value.digests, key=str) == sorted([m1, m2], key=str)
    with pytest.raises(MissingBlobs) as ei:
        resolve_tree(FN, m1, b.get)
    assert ei.value.digests == [m1]


def test_refuses_exponential_trees():
    b = Blobs()
    d = b.directory(files=[("f", b"x", False)])
    for _ in range(30):  # 2**30 paths from 31 small blobs
        d = b.directory(dirs=[("l", d), ("r", d)])
    with pytest.raises(InputError, match="more than 1000 entries"):
        resolve_tree(FN, d, b.get, max_entries=1000)


# --- staging ---------------------------------------------------------------------------

def fill_store(store, blobs: Blobs):
    for d, data in blobs.data.items():
        if not store.has(d):
            store.write_bytes(d, data)


def test_stage_materializes_files_dirs_symlinks(tmp_path, store):
    b = Blobs()
    sub = b.directory(files=[("empty", b"", False), ("tool", b"#!/bin/sh\necho hi\n", True)],
                      dirs=[("nothing", b.directory())])
    root = b.directory(files=[("data.txt", b"data", False)], dirs=[("bin", sub)],
                       symlinks=[("t", "bin/tool")])
    fill_store(store, b)
    t = resolve(b, root)
    ex = tmp_path / "ex"
    ex.mkdir()
    stage(t, store, str(ex))
    assert (ex / "data.txt").read_bytes() == b"data"
    assert (ex / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (ex / "bin/empty").read_bytes() == b""
    assert (ex / "bin/nothing").is_dir() and not any((ex / "bin/nothing").iterdir())
    assert os.readlink(ex / "t") == "bin/tool"
    tool_mode = os.stat(ex / "bin/tool").st_mode
    data_mode = os.stat(ex / "data.txt").st_mode
    assert tool_mode & stat.S_IXUSR and not data_mode & 0o111
    assert not data_mode & 0o222 and not tool_mode & 0o222  # cached inodes are read-only
    assert os.stat(ex / "data.txt").st_nlink >= 2  # hardlinked, not copied


def test_stage_reports_all_missing_file_blobs(tmp_path, store):
    b = Blobs()
    root = b.directory(files=[("a", b"AAA", False), ("b", b"BBB", True), ("c", b"CCC", False)])
    store.write_bytes(digests.of_bytes(FN, b"BBB"), b"BBB")
    t = resolve(b, root)
    ex = tmp_path / "ex"
    ex.mkdir()
    with pytest.raises(MissingBlobs) as ei:
        stage(t, store, str(ex))
    assert set(ei.value.digests) == {digests.of_bytes(FN, b"AAA"), digests.of_bytes(FN, b"CCC")}
    assert (ex / "b").read_bytes() == b"BBB"


def test_stage_never_writes_through_an_existing_symlink(tmp_path, store):
    outside = tmp_path / "outside"
    outside.mkdir()
    b = Blobs()
    root = b.directory(dirs=[("a", b.directory(files=[("f", b"payload", False)]))])
    fill_store(store, b)
    ex = tmp_path / "ex"
    ex.mkdir()
    os.symlink(outside, ex / "a")  # planted before staging
    with pytest.raises(FileExistsError):
        stage(resolve(b, root), store, str(ex))
    assert list(outside.iterdir()) == []


def test_stage_tree_built_by_hand_uses_only_given_paths(tmp_path, store):
    # stage() trusts resolve_tree's checks; with them every created path is under ex.
    b = Blobs()
    root = b.directory(files=[("f", b"1", False)], symlinks=[("s", "f")])
    fill_store(store, b)
    t = resolve(b, root)
    assert t.files == [InputFile("f", digests.of_bytes(FN, b"1"), False)]
    ex = tmp_path / "ex"
    ex.mkdir()
    stage(t, store, str(ex) + "/")
    assert sorted(os.listdir(ex)) == ["f", "s"]
    assert sorted(os.listdir(tmp_path)) == ["cas", "ex"]


def test_digest_helper_round_trip():
    d = digests.of_bytes(FN, b"abc")
    assert pb(d).size_bytes == 3
