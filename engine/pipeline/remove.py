"""Removing trees an action shaped: iterative, through directory fds, never following a link.

An action can leave a tree deeper than PATH_MAX (paths are never built: every step is
relative to an open directory fd), deeper than Python's recursion limit (the walk keeps an
explicit stack), wider than memory should hold (at most _BATCH subdirectory names are
remembered per level), full of symlinks to elsewhere (unlinked, never followed, never
descended), and with directories it made unreadable or unwritable (mode 000, 0500: the
directory is chmod-ed to 0700 and the operation retried once, which matters only when Stoker
is not root). A mount point inside the tree is never descended into (its content is not the
action's); removal fails there instead.

At most _HELD_FDS + 2 descriptors are open at once, however deep the tree: ancestors beyond
that window are closed, and reached again through '..', checked against the device and inode
recorded on the way down (a mismatch means the tree moved under us, and removal stops).

What cannot be removed (an immutable file, a mount point, a directory that kept changing) is
renamed into a quarantine directory with quarantine() and retried later by
purge_quarantine(), so one bad tree never blocks a slot or crashes Stoker.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Ancestor fds kept open: typical trees (< 40 levels) never need '..'.
_HELD_FDS = 64
# Subdirectory names remembered per level before descending; the directory is listed again
# for the rest, so a 10k-level tree with wide levels stays small in memory.
_BATCH = 1024
_DENIED = (errno.EACCES, errno.EPERM)

_T = TypeVar("_T")


@dataclass
class _Frame:
    """A directory being emptied: its name in its parent, identity, fd (None when closed to
    bound the fds held), and subdirectory names still to visit."""

    name: str
    dev: int
    ino: int
    fd: int | None
    pending: list[str] = field(default_factory=list)


def _unlock(fd: int, op: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """op(*args, **kwargs), retried once after making the directory fd 0700 if it was
    refused."""
    try:
        return op(*args, **kwargs)
    except OSError as e:
        if e.errno not in _DENIED:
            raise
        try:
            os.fchmod(fd, 0o700)
        except OSError:
            raise e from None
    return op(*args, **kwargs)


def _open_dir(parent_fd: int, name: str) -> int | None:
    """An fd for the subdirectory name of parent_fd; None if it is gone or is no longer a
    directory (then it was unlinked instead)."""
    try:
        try:
            return _unlock(parent_fd, os.open, name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno not in _DENIED:
                raise
            # The parent is searchable now, so the directory itself denies reading it.
            try:
                os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)
            except (ValueError, NotImplementedError):
                raise e from None  # a symlink by now: glibc refuses, and so do we
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    # Replaced by a file or a symlink since it was listed.
    _unlink(parent_fd, name)
    return None


def _unlink(dir_fd: int, name: str) -> None:
    try:
        _unlock(dir_fd, os.unlink, name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _scan(frame: _Frame, fd: int) -> None:
    """Unlink every non-directory in fd; remember up to _BATCH subdirectory names."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not is_dir:
                _unlink(fd, entry.name)
            elif len(frame.pending) < _BATCH:
                frame.pending.append(entry.name)


def _parent_fd(child: _Frame, parent: _Frame) -> int:
    """parent's fd, reopened through child's '..' if it was closed."""
    if parent.fd is not None:
        return parent.fd
    assert child.fd is not None
    fd = _unlock(child.fd, os.open, "..", _DIR_FLAGS, dir_fd=child.fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (parent.dev, parent.ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "directory moved while its tree was being removed",
                      parent.name)
    parent.fd = fd
    return fd


def _empty_fd(top_fd: int) -> None:
    """Remove everything inside the directory top_fd (which stays open, the caller's)."""
    st = os.fstat(top_fd)
    stack = [_Frame("", st.st_dev, st.st_ino, top_fd)]
    try:
        while True:
            frame = stack[-1]
            fd = frame.fd
            assert fd is not None  # the innermost frame always holds its fd
            if not frame.pending:
                _scan(frame, fd)
            if frame.pending:
                name = frame.pending.pop()
                child_fd = _open_dir(fd, name)
                if child_fd is None:
                    continue
                cst = os.fstat(child_fd)
                if cst.st_dev != frame.dev:
                    os.close(child_fd)
                    raise OSError(errno.EBUSY, "a mount point is in the tree; not descending "
                                  "into it", name)
                stack.append(_Frame(name, cst.st_dev, cst.st_ino, child_fd))
                # Keep only the innermost _HELD_FDS ancestors open (never the caller's fd).
                old = len(stack) - 1 - _HELD_FDS
                if old >= 1 and stack[old].fd is not None:
                    os.close(stack[old].fd)  # type: ignore[arg-type]
                    stack[old].fd = None
                continue
            # frame's directory is empty: remove it from its parent.
            if len(stack) == 1:
                return
            parent = stack[-2]
            pfd = _parent_fd(frame, parent)
            os.close(fd)
            frame.fd = None
            stack.pop()
            try:
                _unlock(pfd, os.rmdir, frame.name, dir_fd=pfd)
            except FileNotFoundError:
                pass
    finally:
        for frame in stack[1:]:
            if frame.fd is not None:
                os.close(frame.fd)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as 3-digit octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _refuse_mounts(path: str, include_self: bool) -> None:
    """Raise EBUSY if something is mounted below path (or on it, if include_self).

    The walk also refuses to cross into another device, but a bind mount of the same
    filesystem keeps st_dev, and emptying it would destroy its source's content.
    """
    top = os.path.realpath(path)
    prefix = top.rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            points = [_unescape(line.split(" ", 5)[4]) for line in f]
    except OSError:
        return  # no /proc: the st_dev check below is what is left
    for point in points:
        if point.startswith(prefix) or (include_self and point == top):
            raise OSError(errno.EBUSY, "a mount point is in the tree; not removing it", point)


def _open_top(path: str) -> int:
    """An fd for the directory at path (a symlink there is refused with ENOTDIR), made
    readable if the action took that away."""
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno not in _DENIED:
            raise
        try:
            os.chmod(path, 0o700, follow_symlinks=False)
        except (ValueError, NotImplementedError):
            raise e from None
        return os.open(path, _DIR_FLAGS)


def empty_dir(path: str) -> None:
    """Remove everything inside the directory at path, keeping path itself (whose mode may
    have been set to 0700 on the way). A symlink at path is refused (ENOTDIR), not followed."""
    _refuse_mounts(path, include_self=False)
    fd = _open_top(path)
    try:
        _empty_fd(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove path and everything below it; a symlink or file at path is just unlinked.
    Nothing at path is success. Raises OSError for what could not be removed (the rest is
    gone); path's parent is Stoker's and its mode is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    _refuse_mounts(path, include_self=True)
    fd = _open_top(path)
    try:
        _empty_fd(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def quarantine(path: str, quarantine_dir: str) -> str:
    """Move path (which must be on quarantine_dir's filesystem) under a unique name in
    quarantine_dir, created 0700 if needed; the new path."""
    os.makedirs(quarantine_dir, mode=0o700, exist_ok=True)
    # The original name (cut short: it may be 255 bytes already) helps whoever looks.
    base = os.path.basename(path.rstrip("/"))[:64]
    new = os.path.join(quarantine_dir, f"{base}.{uuid.uuid4().hex}")
    os.rename(path, new)
    return new


def purge_quarantine(quarantine_dir: str) -> list[str]:
    """remove_tree each entry of quarantine_dir; the paths still there afterwards, each
    logged as a warning. Never raises."""
    try:
        names = sorted(os.listdir(quarantine_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("cannot list the quarantine %s: %s", quarantine_dir, e)
        return [quarantine_dir]
    left = []
    for name in names:
        path = os.path.join(quarantine_dir, name)
        try:
            remove_tree(path)
        except Exception as e:  # anything: the next purge tries again
            log.warning("could not remove quarantined %s (will retry): %s", path, e)
            left.append(path)
    return left
