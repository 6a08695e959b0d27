"""Resolve an action's input root (a Directory DAG) into a flat, validated plan, and stage it.

resolve_tree() does all the checking: after it, every path in an InputTree is a plain
relative path of single-segment names, unique in its directory, with no symlink anywhere on
the way to it. stage() relies on that and only creates entries, never following anything
that already exists.

Limits (a tree past one is the client's fault: InputError, which the pipeline reports as
INVALID_ARGUMENT without retrying elsewhere; each is checked while the tree is resolved,
before anything is staged, and the message names the directory and the limit):
- MAX_DEPTH = 256 nested directories. Real inputs are far shallower (Bazel's external
  repositories and nested node_modules stay under ~50 levels); 256 leaves room for any of
  them, while keeping the per-directory openat walk of staging, and the removal walk
  afterwards, short.
- MAX_PATH_BYTES = 3072 bytes for a path below the exec root, leaving 1 KiB of PATH_MAX
  (4096) for the exec root itself: the action and Stoker must be able to name every input
  in one syscall.
- NAME_MAX = 255 bytes per name (UTF-8), and MAX_TARGET_BYTES = 4095 per symlink target:
  the kernel refuses longer ones (ENAMETOOLONG), so they could never be staged.
- MAX_DIRECTORY_ENTRIES = 200,000 entries (files, directories and symlinks) in one
  Directory: twice the widest directory we test end to end (100,000), and a Directory
  message of that size is already ~20 MB.
- DEFAULT_MAX_ENTRIES = 1,000,000 entries in the whole expanded tree: several times the
  largest real actions (a few hundred thousand inputs), and the InputTree for it takes a
  few hundred MB of memory. A DAG of deduplicated Directories can describe exponentially
  many paths, which this bounds too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.message import DecodeError

from engine import hashing, native
from engine.cas.store import BlobNotFound
from engine.digest import Digest, DigestError
from engine.digest import empty as empty_digest
from engine.digest import make as make_digest
from engine.proto import re_pb2

# Linux gives up resolving after 40 symlinks (ELOOP); escape checks stop there too.
_MAX_SYMLINK_HOPS = 40
# The limits on input trees; the module docstring says why each is what it is.
MAX_DEPTH = 256
MAX_PATH_BYTES = 3072
NAME_MAX = 255
MAX_TARGET_BYTES = 4095
MAX_DIRECTORY_ENTRIES = 200_000
# Command and Directory blobs are read whole into memory: each has a cap of its own,
# checked by digest before a byte is read (64 MiB holds a Directory of the largest
# allowed size; a Command past 16 MiB could not be exec'd anyway: ARG_MAX).
MAX_DIRECTORY_BYTES = 64 << 20
MAX_COMMAND_BYTES = 16 << 20
DEFAULT_MAX_ENTRIES = 1_000_000
# Names and targets in messages are cut to this many characters (a 4 KiB target or a
# 3 KiB path would drown the message).
_SHOWN = 120
# Staging is linkat() in the kernel, and ext4 locks the destination directory, not the
# filesystem: threads linking into different directories run in parallel (2 threads stage
# 100k files ~1.6x as fast as one on 2 cores). Below this many links one call is quicker
# than handing work to another thread.
_PARALLEL_LINKS = 4096
# Staged empty files are read-only, like every file the store links (mode by exec bit).
_EMPTY_MODE = {False: 0o444, True: 0o555}
_STAGE_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))
_stage_pool: ThreadPoolExecutor | None = None


class InputError(Exception):
    """The action's inputs (or its Command) are malformed; the message names what and where."""


class MissingBlobs(Exception):
    """Blobs needed to resolve or stage the inputs are absent; .digests lists all of them."""

    def __init__(self, digests: Iterable[Digest]):
        self.digests: list[Digest] = sorted(set(digests), key=lambda d: (d.hash, d.size))
        shown = ", ".join(str(d) for d in self.digests[:5])
        more = f" and {len(self.digests) - 5} more" if len(self.digests) > 5 else ""
        super().__init__(f"{len(self.digests)} missing blob(s): {shown}{more}")


class InputFile(NamedTuple):
    path: str
    digest: Digest
    is_executable: bool


class InputSymlink(NamedTuple):
    path: str
    target: str


@dataclass
class InputTree:
    """Every entry of an input root. Paths are relative to the root; the root itself is not in
    dirs (it is the exec root, which exists already)."""

    root_digest: Digest
    dirs: list[str] = field(default_factory=list)  # parents before children
    files: list[InputFile] = field(default_factory=list)
    symlinks: list[InputSymlink] = field(default_factory=list)

    def blob_digests(self) -> set[Digest]:
        return {f.digest for f in self.files}


class _Parsed(NamedTuple):
    """A parsed and checked Directory."""

    files: list[tuple[str, Digest, bool]]
    dirs: list[tuple[str, Digest]]
    links: list[tuple[str, str]]
    longest_name: int  # in bytes, for the path length check


def _clip(text: str) -> str:
    """text for a message: whole if short, else its start and end around an ellipsis."""
    if len(text) <= _SHOWN:
        return text
    half = _SHOWN // 2
    return f"{text[:half]}...{text[-half:]} ({len(text.encode())} bytes)"


def _name_bytes(name: str) -> int:
    # The common case, ASCII, without encoding: one byte a character.
    return len(name) if name.isascii() else len(name.encode())


def _check_name(name: str, where: str) -> int:
    """Raise InputError unless name is a valid entry name; its length in bytes."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InputError(f"{where}: invalid entry name {_clip(name)!r}")
    size = _name_bytes(name)
    if size > NAME_MAX:
        raise InputError(f"{where}: entry name {_clip(name)!r} is {size} bytes long, more "
                         f"than the {NAME_MAX} a file name may have")
    return size


def _check_sorted(names: list[str], kind: str, where: str) -> None:
    for prev, cur in zip(names, names[1:], strict=False):
        # str order is code point order, which is the UTF-8 byte order the spec asks for.
        if prev >= cur:
            problem = "duplicated" if prev == cur else "not sorted by name"
            raise InputError(f"{where}: {kind} {_clip(cur)!r} {problem}")


def _entry_digest(function: str, pb, where: str) -> Digest:
    try:
        d = make_digest(function, pb.hash, pb.size_bytes)
    except DigestError as e:
        raise InputError(f"{where}: {e}") from None
    if d.size == 0 and d != _empty(function):
        raise InputError(f"{where}: size 0 with a hash that is not the empty blob's: {d}")
    return d


@functools.cache
def _empty(function: str) -> Digest:
    return empty_digest(function)


def _parse_directory(function: str, digest: Digest, data: bytes, where: str) -> _Parsed:
    if len(data) != digest.size or hashing.hash_bytes(function, data) != digest.hash:
        raise InputError(f"{where}: Directory blob does not match its digest {digest}")
    d = re_pb2.Directory()
    try:
        d.ParseFromString(data)
    except DecodeError as e:
        raise InputError(f"{where}: Directory {digest} is not a valid Directory message: {e}") \
            from None
    count = len(d.files) + len(d.directories) + len(d.symlinks)
    if count > MAX_DIRECTORY_ENTRIES:
        raise InputError(f"{where}: Directory {digest} has {count} entries, more than the "
                         f"{MAX_DIRECTORY_ENTRIES} allowed in one directory")
    longest = 0
    files = []
    for f in d.files:
        longest = max(longest, _check_name(f.name, where))
        files.append((f.name, _entry_digest(function, f.digest, f"{where}/{f.name}"),
                      f.is_executable))
    dirs = []
    for sub in d.directories:
        longest = max(longest, _check_name(sub.name, where))
        dirs.append((sub.name, _entry_digest(function, sub.digest, f"{where}/{sub.name}")))
    links = []
    for s in d.symlinks:
        longest = max(longest, _check_name(s.name, where))
        at = f"{where}/{s.name}"
        if not s.target:
            raise InputError(f"{at}: symlink has an empty target")
        if s.target.startswith("/"):
            raise InputError(f"{at}: absolute symlink target {_clip(s.target)!r} is not "
                             "allowed")
        if "\0" in s.target:
            raise InputError(f"{at}: symlink target contains NUL")
        size = _name_bytes(s.target)
        if size > MAX_TARGET_BYTES:
            raise InputError(f"{at}: symlink target is {size} bytes long, more than the "
                             f"{MAX_TARGET_BYTES} a symlink may hold")
        links.append((s.name, s.target))
    _check_sorted([n for n, _, _ in files], "file", where)
    _check_sorted([n for n, _ in dirs], "directory", where)
    _check_sorted([n for n, _ in links], "symlink", where)
    if (files and dirs) or (files and links) or (dirs and links):
        count = len(files) + len(dirs) + len(links)
        names = {n for n, _, _ in files} | {n for n, _ in dirs} | {n for n, _ in links}
        if len(names) != count:
            seen: set[str] = set()
            for n in [n for n, _, _ in files] + [n for n, _ in dirs] + [n for n, _ in links]:
                if n in seen:
                    raise InputError(f"{where}: name {_clip(n)!r} is used by more than "
                                     "one entry")
                seen.add(n)
    return _Parsed(files, dirs, links, longest)


def _where(path: str) -> str:
    return f"input root/{_clip(path)}" if path else "input root"


def resolve_tree(
    function: str,
    root_digest: Digest,
    get_directory: Callable[[Digest], bytes | None],
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> InputTree:
    """Walk and check the Directory DAG under root_digest.

    get_directory returns a Directory blob's bytes, or None when it is absent. Every absent
    Directory reachable through present ones is collected before MissingBlobs is raised, so
    the caller can fetch them all at once and call again.
    """
    parsed: dict[Digest, _Parsed] = {}
    missing: list[Digest] = []
    # Fetch level by level, each distinct Directory once, at the shallowest depth it is
    # used at; the path is for messages only.
    frontier: list[tuple[Digest, str]] = [(root_digest, "")]
    queued = {root_digest}
    depth = 0
    distinct = 0  # entries of distinct Directories: a floor of the expanded count
    while frontier:
        next_frontier: list[tuple[Digest, str]] = []
        for digest, path in frontier:
            if digest.size > MAX_DIRECTORY_BYTES:
                raise InputError(f"Directory {digest}{_where(path)} is {digest.size} bytes, "
                                 f"more than the {MAX_DIRECTORY_BYTES} allowed")
            # The empty Directory is the empty blob, which is always present.
            data = b"" if digest.size == 0 else get_directory(digest)
            if data is None:
                missing.append(digest)
                continue
            p = _parse_directory(function, digest, data, _where(path))
            parsed[digest] = p
            distinct += len(p.files) + len(p.dirs) + len(p.links)
            if distinct > max_entries:
                raise InputError(f"input root has more than {max_entries} entries")
            if p.dirs and depth == MAX_DEPTH:
                raise _too_deep(path, p.dirs[0][0])
            for name, sub in p.dirs:
                if sub not in queued:
                    queued.add(sub)
                    next_frontier.append((sub, f"{path}/{name}" if path else name))
        frontier = next_frontier
        depth += 1
    if missing:
        raise MissingBlobs(missing)

    tree = InputTree(root_digest)
    link_targets: dict[str, str] = {}
    # (path, Directory, depth, length of path in bytes)
    stack: list[tuple[str, Digest, int, int]] = [("", root_digest, 0, 0)]
    count = 0
    while stack:
        path, digest, depth, path_bytes = stack.pop()
        files, dirs, links, longest = parsed[digest]
        count += len(files) + len(dirs) + len(links)
        if count > max_entries:
            raise InputError(f"input root has more than {max_entries} entries")
        base_bytes = path_bytes + 1 if path else 0
        if base_bytes + longest > MAX_PATH_BYTES:
            raise _too_long(path, base_bytes, parsed[digest])
        if dirs and depth == MAX_DEPTH:
            raise _too_deep(path, dirs[0][0])
        prefix = f"{path}/" if path else ""
        for name, d, exe in files:
            tree.files.append(InputFile(prefix + name, d, exe))
        for name, target in links:
            tree.symlinks.append(InputSymlink(prefix + name, target))
            link_targets[prefix + name] = target
        # Reversed so the pop order (and so tree.dirs) follows name order: deterministic.
        for name, d in reversed(dirs):
            stack.append((prefix + name, d, depth + 1, base_bytes + _name_bytes(name)))
        if path:
            tree.dirs.append(path)
    for link in tree.symlinks:
        if _escapes(link.path, link.target, link_targets):
            raise InputError(f"{_where(link.path)}: symlink target {_clip(link.target)!r} "
                             "points outside the input root")
    return tree


def _too_deep(path: str, name: str) -> InputError:
    return InputError(f"{_where(path)}: directory {_clip(name)!r} would be nested more than "
                      f"{MAX_DEPTH} levels deep, the limit for input trees")


def _too_long(path: str, base_bytes: int, p: _Parsed) -> InputError:
    names = [n for n, _, _ in p.files] + [n for n, _ in p.dirs] + [n for n, _ in p.links]
    name = max(names, key=_name_bytes)
    return InputError(f"{_where(path)}: the path of {_clip(name)!r} would be "
                      f"{base_bytes + _name_bytes(name)} bytes long, more than the "
                      f"{MAX_PATH_BYTES} allowed below the exec root")


def _escapes(link_path: str, target: str, link_targets: dict[str, str]) -> bool:
    """Whether following target from link_path's directory leaves the input root.

    Resolution follows the tree's own symlinks the way the kernel would (a lexical check alone
    misses 'a -> s/..' with 's -> .'). Components absent from the tree resolve lexically,
    which is conservative: on disk 'missing/..' fails rather than climbing.
    """
    parent = link_path.rpartition("/")[0]
    stack = parent.split("/") if parent else []
    pending = target.split("/")[::-1]
    hops = 0
    while pending:
        comp = pending.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(comp)
        inner = link_targets.get("/".join(stack))
        if inner is not None:
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return False  # a loop: it never resolves, so it cannot lead anywhere
            stack.pop()
            pending.extend(inner.split("/")[::-1])
    return False


def _pool() -> ThreadPoolExecutor:
    global _stage_pool
    if _stage_pool is None:
        # The calling thread links one part itself, so the pool needs one thread fewer.
        _stage_pool = ThreadPoolExecutor(max(1, _STAGE_THREADS - 1),
                                         thread_name_prefix="stage")
    return _stage_pool


def _spans(links: list[tuple[str, str]], parts: int) -> list[tuple[int, int]]:
    """Cut links (grouped by directory, as resolve_tree lists files) into about equal
    index ranges, each cut moved to a directory boundary when one is near, so that no two
    threads wait on the same directory's lock."""
    n = len(links)
    slack = n // (2 * parts)
    cuts = [0]
    for k in range(1, parts):
        c = max(cuts[-1], n * k // parts)
        if 0 < c < n:
            parent = links[c - 1][0].rpartition("/")[0]
            end = min(n, c + slack)
            while c < end and links[c][0].rpartition("/")[0] == parent:
                c += 1
        cuts.append(c)
    cuts.append(n)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _link_in_parallel(exec_root: str, links: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """native.link_tree of links (their directories exist) split over threads: the same
    result, and on failure the error of the lowest failing part, raised once every part has
    stopped (nothing is still being created in the exec root when the caller sees it)."""
    if len(links) < _PARALLEL_LINKS:
        # Few (or no: every file went one by one, as after a dirty restart) links left.
        return native.link_tree(exec_root, (), links)
    spans = _spans(links, _STAGE_THREADS)
    futures = [_pool().submit(native.link_tree, exec_root, (), links[a:b])
               for a, b in spans[1:]]
    outcomes: list[list[tuple[int, int]] | OSError] = []
    a, b = spans[0]
    try:
        outcomes.append(native.link_tree(exec_root, (), links[a:b]))
    except OSError as e:
        outcomes.append(e)
    for fut in futures:
        try:
            outcomes.append(fut.result())
        except OSError as e:
            outcomes.append(e)
    failed: list[tuple[int, int]] = []
    for (start, _), outcome in zip(spans, outcomes, strict=True):
        if isinstance(outcome, OSError):
            raise outcome
        failed.extend((start + i, err) for i, err in outcome)
    return failed


def stage(tree: InputTree, store, exec_root: str) -> None:
    """Materialize tree under exec_root (an existing directory): directories, files hardlinked
    from store, then symlinks. Raises MissingBlobs listing every file blob store lacks.

    Directories and most links are made by the native core (engine.native.link_tree, which
    never follows anything in the destination), a large tree's links over several threads;
    files the store must vet one by one, and sources that were evicted or hit the link limit
    meanwhile, go through store.link_into."""
    if exec_root.endswith("/"):
        exec_root = exec_root.rstrip("/") or "/"
    base = exec_root + "/"
    bulk_source = getattr(store, "bulk_link_source", None)
    parallel = (bulk_source is not None and _STAGE_THREADS > 1
                and len(tree.files) >= _PARALLEL_LINKS)
    # A large tree's directories are made in another thread while this one asks the store
    # for the link sources.
    dirs_made = _pool().submit(native.link_tree, exec_root, tree.dirs, ()) if parallel else None
    links: list[tuple[str, str]] = []
    bulk: list[InputFile] = []
    one_by_one: list[InputFile] = []
    # Empty files have no cached inode: new ones, made in the native call too, read-only
    # like the store's (LocalDiskStore.link_into makes them the same way).
    empties: list[tuple[str, int]] = []
    try:
        for f in tree.files:
            if bulk_source is not None and f.digest.size == 0:
                empties.append((f.path, _EMPTY_MODE[f.is_executable]))
                continue
            src = bulk_source(f.digest, f.is_executable) if bulk_source else None
            if src is None:
                one_by_one.append(f)
            else:
                links.append((f.path, src))
                bulk.append(f)
    except BaseException:
        if dirs_made is not None:
            dirs_made.exception()  # wait for it; the error being raised is the one to report
        raise
    if dirs_made is None:
        failed = native.link_tree(exec_root, tree.dirs, links, empties)
    else:
        dirs_made.result()
        failed = _link_in_parallel(exec_root, links)
        if empties:
            native.link_tree(exec_root, (), (), empties)
    if failed:
        retry = {i for i, _ in failed}
        one_by_one.extend(bulk[i] for i in sorted(retry))
        bulk = [f for i, f in enumerate(bulk) if i not in retry]
    if bulk:
        note = store.note_linked
        for f in bulk:
            note(f.digest, f.is_executable)
    link_into = store.link_into
    missing: list[Digest] = []
    for path, digest, exe in one_by_one:
        try:
            link_into(digest, exe, base + path)
        except BlobNotFound:
            missing.append(digest)
    # Symlinks last: nothing is created below them.
    symlink = os.symlink
    for path, target in tree.symlinks:
        symlink(target, base + path)
    if missing:
        raise MissingBlobs(missing)
