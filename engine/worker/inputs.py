"""Resolve an action's input root (a Directory DAG) into a flat, validated plan, and stage it.

resolve_tree() does all the checking: after it, every path in an InputTree is a plain
relative path of single-segment names, unique in its directory, with no symlink anywhere on
the way to it. stage() relies on that and only creates entries, never following anything
that already exists.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
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
# A DAG of deduplicated Directories can describe exponentially many paths; refuse trees that
# would take too long to stage rather than run out of memory placing them.
DEFAULT_MAX_ENTRIES = 5_000_000


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


# A parsed and checked Directory: (files, subdirectories, symlinks), each a list of tuples.
_Parsed = tuple[
    list[tuple[str, Digest, bool]],
    list[tuple[str, Digest]],
    list[tuple[str, str]],
]


def _check_name(name: str, where: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InputError(f"{where}: invalid entry name {name!r}")


def _check_sorted(names: list[str], kind: str, where: str) -> None:
    for prev, cur in zip(names, names[1:], strict=False):
        # str order is code point order, which is the UTF-8 byte order the spec asks for.
        if prev >= cur:
            problem = "duplicated" if prev == cur else "not sorted by name"
            raise InputError(f"{where}: {kind} {cur!r} {problem}")


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
    files = []
    for f in d.files:
        _check_name(f.name, where)
        files.append((f.name, _entry_digest(function, f.digest, f"{where}/{f.name}"),
                      f.is_executable))
    dirs = []
    for sub in d.directories:
        _check_name(sub.name, where)
        dirs.append((sub.name, _entry_digest(function, sub.digest, f"{where}/{sub.name}")))
    links = []
    for s in d.symlinks:
        _check_name(s.name, where)
        if not s.target:
            raise InputError(f"{where}/{s.name}: symlink has an empty target")
        if s.target.startswith("/"):
            raise InputError(f"{where}/{s.name}: absolute symlink target {s.target!r} is not "
                             "allowed")
        if "\0" in s.target:
            raise InputError(f"{where}/{s.name}: symlink target contains NUL")
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
                    raise InputError(f"{where}: name {n!r} is used by more than one entry")
                seen.add(n)
    return files, dirs, links


def _where(path: str) -> str:
    return f"input root/{path}" if path else "input root"


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
    # Fetch level by level, each distinct Directory once; the path is for messages only.
    frontier: list[tuple[Digest, str]] = [(root_digest, "")]
    queued = {root_digest}
    while frontier:
        next_frontier: list[tuple[Digest, str]] = []
        for digest, path in frontier:
            # The empty Directory is the empty blob, which is always present.
            data = b"" if digest.size == 0 else get_directory(digest)
            if data is None:
                missing.append(digest)
                continue
            p = _parse_directory(function, digest, data, _where(path))
            parsed[digest] = p
            for name, sub in p[1]:
                if sub not in queued:
                    queued.add(sub)
                    next_frontier.append((sub, f"{path}/{name}" if path else name))
        frontier = next_frontier
    if missing:
        raise MissingBlobs(missing)

    tree = InputTree(root_digest)
    link_targets: dict[str, str] = {}
    stack: list[tuple[str, Digest]] = [("", root_digest)]
    count = 0
    while stack:
        path, digest = stack.pop()
        files, dirs, links = parsed[digest]
        count += len(files) + len(dirs) + len(links)
        if count > max_entries:
            raise InputError(f"input root has more than {max_entries} entries")
        prefix = f"{path}/" if path else ""
        for name, d, exe in files:
            tree.files.append(InputFile(prefix + name, d, exe))
        for name, target in links:
            tree.symlinks.append(InputSymlink(prefix + name, target))
            link_targets[prefix + name] = target
        # Reversed so the pop order (and so tree.dirs) follows name order: deterministic.
        for name, d in reversed(dirs):
            stack.append((prefix + name, d))
        if path:
            tree.dirs.append(path)
    for link in tree.symlinks:
        if _escapes(link.path, link.target, link_targets):
            raise InputError(f"{_where(link.path)}: symlink target {link.target!r} points "
                             "outside the input root")
    return tree


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


def stage(tree: InputTree, store, exec_root: str) -> None:
    """Materialize tree under exec_root (an existing directory): directories, files hardlinked
    from store, then symlinks. Raises MissingBlobs listing every file blob store lacks.

    Directories and most links are made in one native call (engine.native.link_tree, which
    never follows anything in the destination); files the store must vet one by one, and
    sources that were evicted or hit the link limit meanwhile, go through store.link_into."""
    if exec_root.endswith("/"):
        exec_root = exec_root.rstrip("/") or "/"
    base = exec_root + "/"
    bulk_source = getattr(store, "bulk_link_source", None)
    links: list[tuple[str, str]] = []
    bulk: list[InputFile] = []
    one_by_one: list[InputFile] = []
    for f in tree.files:
        src = bulk_source(f.digest, f.is_executable) if bulk_source else None
        if src is None:
            one_by_one.append(f)
        else:
            links.append((f.path, src))
            bulk.append(f)
    failed = native.link_tree(exec_root, tree.dirs, links)
    if failed:
        retry = {i for i, _ in failed}
        one_by_one.extend(bulk[i] for i in sorted(retry))
        bulk = [f for i, f in enumerate(bulk) if i not in retry]
    note = store.note_linked if bulk else None
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
