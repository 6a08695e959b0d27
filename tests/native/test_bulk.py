"""The bulk paths built on the native core: digest_many's per-directory shortcuts, and the
callers that split a large batch over threads (engine.hashing.hash_many for digests,
engine.pipeline.inputs.stage for links). Each must give exactly what one plain call gives.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import hashing, native
from engine.digest import Digest
from engine.pipeline import inputs
from engine.pipeline.inputs import InputFile, InputTree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["python", "native"])
def core(request) -> native.Core:
    if request.param == "python":
        return native.python
    if native.native is None:
        pytest.skip(f"engine._native is not built: {native.NATIVE_ERROR}")
    return native.native


def sha(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def test_digest_many_in_one_directory_gives_each_path_its_own_result(core, tmp_path,
                                                                     monkeypatch):
    """Runs of files in one directory are opened relative to it: every way of naming a
    file, and every kind of failure inside such a run, must read as with the full path."""
    a = tmp_path / "a"
    a.mkdir()
    data = {f"f{i}": os.urandom(100 * i) for i in range(8)}
    for name, content in data.items():
        (a / name).write_bytes(content)
    (a / "é").write_bytes(b"accented")
    (a / "sub").mkdir()
    os.mkfifo(a / "fifo")
    os.symlink(a / "f0", a / "ln")
    os.symlink(a, tmp_path / "via")  # a symlink before the last component is followed
    monkeypatch.chdir(tmp_path)
    ok = [
        (str(a / "f0"), data["f0"]), (str(a / "f1"), data["f1"]),
        (os.fsencode(a / "f2"), data["f2"]), (a / "f3", data["f3"]),
        (str(a / "é"), b"accented"), (f"{a}//f4", data["f4"]), (f"{a}/./f5", data["f5"]),
        (f"{a}/../a/f6", data["f6"]), ("a/f7", data["f7"]), (str(tmp_path / "via/f1"),
                                                           data["f1"]),
        (str(a / "f7"), data["f7"]),
    ]
    bad = [(str(a / "sub"), errno.EISDIR), (str(a / "fifo"), errno.EINVAL),
           (str(a / "ln"), errno.ELOOP), (str(a / "missing"), errno.ENOENT),
           (str(a / "f0/x"), errno.ENOTDIR), (f"{a}/", errno.EISDIR)]
    assert core.digest_many("sha256", [p for p, _ in ok]) == [sha(d) for _, d in ok]
    # The failures sit between good files of the same directory, so the shortcut is in use.
    paths, expected = [], []
    for k, (p, code) in enumerate(bad):
        paths += [ok[k][0], p]
        expected.append((2 * k + 1, code))
    with pytest.raises(OSError) as info:
        core.digest_many("sha256", paths)
    assert info.value.errno == errno.EISDIR and info.value.filename == bad[0][0]
    assert info.value.failures == expected
    for path in ["a/f\0", b"a/f\0"]:
        with pytest.raises(ValueError, match="embedded null byte"):
            core.digest_many("sha256", [str(a / "f0"), path])


def test_digest_many_reads_files_the_caller_does_not_own(tmp_path):
    """O_NOATIME is refused (EPERM) on a file another user owns unless the caller has
    CAP_FOWNER; digest_many must then read it without the flag. The reader runs without
    CAP_FOWNER (root otherwise has it)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop CAP_FOWNER")
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * (i + 1))
        os.chown(p, 65534, 65534)
        paths.append(str(p))
    code = ("import sys, json; from engine import native; print(json.dumps("
            "[native.IMPLEMENTATION, native.digest_many('sha256', sys.argv[1:])]))")
    out = subprocess.run(["setpriv", "--bounding-set", "-fowner", sys.executable, "-c", code,
                          *paths], cwd=REPO, capture_output=True, text=True, check=True).stdout
    implementation, got = json.loads(out)
    assert implementation == native.IMPLEMENTATION
    assert [tuple(x) for x in got] == [sha(b"x" * (i + 1)) for i in range(4)]


# -- hash_many: slices over threads ------------------------------------------------------------

def many_files(root: Path, count: int, dirs: int = 13) -> tuple[list[str], list[bytes]]:
    paths, contents = [], []
    for i in range(count):
        d = root / f"d{i * dirs // count:02d}"
        d.mkdir(exist_ok=True)
        data = f"{i}\n".encode() * (i % 7)
        (d / f"f{i}").write_bytes(data)
        paths.append(str(d / f"f{i}"))
        contents.append(data)
    return paths, contents


@pytest.fixture(params=["python", "native"])
def hashing_core(request, monkeypatch):
    """engine.hashing with the given implementation behind it."""
    c = native.python if request.param == "python" else native.native
    if c is None:
        pytest.skip(f"engine._native is not built: {native.NATIVE_ERROR}")
    monkeypatch.setattr(native, "digest_many", c.digest_many)
    return c


@pytest.mark.slow
def test_hash_many_splits_a_large_batch_and_keeps_its_order(hashing_core, tmp_path):
    paths, contents = many_files(tmp_path, 3 * hashing._PARALLEL_FILES + 5)
    assert hashing.hash_many("sha256", paths) == [sha(c) for c in contents]
    assert hashing.hash_many("sha256", paths) == hashing_core.digest_many("sha256", paths)


def test_hash_many_reports_failures_with_indices_into_the_whole_batch(hashing_core,
                                                                      tmp_path):
    paths, _ = many_files(tmp_path, 3 * hashing._PARALLEL_FILES + 5)
    # One failure early, two in other slices (whatever the slice size).
    bad = [3, len(paths) // 2, len(paths) - 1]
    for i in bad:
        os.unlink(paths[i])
    with pytest.raises(FileNotFoundError) as info:
        hashing.hash_many("sha256", paths)
    assert info.value.filename == paths[3]
    assert info.value.failures == [(i, errno.ENOENT) for i in bad]


# -- stage: links over threads -----------------------------------------------------------------

class LinkSourceStore:
    """The part of a store stage() uses, over plain source files: `gone` names the files
    whose bulk source vanished before linking (as if evicted); link_into then renews them."""

    def __init__(self, root: Path, gone: set[int]):
        self.root = root
        self.gone = gone
        self.noted: list[Digest] = []
        self.renewed: list[Digest] = []

    def source(self, d: Digest) -> str:
        return str(self.root / d.hash)

    def bulk_link_source(self, d: Digest, executable: bool) -> str:
        index = int(d.hash[:8], 16)
        return self.source(d) + ("-evicted" if index in self.gone else "")

    def note_linked(self, d: Digest, executable: bool) -> None:
        self.noted.append(d)

    def link_into(self, d: Digest, executable: bool, dest: str) -> None:
        self.renewed.append(d)
        os.link(self.source(d), dest)


def input_tree(src: Path, count: int, per_dir: int) -> InputTree:
    src.mkdir()
    files, dirs = [], []
    for i in range(count):
        data = f"file {i}\n".encode()
        h = f"{i:08x}" + hashlib.sha256(data).hexdigest()[8:]
        (src / h).write_bytes(data)
        # Two levels, so that a thread's part starts inside a subtree.
        top, sub = f"t{i // (per_dir * 4)}", f"s{i // per_dir}"
        if f"{top}" not in dirs:
            dirs.append(top)
        if f"{top}/{sub}" not in dirs:
            dirs.append(f"{top}/{sub}")
        files.append(InputFile(f"{top}/{sub}/f{i}", Digest("sha256", h, len(data)), False))
    return InputTree(Digest("sha256", "0" * 64, 0), dirs, files)


@pytest.mark.parametrize("count", [100, pytest.param(inputs._PARALLEL_LINKS + 37,
                                                    marks=pytest.mark.slow)])
def test_stage_gives_one_tree_however_it_is_split(core, monkeypatch, tmp_path, count):
    monkeypatch.setattr(native, "link_tree", core.link_tree)
    gone = {5, count // 2, count - 1}
    tree = input_tree(tmp_path / "src", count, per_dir=97)
    store = LinkSourceStore(tmp_path / "src", gone)
    dest = tmp_path / "dest"
    dest.mkdir()
    inputs.stage(tree, store, str(dest))
    made = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert made == sorted(tree.dirs + [f.path for f in tree.files])
    for f in tree.files:
        st = (dest / f.path).stat()
        assert st.st_ino == (tmp_path / "src" / f.digest.hash).stat().st_ino
    assert sorted(int(d.hash[:8], 16) for d in store.renewed) == sorted(gone)
    assert len(store.noted) == count - len(gone)
    assert not {int(d.hash[:8], 16) for d in store.noted} & gone


def test_stage_in_parallel_raises_the_first_failure_and_stops(core, monkeypatch, tmp_path):
    count = inputs._PARALLEL_LINKS + 37
    tree = input_tree(tmp_path / "src", count, per_dir=97)
    store = LinkSourceStore(tmp_path / "src", set())
    dest = tmp_path / "dest"
    dest.mkdir()
    # Occupy two destinations, in different threads' parts: the earlier one is reported.
    early, late = tree.files[10].path, tree.files[count - 10].path
    original = core.link_tree

    def link_tree(root, dirs, links, *rest):
        failed = original(root, dirs, [], *rest)
        for rel in (early, late):
            if any(d == rel for d, _ in links):
                (Path(root) / rel).write_bytes(b"in the way")
        return failed + original(root, [], links, *rest)

    monkeypatch.setattr(native, "link_tree", link_tree)
    with pytest.raises(FileExistsError) as info:
        inputs.stage(tree, store, str(dest))
    assert info.value.filename == str(dest / early)
    assert store.noted == []
