"""Collect an action's outputs after it ran: find them, digest them once, describe them as
REAPI messages (directories as Trees), and put their contents into the local CAS.

Every process of the action is dead by now (engine/runners/containment.py), but the exec root
is still the action's work: each output's parent is opened by fd from the exec root without
following a symlink out of it (paths.open_dir_beneath), everything below is read through
that fd and never followed, a file the action's own user could not read is refused (a
hardlink to someone else's file), and contents are published by copy, verified while
copying, never by renaming the action's inode into the cache: a process elsewhere may still
hold it open for writing (an fd passed over a socket before the action ended).

The work is done in passes so that all digesting happens in one call (digest_files), which
milestone 2's native bulk digester replaces: find every output file and walk every output
directory, digest all files at once, build the messages, then insert what the store lacks.

Size: nothing is read before the whole is known to fit. Every file is found first (metadata
only), each inode once (a file hard-linked under many output paths is read and hashed once,
its digest reused), then the outputs, stdout and stderr are summed by apparent size (a sparse
file's copy in the CAS is whole, and reading its holes takes as long as reading data) and
held against the action's limit (action_limits.output_bytes, OutputsTooLarge:
FAILED_PRECONDITION, the same outputs would never fit) and the free space of the CAS's
filesystem (RESOURCE_EXHAUSTED, as a full disk). So a refused action costs a few stat calls,
and no output that would not fit evicts a byte of the cache. Digesting reads each file to its
end: a file grown after the check (by a process that outlived the action with an fd on it,
which only a Stoker that is not root lets happen) is read whole but then refused by the
same limit, before anything is inserted; and insertion copies no more than the digest's size.
"""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from engine import digest as digests
from engine import errors, hashing
from engine.cas.remote_wire import varint
from engine.cas.store import DigestMismatch
from engine.digest import Digest
from engine.pipeline.inputs import DEFAULT_MAX_ENTRIES, MAX_DEPTH, InputError
from engine.pipeline.paths import (
    fd_path,
    join_under_root,
    open_dir_beneath,
    working_directory_parts,
)
from engine.proto import re_pb2

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputError(Exception):
    """An output exists but cannot be reported as asked (a directory where the Command named
    an output file, a socket, an absolute symlink when those are disallowed, ...): the
    action's result is unusable, FAILED_PRECONDITION in REAPI terms."""


class OutputsTooLarge(OutputError):
    """The outputs, stdout and stderr hold more than one action may store (see the module
    docstring). FAILED_PRECONDITION: running the action again would make the same outputs, so
    a client must not retry it (Bazel retries RESOURCE_EXHAUSTED)."""


@dataclass
class OutputSet:
    files: list[re_pb2.OutputFile] = field(default_factory=list)
    directories: list[re_pb2.OutputDirectory] = field(default_factory=list)
    symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)  # output_paths only
    file_symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)  # legacy fields
    directory_symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)
    logs: list[Digest] = field(default_factory=list)  # of collect_outputs' logs, in order
    blobs: list[Digest] = field(default_factory=list)  # every blob the outputs refer to
    inserted: list[Digest] = field(default_factory=list)  # those the store did not have

    def fill(self, result: re_pb2.ActionResult) -> None:
        result.output_files.extend(self.files)
        result.output_directories.extend(self.directories)
        result.output_symlinks.extend(self.symlinks)
        result.output_file_symlinks.extend(self.file_symlinks)
        result.output_directory_symlinks.extend(self.directory_symlinks)


def digest_files(function: str, paths: list[str]) -> list[Digest]:
    """Digests of many files' contents: the one place outputs are hashed (natively, in bulk)."""
    found = hashing.hash_many(function, paths)
    # 100k new Digests would set off collections that walk the whole heap (a quarter of
    # the time of a large output tree, measured); none of them can be garbage yet.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [Digest(function, h, size) for h, size in found]
    finally:
        if enabled:
            gc.enable()


def _readable_by(st: os.stat_result, run_as: tuple[int, int] | None) -> bool:
    """Whether the action's user could read the file (its owner always could, by chmod)."""
    if run_as is None:
        return True
    uid, gid = run_as
    if st.st_uid == uid:
        return True
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


class _Dir:
    __slots__ = ("files", "dirs", "links", "digest", "data")

    def __init__(self) -> None:
        self.files: list[tuple[str, int, bool]] = []  # (name, index into the file list, exec)
        self.dirs: list[tuple[str, _Dir]] = []
        self.links: list[tuple[str, str]] = []
        self.digest: Digest | None = None
        self.data = b""


class _Collector:
    def __init__(self, function: str, exec_root: str, allow_absolute_symlinks: bool,
                 run_as: tuple[int, int] | None):
        self.function = function
        self.allow_absolute = allow_absolute_symlinks
        self.run_as = run_as
        self.paths: list[str] = []  # files to digest, each inode once
        self.stats: list[os.stat_result] = []
        self.shown: list[str] = []  # the first name each was found under, for messages
        self.logs = 0  # the first `logs` files are stdout and stderr, not outputs
        self.entries = 0  # inside output directories, all of them together
        self.index: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> index
        self.root_fd = os.open(exec_root, _ROOT_FLAGS)
        self.fds: dict[str, int] = {}  # output parents opened, by path relative to the root

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root_fd)

    def file(self, full: str, st: os.stat_result, shown: str) -> int:
        if not _readable_by(st, self.run_as):
            raise OutputError(f"output {shown!r} is a file the action's user cannot read")
        return self._add(full, st, shown)

    def _add(self, full: str, st: os.stat_result, shown: str) -> int:
        """The index of full's content among the files to digest: one per inode, so that
        hard links to one file are read once."""
        key = (st.st_dev, st.st_ino)
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.paths)
            self.paths.append(full)
            self.stats.append(st)
            self.shown.append(shown)
        return i

    def log(self, path: str) -> int:
        """stdout or stderr (Stoker's own files beside the exec root), before any output."""
        assert self.logs == len(self.paths), "logs come first"
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{os.path.basename(path)} is not a regular file")
        i = self._add(path, st, os.path.basename(path))
        self.logs = len(self.paths)
        return i

    def locate(self, fld: str, wd: list[str], path: str, allow_empty: bool) -> str | None:
        """A path to the output through its parent's fd (None when the parent is missing);
        the parent must resolve inside the exec root."""
        rel = join_under_root(fld, wd, path, allow_empty=allow_empty)
        if not rel:
            return fd_path(self.root_fd)
        parent, _, name = rel.rpartition("/")
        fd = self.fds.get(parent)
        if fd is None:
            if parent:
                fd = open_dir_beneath(self.root_fd, parent)
                if fd is None:
                    if _outside(self.root_fd, parent):
                        raise InputError(f"{fld}: {path!r} resolves outside the exec root")
                    return None
            else:
                fd = os.dup(self.root_fd)
            self.fds[parent] = fd
        return fd_path(fd, name)

    def readlink(self, full: str, shown: str) -> str:
        target = os.readlink(full)
        try:
            target.encode()
        except UnicodeEncodeError:
            raise OutputError(f"output {shown!r} is a symlink whose target is not valid "
                              "UTF-8") from None
        if target.startswith("/") and not self.allow_absolute:
            raise OutputError(f"output {shown!r} is a symlink to the absolute path {target!r}, "
                              "which is not allowed")
        return target

    def walk(self, top: str, shown: str) -> _Dir:
        """Scan a directory tree without following symlinks; nodes are filled, not yet
        digested. Iterative, since outputs can be deeper than Python's recursion limit."""
        root = _Dir()
        stack = [(top, shown, root, 0)]
        while stack:
            path, where, node, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise OutputsTooLarge(f"output {where!r} is nested more than {MAX_DEPTH} "
                                      "directories deep, more than a result may hold")
            try:
                entries = os.scandir(path)
            except OSError as e:
                raise OutputError(f"output {where!r}: cannot list: {e.strerror}") from None
            with entries:
                self._scan(entries, where, node, depth, stack)
        return root

    def _scan(self, entries: Iterator[os.DirEntry[str]], where: str, node: _Dir, depth: int,
              stack: list[tuple[str, str, _Dir, int]]) -> None:
        for entry in entries:
            # Counted as they are listed: a directory of millions of files is refused
            # without holding them all (the action cache takes no larger Trees).
            self.entries += 1
            if self.entries > DEFAULT_MAX_ENTRIES:
                raise OutputsTooLarge(f"outputs hold more than {DEFAULT_MAX_ENTRIES} "
                                      f"files, directories and symlinks (at {where!r})")
            name = entry.name
            child = f"{where}/{name}" if where else name
            st = entry.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISREG(mode):
                node.files.append((name, self.file(entry.path, st, child),
                                   bool(mode & 0o111)))
            elif stat.S_ISDIR(mode):
                sub = _Dir()
                node.dirs.append((name, sub))
                stack.append((entry.path, child, sub, depth + 1))
            elif stat.S_ISLNK(mode):
                node.links.append((name, self.readlink(entry.path, child)))
            else:
                raise OutputError(f"output {child!r} is not a regular file, directory or "
                                  "symlink")


def _seal(function: str, top: _Dir, file_digests: list[Digest], shown: str,
          blobs: dict[Digest, bytes]) -> tuple[Digest, Digest]:
    """Build the Directory messages of a walked tree bottom-up and its Tree; record every
    message in blobs. Returns (tree digest, root Directory digest)."""
    order = [top]  # parents before children
    i = 0
    while i < len(order):
        order.extend(sub for _, sub in order[i].dirs)
        i += 1
    for node in reversed(order):
        d = re_pb2.Directory()
        try:
            for name, idx, exe in sorted(node.files):
                fd = file_digests[idx]
                d.files.add(name=name, digest=re_pb2.Digest(hash=fd.hash, size_bytes=fd.size),
                            is_executable=exe)
            for name, sub in sorted(node.dirs, key=lambda x: x[0]):
                sd = sub.digest
                assert sd is not None  # children come later in order, so are sealed first
                d.directories.add(name=name, digest=re_pb2.Digest(hash=sd.hash,
                                                                  size_bytes=sd.size))
            for name, target in sorted(node.links):
                d.symlinks.add(name=name, target=target)
        except ValueError as e:  # a name that is not valid UTF-8
            raise OutputError(f"output directory {shown!r} has an entry whose name or target "
                              f"cannot be represented: {e}") from None
        node.data = d.SerializeToString()
        node.digest = digests.of_bytes(function, node.data)
        blobs.setdefault(node.digest, node.data)
    # The Tree is written by hand as the record stream that is_topologically_sorted promises:
    # root first, then each distinct child Directory after its first parent, breadth first in
    # name order. It is byte-identical to serializing a Tree message with those children.
    parts = [b"\x0a", varint(len(top.data)), top.data]
    seen = {top.digest}
    queue = [top]
    i = 0
    while i < len(queue):
        for _, sub in sorted(queue[i].dirs, key=lambda x: x[0]):
            if sub.digest not in seen:
                seen.add(sub.digest)
                queue.append(sub)
                parts += (b"\x12", varint(len(sub.data)), sub.data)
        i += 1
    tree = b"".join(parts)
    tree_digest = digests.of_bytes(function, tree)
    blobs.setdefault(tree_digest, tree)
    assert top.digest is not None  # sealed last in the loop above
    return tree_digest, top.digest


def _lstat(full: str) -> os.stat_result | None:
    try:
        return os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _target_kind(full: str) -> str:
    """'file', 'dir' or 'none' (dangling or unusual) for what a symlink leads to."""
    try:
        st = os.stat(full)
    except OSError:
        return "none"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "none"


def collect_outputs(function: str, command, exec_root: str, store, *,
                    allow_absolute_symlinks: bool = False,
                    run_as: tuple[int, int] | None = None, logs: Sequence[str] = (),
                    limit: int = 0) -> OutputSet:
    """Describe and store the outputs the Command asked for, found under exec_root, and the
    files at logs (stdout and stderr: digests in .logs).

    With output_paths, each path's type is decided now: a file, a directory (reported as a
    Tree) or a symlink (output_symlinks; never followed). Otherwise output_files and
    output_directories are read as the legacy spec says, symlinks going to
    output_file_symlinks / output_directory_symlinks. A missing output is left out.
    File contents are copied into the store, verified on the way (see the module docstring),
    once the whole (each inode once) is known to hold at most `limit` bytes (0: no limit of
    its own; OutputsTooLarge) and to fit the free space of the store's filesystem
    (errors.ResourceExhausted).
    """
    c = _Collector(function, exec_root, allow_absolute_symlinks, run_as)
    try:
        return _collect(c, function, command, store, logs, limit)
    finally:
        c.close()


def _human(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _free_bytes(store) -> int | None:
    """Bytes free for us on the filesystem of the store's files (None: not on disk)."""
    root = getattr(store, "root", None)
    if root is None:
        return None
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _check_size(c: _Collector, sizes: list[int], limit: int, store, when: str = "") -> None:
    """Refuse outputs that together hold more than limit or the disk's free space."""
    total = sum(sizes)
    parts = [f"{c.shown[i]} {_human(sizes[i])}" for i in range(c.logs)]
    n = len(sizes) - c.logs
    if n:
        big = max(range(c.logs, len(sizes)), key=sizes.__getitem__)
        parts.append(f"{n} output file{'s' if n > 1 else ''}, the largest {c.shown[big]!r} "
                     f"{_human(sizes[big])}")
    held = (f"the action's outputs, stdout and stderr hold {total} bytes ({_human(total)})"
            f"{when}: {', '.join(parts)}")
    if limit and total > limit:
        raise OutputsTooLarge(f"{held}; one action may store at most {limit} bytes "
                              f"({_human(limit)}): raise action_limits.output_bytes (unset, "
                              "half of local_cache.max_size_bytes; at most all of it)")
    free = _free_bytes(store)
    if free is not None and total > free:
        raise errors.ResourceExhausted(f"{held}; the worker's local CAS has {free} bytes "
                                       f"({_human(free)}) of disk free ({store.root})")


def _outside(root_fd: int, rel: str) -> bool:
    """Whether rel, which open_dir_beneath refused, leads out of the root (rather than to
    nothing): then it is the Command's fault, not a missing output."""
    depth = 0
    for comp in rel.split("/"):
        depth += -1 if comp == ".." else (0 if comp in ("", ".") else 1)
        if depth < 0:
            return True
    # A symlink on the way that points out (absolute, or too many '..').
    fd = os.dup(root_fd)
    try:
        for comp in rel.split("/"):
            try:
                st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
            except OSError:
                return False
            if stat.S_ISLNK(st.st_mode):
                return True
            if not stat.S_ISDIR(st.st_mode):
                return False
            nfd = os.open(comp, _ROOT_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return False
    finally:
        os.close(fd)


def _collect(c: _Collector, function: str, command, store, logs: Sequence[str],
             limit: int) -> OutputSet:
    wd = working_directory_parts(command)
    out = OutputSet()
    log_indices = [c.log(path) for path in logs]
    pending_files: list[tuple[str, int, bool]] = []  # (path, file index, executable)
    pending_dirs: list[tuple[str, _Dir]] = []

    if command.output_paths:
        requested = [("output_paths", p, True) for p in command.output_paths]
    else:
        requested = [("output_files", p, False) for p in command.output_files]
        requested += [("output_directories", p, True) for p in command.output_directories]

    for fld, path, allow_empty in requested:
        full = c.locate(fld, wd, path, allow_empty)
        if full is None:
            continue
        st = _lstat(full)
        if st is None:
            continue
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            link = re_pb2.OutputSymlink(path=path, target=c.readlink(full, path))
            if fld == "output_paths":
                out.symlinks.append(link)
            elif fld == "output_files":
                if _target_kind(full) == "dir":
                    raise OutputError(f"output_files: {path!r} is a symlink to a directory")
                out.file_symlinks.append(link)
            else:
                if _target_kind(full) == "file":
                    raise OutputError(f"output_directories: {path!r} is a symlink to a file")
                out.directory_symlinks.append(link)
        elif stat.S_ISREG(mode):
            if fld == "output_directories":
                raise OutputError(f"output_directories: {path!r} is a file, not a directory")
            pending_files.append((path, c.file(full, st, path), bool(mode & 0o111)))
        elif stat.S_ISDIR(mode):
            if fld == "output_files":
                raise OutputError(f"output_files: {path!r} is a directory, not a file")
            pending_dirs.append((path, c.walk(full, path)))
        else:
            raise OutputError(f"{fld}: {path!r} is not a regular file, directory or symlink")

    # Before a byte is read: a refused action costs no more than its stat calls.
    checked = [st.st_size for st in c.stats]
    _check_size(c, checked, limit, store)
    try:
        file_digests = digest_files(function, c.paths)
    except PermissionError as e:
        raise OutputError(f"cannot read output file {e.filename}: {e.strerror}") from None
    read = [d.size for d in file_digests]
    if sum(read) > sum(checked):  # grown since (see the module docstring)
        _check_size(c, read, limit, store, " once read")
    out.logs = [file_digests[i] for i in log_indices]

    for path, idx, exe in pending_files:
        d = file_digests[idx]
        out.files.append(re_pb2.OutputFile(
            path=path, digest=re_pb2.Digest(hash=d.hash, size_bytes=d.size), is_executable=exe))
    messages: dict[Digest, bytes] = {}
    for path, top in pending_dirs:
        tree_d, root_d = _seal(function, top, file_digests, path, messages)
        out.directories.append(re_pb2.OutputDirectory(
            path=path,
            tree_digest=re_pb2.Digest(hash=tree_d.hash, size_bytes=tree_d.size),
            is_topologically_sorted=True,
            root_directory_digest=re_pb2.Digest(hash=root_d.hash, size_bytes=root_d.size)))

    _insert(c, store, file_digests, messages, out)
    return out


def _insert(c: _Collector, store, file_digests: list[Digest], messages: dict[Digest, bytes],
            out: OutputSet) -> None:
    first_path: dict[Digest, int] = {}
    for i, d in enumerate(file_digests):
        first_path.setdefault(d, i)
    out.blobs = list(first_path) + [d for d in messages if d not in first_path]
    missing = set(store.find_missing(out.blobs))
    for d, i in first_path.items():
        if d not in missing:
            continue
        path, st = c.paths[i], c.stats[i]
        # Stored as the variant the output is; copied and verified (see the module docstring).
        try:
            store.insert_file(d, path, verify=True, executable=bool(st.st_mode & 0o111))
        except DigestMismatch:
            what = c.shown[i] if i < c.logs else f"output file {c.shown[i]!r}"
            raise OutputError(f"{what} changed while it was being collected") from None
        out.inserted.append(d)
    for d, data in messages.items():
        if d in missing and d not in first_path:
            store.write_bytes(d, data)
            out.inserted.append(d)
