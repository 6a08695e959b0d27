"""One action's private directory: the exec root, its TMPDIR and its stdout/stderr files.

Layout: <build_root>/<unique id>/{root/, tmp/, stdout, stderr}. root/ is the input root and
the exec root at once.

run_as: when Stoker runs as root, each action runs as a slot uid of its own
(engine/pipeline/identities.py) so that it cannot write through a hardlink into the local CAS
(cached inodes are 0444, which root ignores) nor reach another action. The action then needs
to own the directories it writes outputs into, so the directories of root/ and tmp/ are
handed to it, never the hardlinked files. root/ and tmp/ are 0700: only that uid gets in;
<id>/ is 0711 root's and the build root is searchable but not listable, so an action cannot
find another's directory either.

Order of use: create() (or ActionDirPool.acquire()), stage the inputs into root/,
hand_over(tree.dirs), working_directory(command), prepare_outputs(command), run, collect
outputs, cleanup() (or ActionDirPool.release()).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterable

from engine.pipeline import remove
from engine.pipeline.inputs import InputError
from engine.pipeline.paths import (
    join_under_root,
    open_dir_beneath,
    resolve_working_directory,
    working_directory_parts,
)

log = logging.getLogger(__name__)

RunAs = tuple[int, int]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_checked_roots: set[tuple[str, int, int]] = set()


class ActionDir:
    def __init__(self, path: str, run_as: RunAs | None):
        self.path = path
        self.root = os.path.join(path, "root")
        self.tmp = os.path.join(path, "tmp")
        self.stdout_path = os.path.join(path, "stdout")
        self.stderr_path = os.path.join(path, "stderr")
        self.run_as = run_as

    @classmethod
    def create(cls, build_root: str, run_as: RunAs | None = None) -> ActionDir:
        build_root = os.path.abspath(build_root)
        if not os.path.isdir(build_root):
            os.makedirs(build_root, 0o711, exist_ok=True)
            os.chmod(build_root, 0o711)  # searchable, not listable: makedirs obeys the umask
        if run_as is not None:
            check_searchable(build_root, *run_as)
        while True:
            path = os.path.join(build_root, secrets.token_hex(8))
            try:
                # Searchable (not listable) by others, so a run_as action can reach root/.
                os.mkdir(path, 0o711 if run_as is not None else 0o700)
                break
            except FileExistsError:
                continue
        ad = cls(path, run_as)
        os.mkdir(ad.root, 0o700)
        os.mkdir(ad.tmp, 0o700)
        if run_as is not None:
            os.chmod(path, 0o711)  # mkdir's mode is subject to the umask
            os.chown(ad.root, *run_as)
            os.chown(ad.tmp, *run_as)
        return ad

    def hand_over(self, rel_dirs: Iterable[str]) -> None:
        """Give the run_as user the staged directories rel_dirs (relative to root/); call after
        staging. A no-op without run_as."""
        if self.run_as is None:
            return
        uid, gid = self.run_as
        base = self.root + "/"
        chown = os.chown
        for d in rel_dirs:
            chown(base + d, uid, gid, follow_symlinks=False)

    def working_directory(self, command) -> str:
        """The action's absolute cwd; InputError unless it is a directory of the input root."""
        return resolve_working_directory(command, self.root)

    def prepare_outputs(self, command) -> list[str]:
        return prepare_outputs(command, self.root, self.run_as)

    def lock_down(self) -> None:
        """Take root/ and tmp/ back from the action's uid, once its processes are gone and
        before anything is collected (see lock_down()). A no-op without run_as."""
        if self.run_as is not None:
            lock_down(self.root)
            lock_down(self.tmp)

    def reset(self) -> bool:
        """Empty root/ and tmp/ and give them back their fresh owner and mode, for the next
        action. False (the caller then removes the directory) when either is not a plain
        directory any more or carries extended attributes (an ACL, say), which an emptied
        directory would pass on to the next action."""
        owner = self.run_as or (os.geteuid(), os.getegid())
        for f in (self.stdout_path, self.stderr_path):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        for d, mode in ((self.root, 0o700), (self.tmp, 0o700)):
            try:
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode) or os.listxattr(d, follow_symlinks=False):
                    return False
                if stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != owner:
                    os.chmod(d, mode, follow_symlinks=False)
                    if self.run_as is not None:
                        os.chown(d, *owner, follow_symlinks=False)
                remove.empty_dir(d)  # both are 0700 already, the mode empty_dir may set
            except OSError:
                return False
        return True

    def cleanup(self) -> None:
        """Remove the whole directory, whatever the action left in it (remove.py); what
        cannot be removed goes to the quarantine, retried later. Never raises: a tree an
        action shaped must not stop the worker."""
        try:
            remove.remove_tree(self.path)
            return
        except OSError as e:
            reason = e
        qdir = quarantine_dir(os.path.dirname(self.path))
        try:
            moved = remove.quarantine(self.path, qdir)
            log.warning("could not remove %s (%s): moved to %s, retried later", self.path,
                        reason, moved)
        except OSError as e:
            log.error("could not remove %s (%s) nor move it aside (%s)", self.path, reason, e)


def lock_down(top: str) -> None:
    """Make top and every directory below it Stoker's, mode 0700: top-down, through fds,
    never following a symlink. Every process of the action is dead by now, but one of
    another uid may still hold an fd into the tree (passed over a socket while the action
    ran) and, through it, swap a directory for a symlink while outputs are read by path, or
    keep creating entries while the tree is removed. Once a directory is root's 0700, no
    other uid can change its entries, fd or no fd; a parent is locked before its children
    are listed, so nothing below can move meanwhile. One fd at a time, whatever the depth:
    the walk climbs back through '..', checked against the device and inode it left."""
    uid, gid = os.geteuid(), os.getegid()
    fd = os.open(top, _DIR_FLAGS)
    frames: list[tuple[int, int, list[str]]] = []  # (dev, ino, subdirectories left)

    def take() -> None:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
        st = os.fstat(fd)
        with os.scandir(fd) as it:
            subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        frames.append((st.st_dev, st.st_ino, subdirs))

    try:
        take()
        while True:
            subdirs = frames[-1][2]
            if subdirs:
                child = os.open(subdirs.pop(), _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                take()
                continue
            frames.pop()
            if not frames:
                return
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != frames[-1][:2]:
                raise OSError(errno.ESTALE, "the tree moved while it was taken back", top)
    finally:
        os.close(fd)


def quarantine_dir(build_root: str) -> str:
    """Where a worker's build root puts what it could not remove: beside the worker
    directories, on the same filesystem (a rename)."""
    return os.path.join(os.path.dirname(os.path.abspath(build_root)), "quarantine")


class ActionDirPool:
    """Hands out action directories and takes them back emptied, up to keep of them.

    Making and removing the three directories of a fresh ActionDir costs ~0.5 ms of
    syscalls on this kind of machine, a quarter of a no-op action's overhead; emptying a
    used one costs what its content costs. Directories are kept per owner (each slot uid has
    its own), so a reused one is never handed from one uid to another. Safe to call from
    several threads (dict and list operations are atomic); keep may be overshot by a racing
    release, which is harmless.
    """

    def __init__(self, build_root: str, keep: int):
        self.build_root = build_root
        self.keep = keep
        self._free: dict[RunAs | None, list[ActionDir]] = {}
        self._kept = 0

    def acquire(self, run_as: RunAs | None) -> ActionDir:
        try:
            ad = self._free.get(run_as, []).pop()
            self._kept -= 1
            return ad
        except IndexError:
            return ActionDir.create(self.build_root, run_as)

    def release(self, ad: ActionDir) -> None:
        if self._kept < self.keep and ad.reset():
            self._free.setdefault(ad.run_as, []).append(ad)
            self._kept += 1
        else:
            ad.cleanup()

    def close(self) -> None:
        for dirs in self._free.values():
            while dirs:
                dirs.pop().cleanup()
        self._kept = 0


def prepare_outputs(command, root: str, run_as: RunAs | None = None) -> list[str]:
    """Create the parent directories of the Command's outputs under root (the exec root).

    With output_paths, the parents of each path; otherwise the parents of each output_files
    and output_directories entry (not the output directories themselves, as the spec says).
    Paths are relative to the working directory. Returns the directories created (relative
    to root), already handed to run_as when given.
    """
    wd = working_directory_parts(command)
    wanted: list[tuple[str, str, bool]] = []  # (field, path, empty allowed)
    if command.output_paths:
        wanted = [("output_paths", p, True) for p in command.output_paths]
    else:
        wanted = [("output_files", p, False) for p in command.output_files]
        wanted += [("output_directories", p, True) for p in command.output_directories]
    root_fd = os.open(root, _DIR_FLAGS)
    created: list[str] = []
    done: set[str] = set()
    try:
        for field, path, allow_empty in wanted:
            rel = join_under_root(field, wd, path, allow_empty=allow_empty)
            parent = rel.rpartition("/")[0]
            if parent and parent not in done:
                done.add(parent)
                _make_parents(root_fd, parent, field, path, created, run_as)
    finally:
        os.close(root_fd)
    return created


def _make_parents(root_fd: int, rel: str, field: str, path: str, created: list[str],
                  run_as: RunAs | None) -> None:
    """mkdir each missing component by directory fd and hand it over through the fd it was
    opened by: nothing here follows a symlink out of the exec root or chowns by path."""
    fd = os.dup(root_fd)
    try:
        walked: list[str] = []
        for comp in rel.split("/"):
            walked.append(comp)
            try:
                os.mkdir(comp, 0o755, dir_fd=fd)  # never follows: a symlink gives EEXIST
                made = True
            except FileExistsError:
                made = False
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                shown = "/".join(walked)
                if not stat.S_ISLNK(os.stat(comp, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise InputError(f"{field}: {path!r}: parent {shown!r} exists and is not "
                                     "a directory") from None
                # An existing symlink: followed only while it stays inside the root.
                real: list[str] = []
                beneath = open_dir_beneath(root_fd, shown, real)
                if beneath is None:
                    raise InputError(f"{field}: {path!r}: parent {shown!r} is a symlink that "
                                     "does not lead to a directory inside the input "
                                     "root") from None
                nfd = beneath
                walked = real
            os.close(fd)
            fd = nfd
            if made:
                if run_as is not None:
                    os.fchown(fd, *run_as)
                created.append("/".join(walked))
    finally:
        os.close(fd)


def check_searchable(path: str, uid: int, gid: int) -> None:
    """Fail early, with a clear message, if uid could not reach directories under path."""
    key = (path, uid, gid)
    if key in _checked_roots:
        return
    p = path
    while True:
        st = os.stat(p)
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PermissionError(
                f"build root {path}: {p} is not searchable by uid {uid} (actions run as that "
                "user); chmod o+x it or choose another build root")
        if p == "/":
            break
        p = os.path.dirname(p)
    _checked_roots.add(key)
