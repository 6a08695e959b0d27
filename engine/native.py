"""The byte-crunching core: engine._native (Cython, native/) when built, else the pure-Python
twin below (the py_* functions), which gives the same results and raises the same errors.

IMPLEMENTATION says which one is in use; STOKER_FORCE_PYTHON=1 picks the Python one. A
missing extension is logged once, as a warning, when this module is imported. Both
implementations stay reachable as `native.native` (None if not built) and `native.python`,
so one test module can run against each.

Rules both keep:
- Paths name regular files. A symlink as the last component is refused (ELOOP), and a
  FIFO or device is refused without blocking (EINVAL, "not a regular file").
- Sizes count the bytes actually hashed. BLAKE3 uses all cores from 1 MiB of input.
- chunks()/hashed_chunks() map the file: it must not shrink while mapped (SIGBUS).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import blake3

log = logging.getLogger(__name__)

# The same constants and result codes as native/hashing.pxi.
_READ_SIZE = 256 << 10
_BLAKE3_THREADS_MINSIZE = 1 << 20
_BLAKE3_MMAP_MINSIZE = 4 << 20
_NOT_REGULAR = -1001
_BAD_COMPONENT = -1003
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_EMPTY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RETRIABLE = (errno.EMLINK, errno.ENOENT)


def _new_hasher(function: str, size_hint: int = 0) -> Any:
    if function == "sha256":
        return hashlib.sha256()
    if function == "blake3":
        threads = blake3.blake3.AUTO if size_hint >= _BLAKE3_THREADS_MINSIZE else 1
        return blake3.blake3(max_threads=threads)
    raise ValueError(f"unsupported digest function {function!r}")


def _check_function(function: str) -> None:
    _new_hasher(function)


def _encode(path: Any) -> bytes:
    p = os.fsencode(path)
    if b"\0" in p:
        raise ValueError(f"embedded null byte in path {path!r}")
    return p


def _path_error(err: int, path: Any) -> OSError:
    if err == _NOT_REGULAR:
        return OSError(errno.EINVAL, "not a regular file", path)
    if err == _BAD_COMPONENT:
        return OSError(errno.EINVAL, "'.', '..' and empty names are not allowed", path)
    if err == errno.ELOOP and os.path.islink(path):
        return OSError(err, "is a symbolic link, which is not followed", path)
    return OSError(err, os.strerror(err), path)


def _errno(e: OSError) -> int:
    """e.errno, which every OSError raised by an os call carries."""
    assert e.errno is not None, e
    return e.errno


def _check_regular(st: os.stat_result, name: Any) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _path_error(errno.EISDIR if stat.S_ISDIR(st.st_mode) else _NOT_REGULAR, name)


def _open_regular(path: Any) -> tuple[int, os.stat_result]:
    p = _encode(path)
    try:
        fd = os.open(p, _OPEN_FLAGS)
    except OSError as e:
        raise _path_error(_errno(e), path) from None
    try:
        st = os.fstat(fd)
        _check_regular(st, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _digest_fd(function: str, fd: int, size_hint: int) -> tuple[str, int]:
    h = _new_hasher(function, size_hint)
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    total = 0
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        total += n
    return h.hexdigest(), total


def py_hash_buffer(function: str, data: Any) -> tuple[str, int]:
    """(hex digest, size in bytes) of any C-contiguous buffer."""
    with memoryview(data) as view:
        if not view.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
        h = _new_hasher(function, view.nbytes)
        with view.cast("B") as octets:  # blake3 takes only unsigned-byte formats
            h.update(octets)
        return h.hexdigest(), view.nbytes


def py_hash_file(function: str, path: Any) -> tuple[str, int]:
    """(hex digest, size) of the regular file at path; a symlink there is not followed."""
    _check_function(function)
    fd, st = _open_regular(path)
    try:
        if function == "blake3" and st.st_size >= _BLAKE3_MMAP_MINSIZE:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
                h = _new_hasher(function, len(m))
                h.update(m)
                return h.hexdigest(), len(m)
        if st.st_size > _READ_SIZE:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            return _digest_fd(function, fd, st.st_size)
        except OSError as e:
            raise _path_error(_errno(e), path) from None
    finally:
        os.close(fd)


def py_hash_fd(function: str, fd: int) -> tuple[str, int]:
    """(hex digest, bytes read) of what fd yields from its current offset to EOF."""
    _check_function(function)
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    st = os.fstat(fd)
    hint = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return _digest_fd(function, fd, hint)


def py_digest_many(function: str, paths: Iterable[Any]) -> list[tuple[str, int]]:
    """[(hex digest, size)] of the regular files at paths, in order.

    Every path is attempted. If any failed, OSError (of the errno's subclass) is raised
    after the loop for the first failed path, with .failures = [(index, errno), ...] for all
    of them.
    """
    _check_function(function)
    paths = list(paths)
    for p in paths:
        _encode(p)
    out: list[tuple[str, int]] = []
    failures: list[tuple[int, int]] = []
    first: OSError | None = None
    for i, p in enumerate(paths):
        try:
            out.append(py_hash_file(function, p))
        except OSError as e:
            failures.append((i, _errno(e)))
            first = first or e
    if first is not None:
        first.failures = failures  # type: ignore[attr-defined]
        raise first
    return out


class _StageError(Exception):
    def __init__(self, code: int):
        self.code = code


def _bad_name(name: bytes) -> bool:
    return name in (b"", b".", b"..")


class _Parents:
    """The open parent directory of the entry being made, reached component by component
    with O_NOFOLLOW and cached while entries stay in one directory."""

    def __init__(self, root: int):
        self.root = root
        self.path: bytes | None = None
        self.fd = root

    def of(self, rel: bytes) -> tuple[int, bytes]:
        parent, slash, name = rel.rpartition(b"/")
        if not slash:
            return self.root, rel
        if parent == self.path:
            return self.fd, name
        self.close()
        fd = self.root
        try:
            for comp in parent.split(b"/"):
                if _bad_name(comp):
                    raise _StageError(_BAD_COMPONENT)
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _StageError(_errno(e)) from None
                if fd != self.root:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root:
                os.close(fd)
            raise
        self.path, self.fd = parent, fd
        return fd, name

    def close(self) -> None:
        if self.fd != self.root:
            os.close(self.fd)
        self.path, self.fd = None, self.root


def py_link_tree(dest_root: Any, dirs: Iterable[Any], links: Iterable[tuple[Any, Any]],
              empties: Iterable[tuple[Any, int]] = (),
              dir_mode: int = 0o777) -> list[tuple[int, int]]:
    """Create a tree under the existing directory dest_root in one call.

    dirs: relative paths, parents before children, made with dir_mode (minus the umask).
    links: (relative dest, source path) pairs, each hardlinked from source (a CAS file).
    empties: (relative dest, mode) pairs, each a new empty file with exactly mode.
    Returns [(index into links, errno)] for links whose source hit EMLINK (the inode is at
    the link limit) or ENOENT (evicted), which the caller renews and retries. Any other
    failure stops the call with OSError naming the destination; the tree is then partial.
    """
    root_b = _encode(dest_root)
    dir_list = [_encode(d) for d in dirs]
    link_list = list(links)
    link_dests = [_encode(d) for d, _ in link_list]
    link_srcs = [_encode(s) for _, s in link_list]
    empty_list = list(empties)
    empty_dests = [_encode(d) for d, _ in empty_list]
    empty_modes = [int(m) & 0o7777 for _, m in empty_list]
    dir_mode &= 0o7777
    try:
        root = os.open(root_b, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _path_error(_errno(e), dest_root) from None
    parents = _Parents(root)
    failures: list[tuple[int, int]] = []
    where: tuple[list[bytes], int] | None = None
    try:
        where = (dir_list, 0)
        for i, rel in enumerate(dir_list):
            where = (dir_list, i)
            fd, name = parents.of(rel)
            if _bad_name(name):
                raise _StageError(_BAD_COMPONENT)
            try:
                os.mkdir(name, dir_mode, dir_fd=fd)
            except OSError as e:
                raise _StageError(_errno(e)) from None
        for i, rel in enumerate(link_dests):
            where = (link_dests, i)
            fd, name = parents.of(rel)
            if _bad_name(name):
                raise _StageError(_BAD_COMPONENT)
            try:
                os.link(link_srcs[i], name, dst_dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _RETRIABLE:
                    raise _StageError(_errno(e)) from None
                failures.append((i, _errno(e)))
        for i, rel in enumerate(empty_dests):
            where = (empty_dests, i)
            fd, name = parents.of(rel)
            if _bad_name(name):
                raise _StageError(_BAD_COMPONENT)
            try:
                efd = os.open(name, _EMPTY_FLAGS, empty_modes[i], dir_fd=fd)
                try:
                    os.fchmod(efd, empty_modes[i])  # the umask must not strip asked-for bits
                finally:
                    os.close(efd)
            except OSError as e:
                raise _StageError(_errno(e)) from None
    except _StageError as e:
        assert where is not None  # set before anything raises _StageError
        rels, i = where
        error = _path_error(e.code, os.path.join(os.fsdecode(root_b), os.fsdecode(rels[i])))
        if rels is link_dests:
            error.filename2 = link_list[i][1]
        raise error from None
    finally:
        parents.close()
        os.close(root)
    return failures


class ChunkReader:
    """Iterates memoryview slices of a mapped file; when hashing, digest() gives
    (hex digest, size) once every chunk was read. One consumer at a time."""

    def __init__(self, source: Any, chunk_size: int, offset: int, function: str | None):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self._map = _map_source(source)
        self.size = len(self._map) if self._map is not None else 0
        if offset < 0 or offset > self.size:
            raise ValueError(f"offset {offset} is outside the file (size {self.size})")
        self._view = memoryview(self._map) if self._map is not None else None
        self._pos = offset
        self._chunk = chunk_size
        self._hasher = _new_hasher(function, self.size) if function else None
        self._hex: str | None = None

    def __iter__(self) -> Iterator[memoryview]:
        return self

    def __next__(self) -> memoryview:
        start = self._pos
        if start >= self.size:
            if self._hasher is not None and self._hex is None:
                self._hex = self._hasher.hexdigest()
            raise StopIteration
        assert self._view is not None  # mapped whenever size > 0
        piece = self._view[start:start + self._chunk]
        if self._hasher is not None:
            self._hasher.update(piece)
        self._pos = start + len(piece)
        return piece

    def digest(self) -> tuple[str, int]:
        if self._hasher is None:
            raise RuntimeError("these chunks are not being hashed: use hashed_chunks()")
        if self._hex is None:
            if self._pos < self.size:
                raise RuntimeError(f"digest() before the last chunk was read "
                                   f"({self._pos} of {self.size} bytes)")
            self._hex = self._hasher.hexdigest()
        return self._hex, self.size


def _map_source(source: Any) -> mmap.mmap | None:
    """A read-only map of source (an open fd, left open, or a path); None if empty."""
    if isinstance(source, int):
        fd, name, own = source, f"<fd {source}>", False
        _check_regular(os.fstat(fd), name)
    else:
        (fd, _), own = _open_regular(source), True
    try:
        if os.fstat(fd).st_size == 0:
            return None
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        m.madvise(mmap.MADV_SEQUENTIAL)
        return m
    finally:
        if own:
            os.close(fd)


def py_chunks(source: Any, chunk_size: int, offset: int = 0) -> ChunkReader:
    """Read-only memoryview slices of chunk_size bytes (the last may be shorter) covering
    source (a path or an open fd) from offset to its end."""
    return ChunkReader(source, chunk_size, offset, None)


def py_hashed_chunks(function: str, source: Any, chunk_size: int) -> ChunkReader:
    """chunks() of the whole file that also digests them as they are handed out; call
    .digest() after the last one for (hex digest, size)."""
    _check_function(function)
    return ChunkReader(source, chunk_size, 0, function)


class Core(NamedTuple):
    """One implementation of the core's functions."""

    name: str
    hash_buffer: Callable[[str, Any], tuple[str, int]]
    hash_file: Callable[[str, Any], tuple[str, int]]
    hash_fd: Callable[[str, int], tuple[str, int]]
    digest_many: Callable[[str, Iterable[Any]], list[tuple[str, int]]]
    link_tree: Callable[..., list[tuple[int, int]]]
    chunks: Callable[..., Any]
    hashed_chunks: Callable[[str, Any, int], Any]


python = Core("python", py_hash_buffer, py_hash_file, py_hash_fd, py_digest_many,
              py_link_tree, py_chunks, py_hashed_chunks)


def _load_native() -> tuple[Core | None, str]:
    try:
        import engine._native as _native  # compiled (native/), no stubs: typed as Any
    except ImportError as e:
        return None, str(e)
    return Core("native", _native.hash_buffer, _native.hash_file, _native.hash_fd,
                _native.digest_many, _native.link_tree, _native.chunks,
                _native.hashed_chunks), ""


native, NATIVE_ERROR = _load_native()

if os.environ.get("STOKER_FORCE_PYTHON") == "1":
    CORE = python
elif native is None:
    CORE = python
    log.warning("the native core (engine._native) is not available (%s): using the slower "
                "pure-Python core; build it with `pip install .` (native/README.md)",
                NATIVE_ERROR)
else:
    CORE = native

IMPLEMENTATION: str = CORE.name
# The chosen implementation's functions, which the rest of the engine calls.
hash_buffer = CORE.hash_buffer
hash_file = CORE.hash_file
hash_fd = CORE.hash_fd
digest_many = CORE.digest_many
link_tree = CORE.link_tree
chunks = CORE.chunks
hashed_chunks = CORE.hashed_chunks

__all__: Sequence[str] = ("IMPLEMENTATION", "CORE", "Core", "native", "python", "hash_buffer",
                          "hash_file", "hash_fd", "digest_many", "link_tree", "chunks",
                          "hashed_chunks")
