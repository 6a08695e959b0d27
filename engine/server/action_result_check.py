"""What the action cache stores: only ActionResults that Stoker could have produced itself.

Every write is checked here once, before it is stored: a client's UpdateActionResult and the
results of Stoker's own executions alike (engine/server/action_cache.py). A violation is
INVALID_ARGUMENT, a blob the CAS lacks FAILED_PRECONDITION (as REAPI says); each message
names the field, e.g. `action_result.output_files[2].path: '../x' is not a normalized
relative path`.

- Paths of output_files, output_directories, output_symlinks, output_file_symlinks and
  output_directory_symlinks are normalized relative paths: not absolute, no NUL, no empty,
  '.' or '..' component (so no 'a//b' and no trailing '/'), names of at most NAME_MAX
  bytes, MAX_PATH_BYTES in all. Only an output directory's may be '' (the working directory
  itself, which REAPI allows).
- No two outputs have the same path, except that an output_symlinks entry may be repeated,
  same path and target, in output_file_symlinks or output_directory_symlinks (REAPI asks
  servers to fill the legacy fields alongside, for v2.0 clients).
- Symlink targets are relative or absolute, but not empty, without NUL, at most
  MAX_TARGET_BYTES.
- At most MAX_OUTPUTS outputs, node properties and auxiliary metadata entries together.
- Every digest is well formed (a size-0 one is the empty blob's), and every blob a client may
  fetch is in the CAS: output files, stdout, stderr, each Tree, every file in a Tree, and,
  when root_directory_digest is set, every Directory of the Tree (what a client following
  that field fetches).
- Each output directory's Tree parses as a Tree, within the limits of input trees
  (engine/pipeline/inputs.py): at most MAX_DIRECTORY_ENTRIES entries in one Directory,
  DEFAULT_MAX_ENTRIES in all (counting each path a shared Directory appears at, and over all
  the Trees of one result), MAX_DEPTH levels; MAX_TREE_BYTES of Trees per result; names
  valid and unique in their Directory; every Directory a DirectoryNode names is among the
  children, and every child is reachable from the root; root_directory_digest, when set, is
  the root's digest; is_topologically_sorted, when set, is true.
- Inline bytes (stdout_raw, stderr_raw, output_files[].contents) are dropped from what is
  stored: entries refer to blobs by digest only (GetActionResult never inlines, as REAPI
  allows), and stdout_raw or stderr_raw without its digest is refused.

Checking costs bounded time and memory whatever the blobs' shapes: a Tree is read only when
its declared size fits the budget, its records and each Directory's entries are counted on
the wire before anything is parsed (a 4 MB Tree of 2 million empty children is refused after
counting), and Directories are parsed in pieces of at most _CHUNK_BYTES, so that messages of
a few bytes each (which protobuf expands ~30 times) never take more than a few MB at once.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf.message import DecodeError

from engine import hashing
from engine.cas.store import BlobNotFound, BlobStore
from engine.digest import Digest, DigestError, from_proto
from engine.digest import empty as empty_digest
from engine.errors import FailedPrecondition, InvalidArgument
from engine.pipeline.inputs import (
    DEFAULT_MAX_ENTRIES,
    MAX_DEPTH,
    MAX_DIRECTORY_ENTRIES,
    MAX_PATH_BYTES,
    MAX_TARGET_BYTES,
    NAME_MAX,
)
from engine.proto import re_pb2

# Outputs (all five lists), their node properties and auxiliary metadata: as many entries as
# one input Directory may hold, far beyond any real action's declared outputs.
MAX_OUTPUTS = MAX_DIRECTORY_ENTRIES
# The Trees of one result together: a million entries of ~100 bytes fit.
MAX_TREE_BYTES = 128 << 20
# One entry of a Directory in a Tree (or its node_properties): a 255-byte name, a 4095-byte
# symlink target and properties fit many times over.
MAX_NODE_BYTES = 16 << 10
# Directories are parsed this many bytes of entries at a time.
_CHUNK_BYTES = 256 << 10
_SHOWN = 120  # characters of a path or name quoted in a message


@dataclass(frozen=True)
class Checked:
    result: re_pb2.ActionResult  # what is stored: the result without inline bytes
    blobs: list[Digest]  # every non-empty blob a client may fetch for it, each once


def check(function: str, result: re_pb2.ActionResult, cas: BlobStore) -> Checked:
    """The result as it may be stored, and its blobs; InvalidArgument or FailedPrecondition
    (module docstring) if it may not be."""
    _check_outputs(result)
    stored = re_pb2.ActionResult()
    stored.CopyFrom(result)
    direct: dict[Digest, str] = {}  # blob -> the field naming it first
    for i, f in enumerate(stored.output_files):
        where = f"action_result.output_files[{i}]"
        direct.setdefault(_digest(function, f.digest, f"{where}.digest"), f"{where}.digest")
        f.ClearField("contents")
    for name in ("stdout", "stderr"):
        field = f"{name}_digest"
        if stored.HasField(field):
            where = f"action_result.{field}"
            direct.setdefault(_digest(function, getattr(stored, field), where), where)
        elif getattr(stored, f"{name}_raw"):
            raise InvalidArgument(f"action_result.{name}_raw: inline {name} without "
                                  f"{field}: upload it to the CAS and send its digest")
        stored.ClearField(f"{name}_raw")
    trees: list[tuple[str, Digest, re_pb2.OutputDirectory]] = []
    for i, d in enumerate(stored.output_directories):
        where = f"action_result.output_directories[{i}]"
        tree_digest = _digest(function, d.tree_digest, f"{where}.tree_digest")
        direct.setdefault(tree_digest, f"{where}.tree_digest")
        trees.append((where, tree_digest, d))
    _require(cas, direct)

    blobs = dict(direct)
    budget = _Budget(DEFAULT_MAX_ENTRIES, MAX_TREE_BYTES)
    for where, digest, out in trees:
        if digest.size > budget.tree_bytes:
            raise InvalidArgument(f"{where}.tree_digest: the Trees of one result may hold "
                                  f"{MAX_TREE_BYTES} bytes in all; {digest} has "
                                  f"{digest.size} and {budget.tree_bytes} are left")
        budget.tree_bytes -= digest.size
        try:
            data = cas.read_bytes(digest)
        except BlobNotFound:
            raise FailedPrecondition(f"{where}.tree_digest: {digest} is not in the CAS") \
                from None
        tree = _check_tree(function, data, f"{where}.tree_digest", budget,
                           out.is_topologically_sorted)
        inner = dict.fromkeys(tree.files, f"{where}.tree_digest: a file of the Tree")
        if out.HasField("root_directory_digest"):
            root = _digest(function, out.root_directory_digest, f"{where}.root_directory_digest")
            if root != tree.root:
                raise InvalidArgument(f"{where}.root_directory_digest: {root} is not the "
                                      f"digest of the Tree's root, {tree.root}")
            for directory in tree.directories:
                inner.setdefault(directory, f"{where}.root_directory_digest: a Directory of "
                                 "the Tree")
        _require(cas, inner)
        blobs.update(inner)
    return Checked(stored, [b for b in blobs if b.size])


# ---- outputs ----------------------------------------------------------------------------


def _clip(text: str) -> str:
    if len(text) <= _SHOWN:
        return text
    half = _SHOWN // 2
    return f"{text[:half]}...{text[-half:]} ({len(text.encode())} bytes)"


def _check_path(where: str, path: str, *, may_be_empty: bool) -> None:
    if not path and may_be_empty:
        return
    parts = path.split("/")
    if "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{where}: {_clip(path)!r} is not a normalized relative path")
    size = len(path.encode())
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"{where}: {_clip(path)!r} is {size} bytes long, more than the "
                              f"{MAX_PATH_BYTES} allowed")
    for p in parts:
        if len(p.encode()) > NAME_MAX:
            raise InvalidArgument(f"{where}: {_clip(path)!r} has a name longer than "
                                  f"{NAME_MAX} bytes")


def _check_target(where: str, target: str) -> None:
    if not target:
        raise InvalidArgument(f"{where}: the symlink target is empty")
    if "\0" in target:
        raise InvalidArgument(f"{where}: the symlink target {_clip(target)!r} contains NUL")
    size = len(target.encode())
    if size > MAX_TARGET_BYTES:
        raise InvalidArgument(f"{where}: the symlink target is {size} bytes long, more than "
                              f"the {MAX_TARGET_BYTES} a symlink may hold")


def _check_outputs(result: re_pb2.ActionResult) -> None:
    lists = (("output_files", result.output_files),
             ("output_directories", result.output_directories),
             ("output_symlinks", result.output_symlinks),
             ("output_file_symlinks", result.output_file_symlinks),
             ("output_directory_symlinks", result.output_directory_symlinks))
    count = sum(len(items) for _, items in lists) + len(
        result.execution_metadata.auxiliary_metadata)
    if count > MAX_OUTPUTS:
        raise InvalidArgument(f"action_result: {count} outputs and auxiliary metadata "
                              f"entries, more than the {MAX_OUTPUTS} allowed")
    current = {s.path: s.target for s in result.output_symlinks}
    seen: dict[str, str] = {}  # path -> the output that has it
    mirrored: set[str] = set()  # output_symlinks repeated in a legacy field
    for name, items in lists:
        for i, out in enumerate(items):
            where = f"action_result.{name}[{i}]"
            _check_path(f"{where}.path", out.path, may_be_empty=name == "output_directories")
            if isinstance(out, re_pb2.OutputSymlink):
                _check_target(f"{where}.target", out.target)
            if isinstance(out, re_pb2.OutputSymlink | re_pb2.OutputFile):
                count += len(out.node_properties.properties)
            if name in ("output_file_symlinks", "output_directory_symlinks") and \
                    current.get(out.path) == out.target and out.path not in mirrored:
                mirrored.add(out.path)
                continue
            if out.path in seen:
                raise InvalidArgument(f"{where}.path: {_clip(out.path)!r} is also the path "
                                      f"of {seen[out.path]}")
            seen[out.path] = where
    if count > MAX_OUTPUTS:
        raise InvalidArgument(f"action_result: {count} outputs, node properties and "
                              f"auxiliary metadata entries, more than the {MAX_OUTPUTS} "
                              "allowed")


@functools.cache
def _empty(function: str) -> Digest:
    return empty_digest(function)


def _digest(function: str, pb: re_pb2.Digest, where: str) -> Digest:
    try:
        d = from_proto(function, pb)
    except DigestError as e:
        raise InvalidArgument(f"{where}: {e}") from None
    if d.size == 0 and d != _empty(function):
        raise InvalidArgument(f"{where}: size 0 with a hash that is not the empty blob's: {d}")
    return d


def _require(cas: BlobStore, blobs: dict[Digest, str]) -> None:
    missing = cas.find_missing([d for d in blobs if d.size])
    if missing:
        more = f" (and {len(missing) - 1} more blobs)" if len(missing) > 1 else ""
        raise FailedPrecondition(f"{blobs[missing[0]]}: {missing[0]} is not in the CAS{more}")


# ---- Trees ------------------------------------------------------------------------------


class _Malformed(Exception):
    """The wire format is not what a Tree or a Directory may hold."""


@dataclass
class _Budget:
    """What the rest of one result's Trees may hold."""

    entries: int
    tree_bytes: int


class _Tree(NamedTuple):
    root: Digest
    files: set[Digest]
    directories: list[Digest]  # the root and every child, each once


class _Dir(NamedTuple):
    entries: int
    subdirs: list[tuple[str, Digest]]


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise _Malformed("a varint is truncated or too long")


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, offset of its tag, start and end of its value) of each field of the
    message in data[pos:end]; every one must be length-delimited, as in a Tree and a
    Directory. Nothing is parsed or copied."""
    while pos < end:
        at = pos
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(data, pos, end)
        if tag & 7 != 2:
            raise _Malformed(f"field {tag >> 3} has wire type {tag & 7}")
        length = data[pos] if pos < end else 0x80
        if length < 0x80:
            pos += 1
        else:
            length, pos = _varint(data, pos, end)
        if length > end - pos:
            raise _Malformed(f"field {tag >> 3} runs past the end")
        yield tag >> 3, at, pos, pos + length
        pos += length


def _check_tree(function: str, data: bytes, where: str, budget: _Budget,
                sorted_: bool) -> _Tree:
    # The records, counted before anything is parsed: each child is a Directory that some
    # DirectoryNode names, so more children than entries left cannot be a valid Tree.
    root_span = (0, 0)  # no root: an empty one
    has_root = False
    starts, ends = array("q"), array("q")
    try:
        for number, _, start, end in _fields(data, 0, len(data)):
            if number == 1 and not has_root:
                root_span, has_root = (start, end), True
            elif number == 2:
                if len(starts) >= budget.entries:
                    raise InvalidArgument(f"{where}: the Tree has more than {budget.entries} "
                                          "children, more than the entries left of the "
                                          f"{DEFAULT_MAX_ENTRIES} a result's Trees may hold")
                starts.append(start)
                ends.append(end)
            else:
                raise _Malformed("a second root" if number == 1 else f"field {number}")
    except _Malformed as e:
        raise InvalidArgument(f"{where}: not a Tree: {e}") from None

    view = memoryview(data)

    def digest_of(start: int, end: int) -> Digest:
        return Digest(function, hashing.hash_bytes(function, view[start:end]), end - start)

    root = digest_of(*root_span)
    order = [digest_of(s, e) for s, e in zip(starts, ends, strict=True)]
    spans = {root: root_span}
    for k, d in enumerate(order):
        spans.setdefault(d, (starts[k], ends[k]))

    # Level by level from the root, each distinct Directory parsed once; a level maps each
    # Directory to the number of paths it appears at, so the expanded count of a DAG that
    # repeats a Directory is bounded without expanding it.
    dirs: dict[Digest, _Dir] = {}
    files: set[Digest] = set()
    paths = {root: ""}
    level = {root: 1}
    depth = expanded = 0
    while level:
        below: dict[Digest, int] = {}
        for d, times in level.items():
            info = dirs.get(d)
            if info is None:
                path = paths[d]
                at = f"{where}: directory {_clip(path)!r}" if path else f"{where}: the root"
                span = spans.get(d)
                if span is None:
                    if d != _empty(function):
                        raise InvalidArgument(f"{at}: Directory {d} is not among the Tree's "
                                              "children")
                    span = (0, 0)
                info = dirs[d] = _check_directory(function, data, span, at, files)
                for name, sub in info.subdirs:
                    paths.setdefault(sub, f"{path}/{name}" if path else name)
            expanded += times * info.entries
            if expanded > budget.entries:
                raise InvalidArgument(f"{where}: the Tree has more than {budget.entries} "
                                      "entries (a Directory counted at each path it appears "
                                      f"at), more than are left of the {DEFAULT_MAX_ENTRIES} "
                                      "a result's Trees may hold")
            if info.subdirs and depth == MAX_DEPTH:
                raise InvalidArgument(f"{where}: directory {_clip(paths[d])!r} has "
                                      f"directories nested more than {MAX_DEPTH} levels deep")
            for _, sub in info.subdirs:
                below[sub] = below.get(sub, 0) + times
        level = below
        depth += 1
    budget.entries -= expanded

    for k, d in enumerate(order):
        if d not in dirs:
            raise InvalidArgument(f"{where}: children[{k}] ({d}) is not reachable from the "
                                  "root")
    if sorted_:
        named = {sub for _, sub in dirs[root].subdirs}
        seen: set[Digest] = set()
        for k, d in enumerate(order):
            if d in seen or d not in named:
                problem = "repeats an earlier child" if d in seen else \
                    "comes before every Directory that names it"
                raise InvalidArgument(f"{where}: is_topologically_sorted is set, but "
                                      f"children[{k}] {problem}")
            seen.add(d)
            named.update(sub for _, sub in dirs[d].subdirs)
    return _Tree(root, files, list(dirs))


def _check_directory(function: str, data: bytes, span: tuple[int, int], where: str,
                     files: set[Digest]) -> _Dir:
    """Check the Directory in data[span]; add its files' digests to files."""
    start, end = span
    count = 0
    chunks: list[tuple[int, int]] = []
    chunk = start
    try:
        for number, at, _, value_end in _fields(data, start, end):
            if number not in (1, 2, 3, 5):
                raise _Malformed(f"field {number}")
            if value_end - at > MAX_NODE_BYTES:
                raise InvalidArgument(f"{where}: an entry of {value_end - at} bytes, more than "
                                      f"the {MAX_NODE_BYTES} allowed")
            if number != 5:
                count += 1
                if count > MAX_DIRECTORY_ENTRIES:
                    raise InvalidArgument(f"{where}: more than the {MAX_DIRECTORY_ENTRIES} "
                                          "entries allowed in one directory")
            if value_end - chunk > _CHUNK_BYTES:
                chunks.append((chunk, at))
                chunk = at
    except _Malformed as e:
        raise InvalidArgument(f"{where}: not a Directory: {e}") from None
    chunks.append((chunk, end))

    names: set[str] = set()
    subdirs: list[tuple[str, Digest]] = []

    def entry(name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise InvalidArgument(f"{where}: entry name {_clip(name)!r} is not valid")
        if len(name.encode()) > NAME_MAX:
            raise InvalidArgument(f"{where}: entry name {_clip(name)!r} is longer than "
                                  f"{NAME_MAX} bytes")
        if name in names:
            raise InvalidArgument(f"{where}: entry name {_clip(name)!r} is used twice")
        names.add(name)
        return f"{where}: {_clip(name)!r}"

    for chunk_start, chunk_end in chunks:
        try:
            d = re_pb2.Directory.FromString(data[chunk_start:chunk_end])
        except DecodeError as err:
            raise InvalidArgument(f"{where}: not a Directory: {err}") from None
        for f in d.files:
            files.add(_digest(function, f.digest, entry(f.name)))
        for sub in d.directories:
            subdirs.append((sub.name, _digest(function, sub.digest, entry(sub.name))))
        for link in d.symlinks:
            _check_target(entry(link.name), link.target)
    return _Dir(count, subdirs)
