"""Byte-range locks on a lock file that exclude other processes AND other store instances.

We use Linux open-file-description (OFD) locks rather than classic POSIX fcntl locks:
classic locks belong to the process, so a second store instance on the same root inside one
process would share them, and closing any fd of the file would silently drop them all. OFD
locks belong to the open file, are released by the kernel when the holder dies, and never
conflict with themselves, so threads sharing one fd need a threading lock on top.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (must be 0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


def _fcntl(fd: int, cmd: int, ltype: int, offset: int, length: int) -> None:
    fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, length, 0))


def lock(fd: int, offset: int, *, exclusive: bool = True, wait: bool = True,
         length: int = 1) -> bool:
    """Take (or convert) a lock on [offset, offset+length); False if wait=False and busy.

    Converting a held lock between shared and exclusive is atomic; a failed conversion
    leaves the lock that was held.
    """
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    if wait:
        _fcntl(fd, fcntl.F_OFD_SETLKW, ltype, offset, length)
        return True
    try:
        _fcntl(fd, fcntl.F_OFD_SETLK, ltype, offset, length)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, offset: int, length: int = 1) -> None:
    _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset, length)
