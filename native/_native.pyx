# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""engine._native: the byte-crunching core (see native/README.md).

Bytes in, digests out; files opened, read, linked and mapped in C with the GIL released.
No policy lives here: engine/native.py picks this module or its pure-Python twin, which
gives the same results, and the rest of the engine only sees engine/native.py.

One compilation unit: the .pxi files below are included, so calls between them are plain
C calls. C declarations are in includes/*.pxd.
"""

from cpython.buffer cimport (PyBUF_READ, PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EINTR, EISDIR, EMLINK, ENOENT, ENOMEM, EPERM, errno
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, strchr, strlen, strrchr
from posix.fcntl cimport (AT_FDCWD, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_EXCL, O_NONBLOCK,
                          O_RDONLY, O_WRONLY, POSIX_FADV_SEQUENTIAL, open, openat,
                          posix_fadvise)
from posix.mman cimport MADV_SEQUENTIAL, MAP_FAILED, MAP_SHARED, PROT_READ, madvise, mmap, munmap
from posix.stat cimport S_ISDIR, S_ISREG, fchmod, fstat, mkdirat, struct_stat
from posix.types cimport mode_t
from posix.unistd cimport close, read

from includes.openssl cimport (EVP_MD, EVP_MD_CTX, EVP_MD_CTX_free, EVP_MD_CTX_new,
                               EVP_MD_fetch, EVP_DigestFinal_ex, EVP_DigestInit_ex2,
                               EVP_DigestUpdate)
from includes.system cimport (O_NOATIME, O_NOFOLLOW, O_PATH, PyUnicode_1BYTE_DATA,
                              PyObject_GC_UnTrack, PyUnicode_DATA, PyUnicode_GET_LENGTH,
                              PyUnicode_IS_COMPACT_ASCII, PyUnicode_New, linkat)

import errno as _errno
import os

import blake3 as _blake3_module

include "hashing.pxi"
include "many.pxi"
include "tree.pxi"
include "chunks.pxi"
