# Linux declarations that Cython's bundled posix/*.pxd files lack. _GNU_SOURCE (set by
# Python.h through pyconfig.h) exposes O_PATH.

cdef extern from "<fcntl.h>" nogil:
    enum: O_NOFOLLOW
    enum: O_PATH

cdef extern from "<unistd.h>" nogil:
    int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)

cdef extern from "<fcntl.h>" nogil:
    # Reading must not dirty the inode just to move its atime (open fails with EPERM when
    # the caller neither owns the file nor has CAP_FOWNER; the reader then drops it).
    enum: O_NOATIME

cdef extern from "Python.h":
    # ASCII str objects hold their text as a NUL-terminated char array: a path can be
    # handed to C without encoding it into a new bytes object.
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    unsigned char *PyUnicode_1BYTE_DATA(object o)
    object PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    # A tuple of a str and an int can never be part of a cycle (CPython untracks such tuples
    # itself, but only once a collection has looked at them).
    void PyObject_GC_UnTrack(void *o)
