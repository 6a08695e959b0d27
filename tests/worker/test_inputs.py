import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from worker_helpers import FN, Blobs, pb

from engine import digest as digests
from engine import native
from engine.cas.local_disk import LocalDiskStore
from engine.pipeline import inputs
from engine.pipeline.inputs import (
    InputError,
    InputFile,
    InputSymlink,
    MissingBlobs,
    resolve_tree,
    stage,
)
from engine.proto import re_pb2


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


# --- limits on attacker-shaped trees ----------------------------------------------------

def chain(b: Blobs, levels: int, leaf=None):
    """levels directories nested in one another ('d/d/...'), leaf (or an empty one) inside."""
    d = b.directory() if leaf is None else leaf
    for _ in range(levels):
        d = b.directory(dirs=[("d", d)])
    return d


def test_depth_limit():
    b = Blobs()
    resolve(b, chain(b, inputs.MAX_DEPTH))
    with pytest.raises(InputError, match=f"nested more than {inputs.MAX_DEPTH} levels"):
        resolve(b, chain(b, inputs.MAX_DEPTH + 1))
    with pytest.raises(InputError, match="nested more than"):
        resolve(b, chain(b, 10_000))


def test_depth_limit_counts_every_path_to_a_shared_directory():
    # C is first met one level down (so fetched at depth 1), but 'y' reaches it 200 levels
    # lower: the expanded tree is too deep even though no fetch level is.
    b = Blobs()
    c = chain(b, 100)
    root = b.directory(dirs=[("x", c), ("y", chain(b, 200, leaf=c))])
    with pytest.raises(InputError, match=r"input root/y/d/d/.*nested more than 256"):
        resolve(b, root)


@pytest.mark.parametrize("name", ["n" * 256, "\u00e9" * 128, "\U0001f600" * 64])
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_names_longer_than_name_max_bytes(kind, name):
    b = Blobs()
    spec = {"file": {"files": [(name, b"x", False)]}, "dir": {"dirs": [(name, b.directory())]},
            "symlink": {"symlinks": [(name, "t")]}}[kind]
    with pytest.raises(InputError, match=r"input root: entry name .* is 256 bytes long"):
        resolve(b, b.directory(**spec))


def test_names_of_name_max_bytes_are_staged(tmp_path, store):
    b = Blobs()
    names = ["n" * 255, "\u00e9" * 127 + "n"]
    root = b.directory(files=[(names[0], b"long", False)],
                       dirs=[(names[1], b.directory(files=[(names[0], b"", True)]))])
    fill_store(store, b)
    ex = tmp_path / "ex"
    ex.mkdir()
    stage(resolve(b, root), store, str(ex))
    assert (ex / names[0]).read_bytes() == b"long"
    assert (ex / names[1] / names[0]).read_bytes() == b""


def test_symlink_target_limit():
    b = Blobs()
    ok = "a/" * 2047 + "b"  # 4095 bytes, the most a symlink holds
    resolve(b, b.directory(symlinks=[("l", ok)]))
    with pytest.raises(InputError, match=r"l: symlink target is 4096 bytes long, more than "
                                         r"the 4095"):
        resolve(b, b.directory(symlinks=[("l", ok + "c")]))


def test_path_length_limit():
    b = Blobs()
    name = "p" * 250
    leaf = b.directory(files=[("f", b"x", False)])
    fits = leaf
    for _ in range(inputs.MAX_PATH_BYTES // 251 - 1):
        fits = b.directory(dirs=[(name, fits)])
    resolve(b, fits)
    too_long = b.directory(dirs=[(name, b.directory(dirs=[(name, fits)]))])
    with pytest.raises(InputError) as ei:
        resolve(b, too_long)
    message = str(ei.value)
    assert f"more than the {inputs.MAX_PATH_BYTES} allowed below the exec root" in message
    assert len(message) < 600  # the path in it is cut short


def test_entries_per_directory_limit(monkeypatch):
    monkeypatch.setattr(inputs, "MAX_DIRECTORY_ENTRIES", 100)
    b = Blobs()
    wide = b.directory(files=[(f"f{i:03d}", b"", False) for i in range(60)],
                       dirs=[(f"g{i:03d}", b.directory()) for i in range(30)],
                       symlinks=[(f"s{i:03d}", "f000") for i in range(11)])
    with pytest.raises(InputError, match=r"input root/sub: Directory .* has 101 entries, "
                                         r"more than the 100 allowed in one directory"):
        resolve(b, b.directory(dirs=[("sub", wide)]))


def test_total_entries_limit_is_checked_while_fetching(monkeypatch):
    # 20 distinct directories of 60 entries: over the limit before the tree is expanded.
    b = Blobs()
    subs = [b.directory(files=[(f"f{i:02d}", str((i, j)).encode(), False) for i in range(60)])
            for j in range(20)]
    root = b.directory(dirs=[(f"d{j:02d}", d) for j, d in enumerate(subs)])
    fetched = []

    def get(d):
        fetched.append(d)
        return b.get(d)

    with pytest.raises(InputError, match="more than 1000 entries"):
        resolve_tree(FN, root, get, max_entries=1000)
    assert len(fetched) <= 18


def test_default_limits_are_the_documented_ones():
    assert (inputs.MAX_DEPTH, inputs.MAX_PATH_BYTES, inputs.NAME_MAX, inputs.MAX_TARGET_BYTES,
            inputs.MAX_DIRECTORY_ENTRIES, inputs.DEFAULT_MAX_ENTRIES) == (
        256, 3072, 255, 4095, 200_000, 1_000_000)
    for text in ("MAX_DEPTH = 256", "MAX_PATH_BYTES = 3072", "NAME_MAX = 255",
                 "MAX_TARGET_BYTES = 4095", "MAX_DIRECTORY_ENTRIES = 200,000",
                 "DEFAULT_MAX_ENTRIES = 1,000,000"):
        assert text in inputs.__doc__


def test_messages_cut_long_names_short():
    b = Blobs()
    with pytest.raises(InputError) as ei:
        resolve(b, b.directory(files=[("x" * 100_000, b"", False)]))
    assert len(str(ei.value)) < 400 and "100000 bytes" in str(ei.value)


# --- staging many files (the IndexError of M4) -------------------------------------------

@pytest.fixture
def fast_tmp(tmp_path):
    """A directory on tmpfs when there is one (thousands of files there take a fraction of
    the time they take on a busy disk), else tmp_path."""
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="stoker-inputs-", dir="/dev/shm")
    yield Path(path)
    shutil.rmtree(path)


@pytest.fixture(params=["native", "python"])
def core(request, monkeypatch):
    """Each implementation of link_tree in turn; their results must be the same."""
    impl = getattr(native, request.param)
    if impl is None:
        pytest.skip("the native core is not built")
    monkeypatch.setattr(native, "link_tree", impl.link_tree)
    monkeypatch.setattr(inputs, "_STAGE_THREADS", 2)  # the parallel path, on any machine
    return impl


@pytest.mark.slow
def test_stage_100k_empty_files_in_one_directory(fast_tmp, core):
    b = Blobs()
    n = 100_000
    root = b.directory(files=[(f"f{i:06d}", b"", i % 2 == 0) for i in range(n)])
    t = resolve(b, root)
    with LocalDiskStore(str(fast_tmp / "cas")) as store:
        ex = fast_tmp / "ex"
        ex.mkdir()
        stage(t, store, str(ex))
    names = sorted(os.listdir(ex))
    assert len(names) == n and names[0] == "f000000"
    for name, mode in (("f000000", 0o555), ("f000001", 0o444), (names[-1], 0o444)):
        st = os.lstat(ex / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == mode


def leave_dirty(root: str) -> None:
    """Open the store in another process that exits without closing it (like a crash)."""
    code = ("import os, sys\nfrom engine.cas.local_disk import LocalDiskStore\n"
            "LocalDiskStore(sys.argv[1])\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, root], check=True, timeout=60)


@pytest.mark.slow
def test_stage_4096_files_after_a_dirty_restart(fast_tmp, core):
    """After a crash every cached blob is unverified, so no file is linked in bulk: the
    parallel linker got no links and failed with IndexError on every try."""
    b = Blobs()
    n = inputs._PARALLEL_LINKS + 4
    contents = [f"blob {i}\n".encode() for i in range(n)]
    half = n // 2
    root = b.directory(dirs=[(f"d{j}", b.directory(files=[
        (f"f{i:05d}", c, i % 3 == 0) for i, c in enumerate(contents[j * half:(j + 1) * half])]))
        for j in range(2)])
    cas = str(fast_tmp / "cas")
    with LocalDiskStore(cas) as store:
        assert store.write_many([(digests.of_bytes(FN, c), c) for c in contents]) == [None] * n
    leave_dirty(cas)
    t = resolve(b, root)
    for attempt in range(2):  # and again after a clean restart, still unverified
        with LocalDiskStore(cas) as store:
            assert store.stats()["unverified"] >= n // 2
            ex = fast_tmp / f"ex{attempt}"
            ex.mkdir()
            stage(t, store, str(ex))
        assert (ex / "d0" / "f00000").read_bytes() == contents[0]
        assert (ex / "d1" / f"f{half - 1:05d}").read_bytes() == contents[-1]
        assert sum(len(os.listdir(ex / d)) for d in ("d0", "d1")) == n
        if attempt == 0:
            # The first stage verified every blob; forget that, as a store mid-check would.
            leave_dirty(cas)
