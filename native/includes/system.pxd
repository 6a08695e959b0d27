# Linux declarations that Cython's bundled posix/*.pxd files lack. _GNU_SOURCE (set by
# Python.h through pyconfig.h) exposes O_PATH.

cdef extern from "<fcntl.h>" nogil:
    enum: O_NOFOLLOW
    enum: O_PATH

cdef extern from "<unistd.h>" nogil:
    int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)
