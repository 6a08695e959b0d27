"""The native core's contract, run against every implementation (engine._native and the
pure-Python twin in engine/native.py), plus checks that both give identical trees and digests.
"""

import errno
import gc
import hashlib
import os
import subprocess
import sys
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

from engine import native

FUNCTIONS = ["sha256", "blake3"]
VECTORS = {
    ("sha256", b""): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ("sha256", b"abc"): "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    ("blake3", b""): "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    ("blake3", b"abc"): "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
    # FIPS 180-2's "one million a" example: larger than every buffer the cores use.
    ("sha256", b"a" * 1_000_000):
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
}
# Sizes around every threshold the implementations switch on: the GIL (2 KiB), the read
# buffer (256 KiB), BLAKE3 threads (1 MiB) and BLAKE3 mmap (4 MiB).
SIZES = [0, 1, 2047, 2048, 4096, (256 << 10) - 1, 256 << 10, (256 << 10) + 1, (1 << 20) + 3,
         (4 << 20) + 7]


@pytest.fixture(params=["python", "native"])
def core(request) -> native.Core:
    if request.param == "python":
        return native.python
    if native.native is None:
        pytest.skip(f"engine._native is not built: {native.NATIVE_ERROR}")
    return native.native


def reference(function: str, data: bytes) -> tuple[str, int]:
    h = hashlib.sha256(data) if function == "sha256" else blake3.blake3(data)
    return h.hexdigest(), len(data)


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not periodic at 4K
    return (block * (size // len(block) + 1))[:size]


def write(path: Path, data: bytes, mode: int = 0o644) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


# -- digests ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("function", "data"), list(VECTORS))
def test_known_vectors(core, function, data, tmp_path):
    expected = (VECTORS[function, data], len(data))
    assert core.hash_buffer(function, data) == expected
    assert core.hash_file(function, write(tmp_path / "f", data)) == expected


@pytest.mark.parametrize("function", FUNCTIONS)
def test_buffers_files_and_fds_agree(core, function, tmp_path):
    for size in SIZES:
        data = pattern(size, size)
        expected = reference(function, data)
        path = write(tmp_path / f"f{size}", data)
        assert core.hash_buffer(function, data) == expected, size
        assert core.hash_buffer(function, bytearray(data)) == expected, size
        assert core.hash_buffer(function, memoryview(data)) == expected, size
        assert core.hash_file(function, path) == expected, size
        assert core.hash_file(function, Path(path)) == expected, size
        assert core.hash_file(function, os.fsencode(path)) == expected, size
        fd = os.open(path, os.O_RDONLY)
        try:
            assert core.hash_fd(function, fd) == expected, size
            os.lseek(fd, min(size, 10), os.SEEK_SET)  # an fd is hashed from its offset
            assert core.hash_fd(function, fd) == reference(function, data[10:]), size
        finally:
            os.close(fd)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_buffer_kinds(core, function):
    ints = array("i", range(1000))
    assert core.hash_buffer(function, ints) == reference(function, ints.tobytes())
    with pytest.raises(BufferError):
        core.hash_buffer(function, memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        core.hash_buffer(function, "text")


@pytest.mark.parametrize("function", FUNCTIONS)
def test_hash_fd_reads_a_pipe(core, function):
    r, w = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c",
                               f"import os; os.write({w}, bytes(300000))"], pass_fds=(w,))
    os.close(w)
    try:
        assert core.hash_fd(function, r) == reference(function, bytes(300000))
    finally:
        os.close(r)
        writer.wait()


def test_unsupported_function_is_named(core, tmp_path):
    path = write(tmp_path / "f", b"x")
    for call in (lambda: core.hash_buffer("md5", b"x"), lambda: core.hash_file("md5", path),
                 lambda: core.digest_many("md5", [path]),
                 lambda: core.hashed_chunks("md5", path, 10)):
        with pytest.raises(ValueError, match="unsupported digest function 'md5'"):
            call()


@pytest.mark.parametrize("function", FUNCTIONS)
def test_hash_file_refuses_what_is_not_a_regular_file(core, function, tmp_path):
    target = write(tmp_path / "target", b"secret")
    os.symlink(target, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block: it must not
    cases = {
        "missing": (FileNotFoundError, errno.ENOENT),
        "link": (OSError, errno.ELOOP),
        "fifo": (OSError, errno.EINVAL),
        ".": (IsADirectoryError, errno.EISDIR),
    }
    for name, (kind, code) in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(kind) as info:
            core.hash_file(function, path)
        assert info.value.errno == code, name
        assert info.value.filename == path, name
    with pytest.raises(ValueError, match="embedded null byte"):
        core.hash_file(function, str(tmp_path / "a\0b"))


# -- digest_many -------------------------------------------------------------------------------

def mixed_tree(root: Path) -> list[str]:
    """Files of every size class: empty, tiny, around the thresholds, one past BLAKE3's
    arena file limit, and enough medium ones to need several arena batches."""
    sizes = [0, 1, 100, 4096, 0, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20]
    sizes += [700_000] * 14  # ~9.8 MB: more than one 8 MiB arena
    sizes += [1000 + i for i in range(50)]
    paths = []
    for i, size in enumerate(sizes):
        sub = root / f"d{i % 7}"
        sub.mkdir(exist_ok=True)
        paths.append(write(sub / f"f{i}", pattern(size, i)))
    return paths


@pytest.mark.parametrize("function", FUNCTIONS)
def test_digest_many_matches_single_files(core, function, tmp_path):
    paths = mixed_tree(tmp_path)
    got = core.digest_many(function, paths)
    assert got == [reference(function, Path(p).read_bytes()) for p in paths]
    assert core.digest_many(function, []) == []
    assert core.digest_many(function, iter(paths[:3])) == got[:3]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_digest_many_reports_every_failed_path(core, function, tmp_path):
    (tmp_path / "t").mkdir()
    good = mixed_tree(tmp_path / "t")[:12]
    target = write(tmp_path / "target", b"secret")
    os.symlink(target, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    bad = {2: (str(tmp_path / "missing"), errno.ENOENT),
           5: (str(tmp_path), errno.EISDIR),
           7: (str(tmp_path / "fifo"), errno.EINVAL),
           9: (str(tmp_path / "link"), errno.ELOOP)}
    paths = list(good)
    for i, (p, _) in sorted(bad.items()):
        paths.insert(i, p)
    with pytest.raises(FileNotFoundError) as info:
        core.digest_many(function, paths)
    assert info.value.filename == bad[2][0]
    assert info.value.failures == [(i, code) for i, (_, code) in sorted(bad.items())]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_calls_from_many_threads_do_not_mix(core, function, tmp_path):
    paths = mixed_tree(tmp_path)
    expected = [reference(function, Path(p).read_bytes()) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(core.digest_many, function, paths[i::4]) for i in range(4)]
        jobs += [pool.submit(core.hash_file, function, p) for p in paths]
        assert [j.result() for j in jobs[:4]] == [expected[i::4] for i in range(4)]
        assert [j.result() for j in jobs[4:]] == expected


def test_digest_many_is_identical_in_both_implementations(tmp_path):
    if native.native is None:
        pytest.skip("engine._native is not built")
    paths = mixed_tree(tmp_path)
    for function in FUNCTIONS:
        assert native.native.digest_many(function, paths) == \
            native.python.digest_many(function, paths)


# -- link_tree ---------------------------------------------------------------------------------

def make_sources(root: Path) -> dict[str, str]:
    root.mkdir()
    return {name: write(root / name, pattern(n * 100, n), mode)
            for n, (name, mode) in [(1, ("s1", 0o444)), (2, ("s2", 0o555)), (3, ("s3", 0o444))]}


def snapshot(root: Path) -> list[tuple]:
    """Every entry below root: (path, kind, mode, size, inode of a non-empty file)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = "dir" if os.path.isdir(full) else "file"
            out.append((os.path.relpath(full, root), kind, st.st_mode & 0o7777,
                        st.st_size if kind == "file" else 0,
                        st.st_ino if kind == "file" and st.st_size else 0))
    return sorted(out)


def test_link_tree_stages_a_tree(core, tmp_path):
    src = make_sources(tmp_path / "cas")
    dest = tmp_path / "exec"
    dest.mkdir()
    dirs = ["a", "a/b", "a/b/c", "d", "a/e"]
    links = [("top", src["s1"]), ("a/b/c/deep", src["s2"]), ("a/one", src["s1"]),
             ("a/two", src["s3"]), ("d/x", src["s1"]), ("a/b/y", src["s3"])]
    empties = [("a/b/empty", 0o444), ("d/empty-x", 0o755)]
    old = os.umask(0o077)
    try:
        assert core.link_tree(str(dest), dirs, links, empties) == []
    finally:
        os.umask(old)
    inode = {k: os.stat(v).st_ino for k, v in src.items()}
    expected = [("a", "dir", 0o700, 0, 0), ("a/b", "dir", 0o700, 0, 0),
                ("a/b/c", "dir", 0o700, 0, 0), ("a/e", "dir", 0o700, 0, 0),
                ("d", "dir", 0o700, 0, 0),
                ("a/b/c/deep", "file", 0o555, 200, inode["s2"]),
                ("a/b/empty", "file", 0o444, 0, 0),
                ("a/b/y", "file", 0o444, 300, inode["s3"]),
                ("a/one", "file", 0o444, 100, inode["s1"]),
                ("a/two", "file", 0o444, 300, inode["s3"]),
                ("d/empty-x", "file", 0o755, 0, 0),
                ("d/x", "file", 0o444, 100, inode["s1"]),
                ("top", "file", 0o444, 100, inode["s1"])]
    assert snapshot(dest) == sorted(expected)
    assert os.stat(src["s3"]).st_nlink == 3


def test_link_tree_reports_missing_sources_and_goes_on(core, tmp_path):
    src = make_sources(tmp_path / "cas")
    dest = tmp_path / "exec"
    dest.mkdir()
    gone = str(tmp_path / "cas" / "evicted")
    links = [("f0", src["s2"]), ("f1", gone), ("f2", src["s3"]), ("f3", gone)]
    assert core.link_tree(str(dest), [], links) == [(1, errno.ENOENT), (3, errno.ENOENT)]
    assert sorted(os.listdir(dest)) == ["f0", "f2"]
    # The caller renews the blob and retries only what failed.
    write(Path(gone), b"renewed", 0o444)
    assert core.link_tree(str(dest), [], [links[1], links[3]]) == []
    assert (dest / "f3").read_bytes() == b"renewed"


@pytest.fixture(scope="module")
def full_inode(tmp_path_factory):
    """A file whose link count is at the filesystem's limit (65000 on ext4), or None where
    there is no limit below 70000 (tmpfs)."""
    root = tmp_path_factory.mktemp("linklimit")
    src = write(root / "src", b"popular", 0o444)
    (root / "links").mkdir()
    maker = native.native or native.python
    names = [(f"l{i}", src) for i in range(70_000)]
    failed = maker.link_tree(str(root / "links"), [], names)
    yield src if failed and failed[0][1] == errno.EMLINK else None
    subprocess.run(["rm", "-rf", str(root)], check=True)  # a C rm is much faster here


@pytest.mark.slow  # its fixture makes an inode with 65000 links
def test_link_tree_reports_the_link_limit(core, tmp_path, full_inode):
    if full_inode is None:
        pytest.skip("this filesystem has no hard-link limit below 70000")
    src = make_sources(tmp_path / "cas")
    dest = tmp_path / "exec"
    dest.mkdir()
    links = [("ok", src["s2"]), ("full", full_inode), ("ok2", src["s3"])]
    assert core.link_tree(str(dest), [], links) == [(1, errno.EMLINK)]
    assert sorted(os.listdir(dest)) == ["ok", "ok2"]


def test_link_tree_never_writes_through_a_symlink(core, tmp_path):
    src = make_sources(tmp_path / "cas")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "exec"
    dest.mkdir()
    os.symlink(outside, dest / "a")
    os.symlink(outside / "planted", dest / "dangling")
    attempts = [
        (["a"], [], [], FileExistsError),                         # mkdir over a symlink
        ([], [("a/f", src["s2"])], [], OSError),                  # a symlink as a parent
        ([], [("dangling", src["s2"])], [], FileExistsError),     # link over a symlink
        ([], [], [("dangling", 0o644)], FileExistsError),         # create through one
        ([], [], [("a/new", 0o644)], OSError),
    ]
    for dirs, links, empties, kind in attempts:
        with pytest.raises(kind) as info:
            core.link_tree(str(dest), dirs, links, empties)
        assert info.value.filename.startswith(str(dest) + "/")
    assert os.listdir(outside) == []
    assert sorted(os.listdir(dest)) == ["a", "dangling"]


def test_link_tree_refuses_dot_names_and_names_the_entry(core, tmp_path):
    src = make_sources(tmp_path / "cas")
    dest = tmp_path / "exec"
    dest.mkdir()
    for rel in ("../escape", "x/../../escape", "./x", "x/", "/abs", "x//y"):
        with pytest.raises(OSError) as info:
            core.link_tree(str(dest), ["x"] if rel.startswith("x") else [],
                           [(rel, src["s2"])])
        assert info.value.errno == errno.EINVAL, rel
        for d in os.listdir(dest):
            os.rmdir(dest / d)
    assert not (tmp_path / "escape").exists()
    # Any other error stops the call and names both ends of the link.
    with pytest.raises(FileExistsError) as info:
        core.link_tree(str(dest), [], [("f", src["s2"]), ("f", src["s3"])])
    assert info.value.filename == str(dest / "f")
    assert info.value.filename2 == src["s3"]
    with pytest.raises(FileNotFoundError) as info:
        core.link_tree(str(tmp_path / "nowhere"), ["a"], [])
    assert info.value.filename == str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # a parent that is not in dirs
        core.link_tree(str(dest), [], [("no/such/dir", src["s2"])])


def test_link_tree_goes_deeper_than_path_max(core, tmp_path):
    src = make_sources(tmp_path / "cas")
    dest = tmp_path / "exec"
    dest.mkdir()
    names = [f"{i:02d}" + "x" * 240 for i in range(20)]  # about 4900 bytes in all
    dirs = ["/".join(names[:k]) for k in range(1, 21)]
    assert core.link_tree(str(dest), dirs, [(dirs[-1] + "/f", src["s2"])],
                          [(dirs[-1] + "/e", 0o444)]) == []
    fd = os.open(dest, os.O_RDONLY)
    try:
        for name in names:
            fd, old = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        assert sorted(os.listdir(fd)) == ["e", "f"]
    finally:
        os.close(fd)


def test_link_tree_is_identical_in_both_implementations(tmp_path):
    if native.native is None:
        pytest.skip("engine._native is not built")
    src = make_sources(tmp_path / "cas")
    dirs = [f"d{i}" for i in range(20)] + [f"d{i}/s{j}" for i in range(20) for j in range(5)]
    links = [(f"{d}/f{k}", src[f"s{1 + k % 3}"]) for d in dirs for k in range(10)]
    links.insert(17, ("d0/missing", str(tmp_path / "cas" / "nope")))
    empties = [(f"{d}/e", 0o555) for d in dirs[::3]]
    trees = {}
    for c in (native.native, native.python):
        dest = tmp_path / c.name
        dest.mkdir()
        assert c.link_tree(str(dest), dirs, links, empties, 0o750) == [(17, errno.ENOENT)]
        trees[c.name] = [e[:4] for e in snapshot(dest)]
    assert trees["native"] == trees["python"]
    assert len(trees["native"]) == len(dirs) + len(links) - 1 + len(empties)


# -- chunks --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3005])
def test_chunks_cover_the_file_exactly(core, size, tmp_path):
    data = pattern(size)
    path = write(tmp_path / "f", data)
    pieces = list(core.chunks(path, 1000))
    assert all(isinstance(p, memoryview) and p.readonly for p in pieces)
    assert [len(p) for p in pieces] == [1000] * (size // 1000) + ([size % 1000] if size % 1000
                                                                  else [])
    assert b"".join(pieces) == data
    assert b"".join(core.chunks(path, 1000, offset=min(size, 7))) == data[7:]
    assert b"".join(core.chunks(path, 1 << 20)) == data
    fd = os.open(path, os.O_RDONLY)
    try:
        assert b"".join(core.chunks(fd, 64)) == data
        os.fstat(fd)  # the caller's fd stays open
    finally:
        os.close(fd)


def test_chunks_outlive_their_reader(core, tmp_path):
    data = pattern(10_000)
    path = write(tmp_path / "f", data)
    reader = core.chunks(path, 4096)
    first = next(reader)
    del reader
    gc.collect()
    os.unlink(path)
    assert first == data[:4096]


def test_chunks_reject_bad_arguments(core, tmp_path):
    path = write(tmp_path / "f", b"0123456789")
    with pytest.raises(ValueError, match="chunk_size"):
        core.chunks(path, 0)
    with pytest.raises(ValueError, match="offset 11"):
        core.chunks(path, 4, offset=11)
    with pytest.raises(IsADirectoryError):
        core.chunks(str(tmp_path), 4)
    with pytest.raises(FileNotFoundError):
        core.chunks(str(tmp_path / "missing"), 4)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("size", [0, 5, 65536, (1 << 20) + 1])
def test_hashed_chunks_digest_what_they_hand_out(core, function, size, tmp_path):
    data = pattern(size, 3)
    path = write(tmp_path / "f", data)
    reader = core.hashed_chunks(function, path, 65536)
    if size:
        first = next(reader)
        if size > 65536:
            with pytest.raises(RuntimeError, match="before the last chunk"):
                reader.digest()
        rest = list(reader)
        assert bytes(first) + b"".join(rest) == data
    else:
        assert list(reader) == []
    assert reader.digest() == reference(function, data)
    with pytest.raises(RuntimeError, match="not being hashed"):
        core.chunks(path, 10).digest()


# -- choosing the implementation -------------------------------------------------------------

def load(env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    code = (f"import logging, sys; logging.basicConfig(); {prelude}\n"
            "from engine import native; print(native.IMPLEMENTATION, native.hash_file.__module__)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=Path(__file__).parents[2], check=True)


def test_environment_forces_the_python_core():
    out = load({"STOKER_FORCE_PYTHON": "1"})
    assert out.stdout.split() == ["python", "engine.native"]
    assert out.stderr == ""


def test_the_native_core_loads_when_built():
    if native.native is None:
        pytest.skip("engine._native is not built")
    out = load({"STOKER_FORCE_PYTHON": ""})
    assert out.stdout.split() == ["native", "engine._native"]
    assert out.stderr == ""


def test_a_missing_extension_warns_once():
    out = load({"STOKER_FORCE_PYTHON": ""},
               "sys.modules['engine._native'] = None; import engine.native, importlib")
    assert out.stdout.split() == ["python", "engine.native"]
    assert out.stderr.count("WARNING:engine.native:the native core") == 1
