import os
import stat

import pytest
from worker_helpers import FN, dg

from engine import digest as digests
from engine.pipeline.inputs import InputError
from engine.pipeline.outputs import OutputError, collect_outputs
from engine.proto import re_pb2


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def write(path, data: bytes, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def collect(store, root, **cmd):
    return collect_outputs(FN, re_pb2.Command(arguments=["x"], **cmd), str(root), store)


def read_tree(store, od: re_pb2.OutputDirectory) -> re_pb2.Tree:
    data = store.read_bytes(dg(od.tree_digest))
    tree = re_pb2.Tree()
    tree.ParseFromString(data)
    assert tree.SerializeToString() == data  # canonical encoding
    return tree


def test_output_paths_files_dirs_symlinks_and_missing(store, root):
    write(root / "out/lib.a", b"archive")
    write(root / "out/tool", b"#!/bin/sh\n", 0o755)
    write(root / "gen/sub/b.txt", b"bee")
    write(root / "gen/a.txt", b"ay", 0o700)
    (root / "gen/empty").mkdir()
    os.symlink("a.txt", root / "gen/link")
    os.symlink("out/lib.a", root / "alias")
    res = collect(store, root, output_paths=["alias", "gen", "missing", "out/lib.a", "out/tool"])

    assert {f.path: (dg(f.digest), f.is_executable) for f in res.files} == {
        "out/lib.a": (digests.of_bytes(FN, b"archive"), False),
        "out/tool": (digests.of_bytes(FN, b"#!/bin/sh\n"), True),
    }
    assert [(s.path, s.target) for s in res.symlinks] == [("alias", "out/lib.a")]
    assert res.file_symlinks == [] and res.directory_symlinks == []
    [od] = res.directories
    assert od.path == "gen" and od.is_topologically_sorted
    tree = read_tree(store, od)
    root_dir = tree.root
    assert [(f.name, f.is_executable) for f in root_dir.files] == [("a.txt", True)]
    assert [d.name for d in root_dir.directories] == ["empty", "sub"]
    assert [(s.name, s.target) for s in root_dir.symlinks] == [("link", "a.txt")]
    assert dg(od.root_directory_digest) == digests.of_bytes(FN, root_dir.SerializeToString())
    children = {digests.of_bytes(FN, c.SerializeToString()): c for c in tree.children}
    sub = children[dg(root_dir.directories[1].digest)]
    assert [(f.name, dg(f.digest)) for f in sub.files] == [("b.txt",
                                                            digests.of_bytes(FN, b"bee"))]
    assert dg(root_dir.directories[0].digest) in children  # the empty Directory
    # Every file and Directory is in the store.
    assert store.read_bytes(digests.of_bytes(FN, b"bee")) == b"bee"
    assert store.read_bytes(digests.of_bytes(FN, b"archive")) == b"archive"
    for d in children:
        assert store.has(d)
    assert store.has(dg(od.root_directory_digest))
    assert set(res.inserted) <= set(res.blobs)
    assert dg(od.tree_digest) in res.blobs


def test_tree_is_deterministic_and_deduplicated(store, tmp_path):
    digests_seen = []
    for n, order in enumerate([("x", "y"), ("y", "x")]):
        r = tmp_path / f"r{n}"
        for name in order:  # creation order differs; the Tree must not
            write(r / f"d/{name}/same.txt", b"same")
        write(r / "d/z.txt", b"z")
        res = collect(store, r, output_paths=["d"])
        [od] = res.directories
        digests_seen.append(dg(od.tree_digest))
        tree = read_tree(store, od)
        assert len(tree.children) == 1  # x and y are the same Directory
    assert digests_seen[0] == digests_seen[1]


def test_tree_encoding_matches_protobuf(store, root):
    write(root / "d/a/b/c/f", b"deep")
    write(root / "d/a/g", b"g")
    [od] = collect(store, root, output_paths=["d"]).directories
    tree = read_tree(store, od)
    rebuilt = re_pb2.Tree(root=tree.root, children=list(tree.children))
    assert digests.of_bytes(FN, rebuilt.SerializeToString()) == dg(od.tree_digest)
    assert len(tree.children) == 3  # a, a/b, a/b/c: parents before children
    assert [len(c.directories) for c in tree.children] == [1, 1, 0]


def test_legacy_fields(store, root):
    write(root / "f.o", b"obj")
    write(root / "dir/x", b"x")
    os.symlink("f.o", root / "flink")
    os.symlink("dir", root / "dlink")
    res = collect(store, root, output_files=["f.o", "flink", "nothing"],
                  output_directories=["dir", "dlink", "nodir"])
    assert [f.path for f in res.files] == ["f.o"]
    assert [(s.path, s.target) for s in res.file_symlinks] == [("flink", "f.o")]
    assert [(s.path, s.target) for s in res.directory_symlinks] == [("dlink", "dir")]
    assert res.symlinks == []  # output_symlinks is for output_paths only
    assert [d.path for d in res.directories] == ["dir"]


def test_output_paths_ignore_legacy_fields(store, root):
    write(root / "a", b"a")
    write(root / "b", b"b")
    res = collect(store, root, output_paths=["a"], output_files=["b"])
    assert [f.path for f in res.files] == ["a"]


@pytest.mark.parametrize("field,make,problem", [
    ("output_files", "dir", "is a directory"),
    ("output_directories", "file", "is a file"),
    ("output_files", "link-to-dir", "symlink to a directory"),
    ("output_directories", "link-to-file", "symlink to a file"),
    ("output_paths", "fifo", "not a regular file"),
])
def test_wrong_kinds_are_output_errors(store, root, field, make, problem):
    write(root / "somefile", b"s")
    (root / "somedir").mkdir()
    target = root / "o"
    if make == "dir":
        target.mkdir()
    elif make == "file":
        write(target, b"f")
    elif make == "link-to-dir":
        os.symlink("somedir", target)
    elif make == "link-to-file":
        os.symlink("somefile", target)
    else:
        os.mkfifo(target)
    with pytest.raises(OutputError, match=problem):
        collect(store, root, **{field: ["o"]})


def test_fifo_inside_an_output_directory_is_an_output_error(store, root):
    (root / "d").mkdir()
    os.mkfifo(root / "d/pipe")
    with pytest.raises(OutputError, match="d/pipe"):
        collect(store, root, output_paths=["d"])


def test_names_that_are_not_utf8_are_output_errors(store, root):
    (root / "d").mkdir()
    open(os.path.join(os.fsencode(root / "d"), b"bad\xff"), "w").close()
    with pytest.raises(OutputError, match="'d'.*cannot be represented"):
        collect(store, root, output_paths=["d"])
    os.symlink(b"target\xfe", os.fsencode(root / "l"))
    with pytest.raises(OutputError, match="'l' is a symlink whose target is not valid UTF-8"):
        collect(store, root, output_paths=["l"])


def test_paths_are_relative_to_the_working_directory(store, root):
    write(root / "w/out/x", b"x")
    write(root / "top", b"t")
    res = collect(store, root, working_directory="w", output_paths=["../top", "out/x"])
    assert sorted(f.path for f in res.files) == ["../top", "out/x"]


def test_outputs_escaping_the_exec_root_are_input_errors(store, root, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret", b"secret")
    with pytest.raises(InputError, match="output_paths: .*outside"):
        collect(store, root, output_paths=["../outside/secret"])
    os.symlink(outside, root / "sneaky")  # the action replaced a parent with a symlink
    with pytest.raises(InputError, match="output_paths: 'sneaky/secret' resolves outside"):
        collect(store, root, output_paths=["sneaky/secret"])
    with pytest.raises(InputError, match="output_files: .*absolute"):
        collect(store, root, output_files=["/etc/passwd"])
    assert not store.has(digests.of_bytes(FN, b"secret"))


def test_symlinked_output_directory_is_reported_not_followed(store, root, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret", b"secret")
    os.symlink("../outside", root / "d")  # relative; an absolute one is refused below
    res = collect(store, root, output_paths=["d"])
    assert [(s.path, s.target) for s in res.symlinks] == [("d", "../outside")]
    assert res.directories == [] and not store.has(digests.of_bytes(FN, b"secret"))


def test_absolute_symlinks(store, root):
    os.symlink("/usr/bin/env", root / "abs")
    with pytest.raises(OutputError, match="absolute"):
        collect(store, root, output_paths=["abs"])
    res = collect_outputs(FN, re_pb2.Command(output_paths=["abs"]), str(root), store,
                          allow_absolute_symlinks=True)
    assert res.symlinks[0].target == "/usr/bin/env"
    (root / "d").mkdir()
    os.symlink("/etc", root / "d/etc")
    with pytest.raises(OutputError, match="d/etc"):
        collect(store, root, output_paths=["d"])


def test_empty_path_captures_the_whole_working_directory(store, root):
    write(root / "a", b"a")
    write(root / "s/b", b"b")
    res = collect(store, root, output_directories=[""])
    [od] = res.directories
    assert od.path == ""
    tree = read_tree(store, od)
    assert [f.name for f in tree.root.files] == ["a"]
    assert [d.name for d in tree.root.directories] == ["s"]


def test_file_in_two_outputs_is_digested_and_stored_once(store, root):
    write(root / "d/x", b"shared")
    res = collect(store, root, output_paths=["d", "d/x"])
    assert [f.path for f in res.files] == ["d/x"]
    assert res.inserted.count(digests.of_bytes(FN, b"shared")) == 1
    assert store.read_bytes(digests.of_bytes(FN, b"shared")) == b"shared"


def test_hardlinked_outputs_are_copied_not_moved(store, root):
    write(root / "o", b"linked twice")
    os.link(root / "o", root / "other-name")
    collect(store, root, output_paths=["o"])
    assert (root / "o").read_bytes() == b"linked twice"
    os.chmod(root / "other-name", 0o644)
    (root / "other-name").write_bytes(b"changed")  # through the other link
    assert store.read_bytes(digests.of_bytes(FN, b"linked twice")) == b"linked twice"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_outputs_owned_by_the_action_user_are_taken_over(store, root, tmp_path):
    write(root / "o", b"made by nobody")
    os.chown(root / "o", 65534, 65534)
    collect(store, root, output_paths=["o"])
    d = digests.of_bytes(FN, b"made by nobody")
    staged = tmp_path / "staged"
    store.link_into(d, False, str(staged))
    st = os.stat(staged)
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o222


def test_logs_are_captured_with_the_outputs(store, root, tmp_path):
    p = tmp_path / "stdout"
    p.write_bytes(b"hello\n")
    (tmp_path / "stderr").write_bytes(b"")
    res = collect_outputs(FN, re_pb2.Command(arguments=["x"]), str(root), store,
                          logs=[str(p), str(tmp_path / "stderr")])
    d, empty = res.logs
    assert d == digests.of_bytes(FN, b"hello\n") and store.read_bytes(d) == b"hello\n"
    assert empty == digests.of_bytes(FN, b"")
    assert p.read_bytes() == b"hello\n"  # copied, not moved
    assert stat.S_ISREG(os.stat(p).st_mode)


def test_fill_action_result(store, root):
    write(root / "f", b"f")
    os.symlink("f", root / "l")
    res = collect(store, root, output_paths=["f", "l"])
    result = re_pb2.ActionResult()
    res.fill(result)
    assert [f.path for f in result.output_files] == ["f"]
    assert [s.path for s in result.output_symlinks] == ["l"]


def test_outputs_are_published_by_copy_never_the_actions_inode(store, root):
    """A process elsewhere may still hold the output open for writing (an fd passed over a
    socket before the action ended): the cache must not share its inode."""
    write(root / "o", b"single link")
    held = open(root / "o", "r+b")  # noqa: SIM115 - the fd that outlives the action
    try:
        collect(store, root, output_paths=["o"])
        held.write(b"REWRITTEN!!")
        held.flush()
    finally:
        held.close()
    d = digests.of_bytes(FN, b"single link")
    assert store.read_bytes(d) == b"single link"


def test_output_parent_symlink_out_of_the_root_is_refused(store, root, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret", b"not the action's")
    os.symlink(str(outside), root / "abs")
    os.symlink("../outside", root / "rel")
    for path in ("abs/secret", "rel/secret"):
        with pytest.raises(InputError, match="outside the exec root"):
            collect(store, root, output_paths=[path])
    assert store.find_missing([digests.of_bytes(FN, b"not the action's")])


def test_output_parent_symlink_inside_the_root_is_followed(store, root):
    write(root / "real/f", b"through a link")
    os.symlink("real", root / "alias")
    res = collect(store, root, output_paths=["alias/f"])
    assert [(f.path, dg(f.digest)) for f in res.files] == [
        ("alias/f", digests.of_bytes(FN, b"through a link"))]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own the file")
def test_a_file_the_action_user_cannot_read_is_refused(store, root, tmp_path):
    """A hardlink to another user's private file (what protected_hardlinks=0 allows) is not
    an output: collecting runs as root and would otherwise publish it."""
    private = tmp_path / "private"
    write(private, b"root's 0600 secret", 0o600)
    os.link(private, root / "o")
    write(root / "dir/inner", b"x")
    os.link(private, root / "dir/leak")
    run_as = (60976, 60976)
    for cmd in ({"output_paths": ["o"]}, {"output_paths": ["dir"]}):
        with pytest.raises(OutputError, match="cannot read"):
            collect_outputs(FN, re_pb2.Command(arguments=["x"], **cmd), str(root), store,
                            run_as=run_as)
    assert store.find_missing([digests.of_bytes(FN, b"root's 0600 secret")])
    # Its own files, and root's world-readable inputs, are fine.
    os.chown(root / "dir/inner", *run_as)
    os.unlink(root / "dir/leak")
    collect_outputs(FN, re_pb2.Command(arguments=["x"], output_paths=["dir"]), str(root),
                    store, run_as=run_as)


def test_an_output_grown_after_the_size_check_is_refused_before_it_is_stored(
        store, root, monkeypatch):
    """A process that outlived the action with an fd on an output (not as root) may grow it
    between the size check and the read: it is then refused by the same limit, and nothing
    of it reaches the store."""
    from engine import hashing
    from engine.pipeline.outputs import OutputsTooLarge

    write(root / "o", b"small")
    real = hashing.hash_many

    def grow_first(function, paths):
        os.truncate(root / "o", 1 << 20)
        return real(function, paths)

    monkeypatch.setattr(hashing, "hash_many", grow_first)
    with pytest.raises(OutputsTooLarge, match=r"1048576 bytes \(1\.0 MiB\) once read.*"
                       r"at most 65536 bytes"):
        collect_outputs(FN, re_pb2.Command(arguments=["x"], output_paths=["o"]), str(root),
                        store, limit=64 << 10)
    assert store.find_missing([digests.of_bytes(FN, bytes(1 << 20))])
    assert store.stats()["entries"] == 0


def test_hard_links_are_digested_once_and_counted_once(store, root, monkeypatch):
    from engine import hashing

    write(root / "d/f", b"x" * 1000)
    for i in range(50):
        os.link(root / "d/f", root / f"d/l{i}")
        os.link(root / "d/f", root / f"l{i}")
    hashed: list[str] = []
    real = hashing.hash_many
    monkeypatch.setattr(hashing, "hash_many",
                        lambda fn, paths: hashed.extend(paths) or real(fn, paths))
    res = collect_outputs(FN, re_pb2.Command(arguments=["x"], output_paths=[
        "d", *(f"l{i}" for i in range(50))]), str(root), store, limit=1000)
    assert len(hashed) == 1
    assert {dg(f.digest) for f in res.files} == {digests.of_bytes(FN, b"x" * 1000)}
    tree = read_tree(store, res.directories[0])
    assert len(tree.root.files) == 51
