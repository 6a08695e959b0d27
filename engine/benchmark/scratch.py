"""The benchmarks' data sets, in one scratch directory that is removed afterwards.

The scratch directory must be on the filesystem the local cache would use: staging
hardlinks from the cache, and tmpfs would flatter every figure. So it is never placed on a
tmpfs unless asked for explicitly.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from engine.cas.local_disk import LocalDiskStore
from engine.digest import Digest, of_bytes
from engine.pipeline.inputs import InputTree, resolve_tree, stage
from engine.proto import re_pb2

_MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
_WRITE_CHUNK = 8 << 20


def _unescape(field: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding path (e.g. 'ext4', 'tmpfs'), or 'unknown'."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = _unescape(parts[1])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        # The last matching entry of equal length is the one mounted on top.
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def default_parent() -> str:
    """A directory on disk for scratch data: the temp dir unless it is in memory."""
    for candidate in (tempfile.gettempdir(), "/var/tmp", os.getcwd()):
        if os.path.isdir(candidate) and filesystem_type(candidate) not in _MEMORY_FILESYSTEMS:
            return candidate
    return os.getcwd()


def remove_tree(path: str) -> None:
    """rm -rf, in C: much faster than shutil.rmtree on 100k entries."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--", path], check=False)
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class TreeSet:
    """An input tree whose every file blob is in a warm local CAS, and the same tree once
    materialized on disk (source for `cp -al`, and a set of small files to digest)."""

    store: LocalDiskStore
    tree: InputTree
    source: str  # the tree staged once
    paths: list[str]  # absolute paths of its files, in tree order
    total_bytes: int


class Workspace:
    """Owns a scratch directory and the data sets made in it; close() removes it all."""

    def __init__(self, parent: str | None = None):
        parent = parent or default_parent()
        os.makedirs(parent, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="stoker-bench-", dir=parent)
        # Actions run as 'nobody' when Stoker is root; they must be able to reach in.
        os.chmod(self.root, 0o755)
        self.filesystem = filesystem_type(self.root)
        self._files: dict[tuple[str, int], str] = {}
        self._trees: dict[tuple[int, int], TreeSet] = {}
        self._store: LocalDiskStore | None = None
        self._serial = 0

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def fresh_path(self, prefix: str) -> str:
        """A path under the scratch directory that does not exist yet."""
        self._serial += 1
        return self.path(f"{prefix}-{self._serial}")

    def big_file(self, size: int, name: str = "big") -> str:
        """A file of size random bytes, written through to disk (so no writeback runs during
        the timings) and read once (so it is in the page cache for every side alike)."""
        if (name, size) in self._files:
            return self._files[name, size]
        path = self.path(f"{name}-{size}")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, _WRITE_CHUNK)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        warm_file(path)
        self._files[name, size] = path
        return path

    def store(self) -> LocalDiskStore:
        if self._store is None:
            self._store = LocalDiskStore(self.path("cache"))
        return self._store

    def input_tree(self, files: int, dirs: int, function: str = "sha256") -> TreeSet:
        """files distinct blobs of 1-4 KiB spread evenly over dirs directories (one level
        below the root), all in the local CAS, resolved as the worker resolves an input root,
        and staged once at <scratch>/tree-<files>."""
        key = (files, dirs)
        if key in self._trees:
            return self._trees[key]
        if files < 1 or dirs < 1:
            raise ValueError(f"an input tree needs at least one file and one directory, got "
                             f"files={files} dirs={dirs}")
        store = self.store()
        rng = random.Random(files * 1_000_003 + dirs)
        blobs: dict[Digest, bytes] = {}
        root = re_pb2.Directory()
        per_dir, extra = divmod(files, dirs)
        total = 0
        width = len(str(max(per_dir + 1, 1)))
        for i in range(dirs):
            d = re_pb2.Directory()
            for j in range(per_dir + (1 if i < extra else 0)):
                # Distinct content: a unique header, then random bytes up to 1-4 KiB.
                head = f"{files}/{dirs}/{i}/{j}\n".encode()
                data = head + os.urandom(rng.randint(1024, 4096) - len(head))
                digest = of_bytes(function, data)
                store.write_bytes(digest, data)
                total += len(data)
                d.files.add(name=f"f{j:0{width}d}", is_executable=False,
                            digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size))
            data = d.SerializeToString()
            digest = of_bytes(function, data)
            blobs[digest] = data
            root.directories.add(name=f"d{i:05d}",
                                 digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size))
        data = root.SerializeToString()
        root_digest = of_bytes(function, data)
        blobs[root_digest] = data
        tree = resolve_tree(function, root_digest, blobs.get)
        source = self.path(f"tree-{files}-{dirs}")
        os.mkdir(source)
        stage(tree, store, source)
        paths = [f"{source}/{f.path}" for f in tree.files]
        for p in paths:
            warm_file(p)
        # Write back the new files now, or the kernel does it while something is timed.
        os.sync()
        ts = TreeSet(store, tree, source, paths, total)
        self._trees[key] = ts
        return ts

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        remove_tree(self.root)


def warm_file(path: str) -> None:
    """Read a file once so that it is in the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, _WRITE_CHUNK):
            pass
    finally:
        os.close(fd)
