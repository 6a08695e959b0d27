"""Checking the relative paths a Command names (working directory, outputs) against the exec
root, lexically and on disk."""

from __future__ import annotations

import errno
import os

from engine.pipeline.inputs import InputError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's path walk


def split_relative(field: str, path: str, *, allow_empty: bool) -> list[str]:
    """The components of a '/'-separated relative path, '.' dropped, '..' kept."""
    if path == "":
        if not allow_empty:
            raise InputError(f"{field}: empty path is not allowed")
        return []
    if "\0" in path:
        raise InputError(f"{field}: path {path!r} contains NUL")
    if path.startswith("/"):
        raise InputError(f"{field}: path {path!r} is absolute; it must be relative")
    if path.endswith("/"):
        raise InputError(f"{field}: path {path!r} has a trailing slash")
    parts = path.split("/")
    if "" in parts:
        raise InputError(f"{field}: path {path!r} has an empty component")
    return [p for p in parts if p != "."]


def join_under_root(field: str, base: list[str], path: str, *, allow_empty: bool) -> str:
    """Resolve path (relative to the directory `base`, itself relative to the exec root)
    lexically to a path relative to the exec root; '' is the root itself."""
    out = list(base)
    for comp in split_relative(field, path, allow_empty=allow_empty):
        if comp == "..":
            if not out:
                raise InputError(f"{field}: path {path!r} leads outside the input root")
            out.pop()
        else:
            out.append(comp)
    return "/".join(out)


def working_directory_parts(command) -> list[str]:
    rel = join_under_root("working_directory", [], command.working_directory, allow_empty=True)
    return rel.split("/") if rel else []


def resolve_working_directory(command, root: str) -> str:
    """The absolute cwd for command under root; it must be a directory of the input tree,
    reached without leaving root."""
    rel = "/".join(working_directory_parts(command))
    real = real_path_under(root, rel)
    if real is None:
        raise InputError(f"working_directory: {command.working_directory!r} resolves outside "
                         "the input root")
    if not os.path.isdir(real):
        raise InputError(f"working_directory: {command.working_directory!r} is not a directory "
                         "of the input root")
    return real


def real_path_under(root: str, rel: str) -> str | None:
    """The symlink-free absolute path of root/rel, or None if it lies outside root."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel)) if rel else real_root
    if real == real_root or real.startswith(real_root + "/"):
        return real
    return None


def open_dir_beneath(root_fd: int, rel: str, resolved: list[str] | None = None) -> int | None:
    """An fd of the directory root/rel, walked one component at a time from root_fd without
    ever following a symlink out of root (an emulation of openat2's RESOLVE_BENEATH, which
    Python does not expose): relative symlinks are expanded in place, '..' never climbs above
    root. None when the path leaves root or a component is missing or not a directory.
    resolved, when given, receives the symlink-free components of the directory reached."""
    stack = [os.dup(root_fd)]  # directory fds from root down to the current one
    names: list[str] = []  # the components of stack[1:]
    pending = [c for c in reversed(rel.split("/")) if c] if rel else []
    links = 0
    try:
        while pending:
            comp = pending.pop()
            if comp == ".":
                continue
            if comp == "..":
                if len(stack) == 1:
                    return None
                os.close(stack.pop())
                names.pop()
                continue
            try:
                stack.append(os.open(comp, _DIR_FLAGS, dir_fd=stack[-1]))
                names.append(comp)
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return None
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
            # O_NOFOLLOW met a symlink (ELOOP, or ENOTDIR with O_DIRECTORY) or a non-directory.
            try:
                target = os.readlink(comp, dir_fd=stack[-1])
            except OSError:
                return None  # not a symlink: a file where a directory should be
            links += 1
            if links > _MAX_SYMLINKS or target.startswith("/"):
                return None
            pending.extend(c for c in reversed(target.split("/")) if c)
        if resolved is not None:
            resolved.extend(names)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def fd_path(fd: int, name: str = "") -> str:
    """A path that reaches name inside the directory open as fd, whatever the path to that
    directory has become since."""
    return f"/proc/self/fd/{fd}/{name or '.'}"  # "." for the directory, not the fd's link
