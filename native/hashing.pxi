# Digests of buffers, files and fds. SHA-256 runs in C through OpenSSL (SHA-NI here);
# BLAKE3 goes to the blake3 package (Rust, SIMD, threads), which releases the GIL itself.

cdef enum:
    SHA256 = 0
    BLAKE3 = 1
    # Below this many bytes, releasing the GIL costs more than it frees (hashlib's
    # HASHLIB_GIL_MINSIZE is the same figure).
    GIL_MINSIZE = 2048
    # Read size for files: large enough that syscalls are noise, small enough to stay in
    # L2 (2 MiB per core here) between read() and the digest.
    READ_SIZE = 256 * 1024
    # BLAKE3 inputs from this size are hashed with all cores (blake3.AUTO) ...
    BLAKE3_THREADS_MINSIZE = 1024 * 1024
    # ... and files from this size are hashed from an mmap rather than through read().
    BLAKE3_MMAP_MINSIZE = 4 * 1024 * 1024

# Internal result codes, beside positive errno values; far from any negated errno.
cdef enum:
    NOT_REGULAR = -1001
    DIGEST_FAILED = -1002
    BAD_COMPONENT = -1003

cdef struct Result:
    int64_t size
    int64_t offset      # digest_many's BLAKE3 batches: where the content sits in the arena
    int err
    unsigned char md[32]

cdef const EVP_MD *SHA256_MD = EVP_MD_fetch(NULL, b"SHA256", NULL)
if SHA256_MD == NULL:
    raise ImportError("OpenSSL's libcrypto provides no SHA256")

_blake3 = _blake3_module.blake3
_AUTO = _blake3_module.blake3.AUTO
cdef const char *HEXDIGITS = b"0123456789abcdef"


cdef int function_id(function) except -1:
    if function == "sha256":
        return SHA256
    if function == "blake3":
        return BLAKE3
    raise ValueError(f"unsupported digest function {function!r}")


cdef str to_hex(const unsigned char *md):
    # Written straight into a new ASCII str: no intermediate bytes and no decoding.
    cdef str s = PyUnicode_New(64, 127)
    cdef unsigned char *out = PyUnicode_1BYTE_DATA(s)
    cdef int i
    for i in range(32):
        out[2 * i] = HEXDIGITS[md[i] >> 4]
        out[2 * i + 1] = HEXDIGITS[md[i] & 15]
    return s


cdef bytes encode_path(path):
    cdef bytes p = os.fsencode(path)
    if b"\0" in p:
        raise ValueError(f"embedded null byte in path {path!r}")
    return p


def _error_errno(int err):
    """The errno value an internal result code is reported as."""
    if err == NOT_REGULAR or err == BAD_COMPONENT:
        return _errno.EINVAL
    if err == DIGEST_FAILED:
        return _errno.EIO
    return err


def _path_error(int err, path):
    """The OSError for a result code on path (the same text as engine/native.py's)."""
    if err == NOT_REGULAR:
        return OSError(_errno.EINVAL, "not a regular file", path)
    if err == BAD_COMPONENT:
        return OSError(_errno.EINVAL, "'.', '..' and empty names are not allowed", path)
    if err == DIGEST_FAILED:
        return OSError(_errno.EIO, "OpenSSL digest failed", path)
    if err == _errno.ELOOP and os.path.islink(path):
        return OSError(err, "is a symbolic link, which is not followed", path)
    return OSError(err, os.strerror(err), path)


cdef int open_regular(const char *path, int *fd, struct_stat *st) noexcept nogil:
    """Open a regular file for reading, never through a symlink as the last component and
    never blocking on a FIFO or device. 0, an errno value, or NOT_REGULAR."""
    cdef int err
    fd[0] = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
    if fd[0] < 0:
        return errno
    if fstat(fd[0], st) != 0:
        err = errno
        close(fd[0])
        return err
    if not S_ISREG(st.st_mode):
        close(fd[0])
        return EISDIR if S_ISDIR(st.st_mode) else NOT_REGULAR
    return 0


cdef Py_ssize_t read_some(int fd, char *buf, size_t n) noexcept nogil:
    """read() retried on EINTR: bytes read, 0 at EOF, or -errno."""
    cdef Py_ssize_t got
    while True:
        got = read(fd, buf, n)
        if got >= 0:
            return got
        if errno != EINTR:
            return -errno


cdef int sha_fd(EVP_MD_CTX *ctx, int fd, char *buf, size_t bufsize, Result *r) noexcept nogil:
    """SHA-256 of fd from its offset to EOF into r (md, size). 0 or an error code."""
    return sha_fd_after(ctx, fd, buf, bufsize, 0, r)


cdef int sha_fd_after(EVP_MD_CTX *ctx, int fd, char *buf, size_t bufsize, Py_ssize_t have,
                      Result *r) noexcept nogil:
    """sha_fd, for a caller that has already read the first `have` bytes into buf."""
    cdef Py_ssize_t n
    cdef unsigned int mdlen
    r.size = have
    if not EVP_DigestInit_ex2(ctx, SHA256_MD, NULL):
        return DIGEST_FAILED
    if have and not EVP_DigestUpdate(ctx, buf, have):
        return DIGEST_FAILED
    while True:
        n = read_some(fd, buf, bufsize)
        if n == 0:
            break
        if n < 0:
            return <int>-n
        if not EVP_DigestUpdate(ctx, buf, n):
            return DIGEST_FAILED
        r.size += n
    if not EVP_DigestFinal_ex(ctx, r.md, &mdlen):
        return DIGEST_FAILED
    return 0


cdef int sha_path(EVP_MD_CTX *ctx, const char *path, char *buf, size_t bufsize,
                  Result *r) noexcept nogil:
    cdef int fd, err
    cdef struct_stat st
    err = open_regular(path, &fd, &st)
    if err:
        return err
    if st.st_size > <int64_t>bufsize:
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
    err = sha_fd(ctx, fd, buf, bufsize, r)
    close(fd)
    return err


cdef class ShaScratch:
    """An OpenSSL context and a read buffer, owned by one call."""
    cdef EVP_MD_CTX *ctx
    cdef char *buf

    def __cinit__(self, bint with_buffer=True):
        self.ctx = EVP_MD_CTX_new()
        self.buf = <char *>malloc(READ_SIZE) if with_buffer else NULL
        if self.ctx == NULL or (with_buffer and self.buf == NULL):
            raise MemoryError()

    def __dealloc__(self):
        EVP_MD_CTX_free(self.ctx)
        free(self.buf)


cdef tuple blake3_fd(int fd, int64_t size_hint):
    """BLAKE3 of fd from its offset to EOF, read in C without the GIL."""
    cdef bytearray buf = PyByteArray_FromStringAndSize(NULL, READ_SIZE)
    cdef char *p = PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t n
    cdef int64_t total = 0
    view = memoryview(buf)
    h = _blake3(max_threads=_AUTO if size_hint >= BLAKE3_THREADS_MINSIZE else 1)
    while True:
        with nogil:
            n = read_some(fd, p, READ_SIZE)
        if n == 0:
            break
        if n < 0:
            raise OSError(<int>-n, os.strerror(<int>-n))
        h.update(view[:n])
        total += n
    return h.hexdigest(), total


cdef tuple blake3_path(const char *cpath, path):
    cdef int fd, err
    cdef struct_stat st
    with nogil:
        err = open_regular(cpath, &fd, &st)
    if err:
        raise _path_error(err, path)
    try:
        if st.st_size < BLAKE3_MMAP_MINSIZE:
            try:
                return blake3_fd(fd, st.st_size)
            except OSError as e:
                raise OSError(e.errno, e.strerror, path) from None
        m = Mapping.from_fd(fd, path)
        h = _blake3(max_threads=_AUTO)
        h.update(m)
        return h.hexdigest(), m.size
    finally:
        close(fd)


def hash_buffer(function, data):
    """(hex digest, size in bytes) of any C-contiguous buffer."""
    cdef int fid = function_id(function)
    cdef Py_buffer view
    cdef Result r
    cdef unsigned int mdlen
    cdef int ok
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if fid == BLAKE3:
            h = _blake3(max_threads=_AUTO if view.len >= BLAKE3_THREADS_MINSIZE else 1)
            # As unsigned bytes: blake3 refuses other formats (an array('i'), say).
            octets = PyMemoryView_FromMemory(<char *>view.buf, view.len, PyBUF_READ)
            h.update(octets)
            octets.release()
            return h.hexdigest(), view.len
        scratch = ShaScratch(False)
        ctx = (<ShaScratch>scratch).ctx
        # The exported buffer cannot be resized while held; a writer racing us in another
        # thread could only make the digest meaningless, never touch freed memory.
        if view.len >= GIL_MINSIZE:
            with nogil:
                ok = (EVP_DigestInit_ex2(ctx, SHA256_MD, NULL)
                      and EVP_DigestUpdate(ctx, view.buf, view.len)
                      and EVP_DigestFinal_ex(ctx, r.md, &mdlen))
        else:
            ok = (EVP_DigestInit_ex2(ctx, SHA256_MD, NULL)
                  and EVP_DigestUpdate(ctx, view.buf, view.len)
                  and EVP_DigestFinal_ex(ctx, r.md, &mdlen))
        if not ok:
            raise OSError(_errno.EIO, "OpenSSL digest failed")
        return to_hex(r.md), view.len
    finally:
        PyBuffer_Release(&view)


def hash_file(function, path):
    """(hex digest, size) of the regular file at path; a symlink there is not followed."""
    cdef int fid = function_id(function)
    cdef bytes p = encode_path(path)
    cdef const char *cp = p
    cdef Result r
    cdef int err
    if fid == BLAKE3:
        return blake3_path(cp, path)
    cdef ShaScratch s = ShaScratch()
    with nogil:
        err = sha_path(s.ctx, cp, s.buf, READ_SIZE, &r)
    if err:
        raise _path_error(err, path)
    return to_hex(r.md), r.size


def hash_fd(function, int fd):
    """(hex digest, bytes read) of what fd yields from its current offset to EOF."""
    cdef int fid = function_id(function)
    cdef Result r
    cdef int err
    cdef struct_stat st
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    if fid == BLAKE3:
        if fstat(fd, &st) != 0:
            raise OSError(errno, os.strerror(errno))
        return blake3_fd(fd, st.st_size if S_ISREG(st.st_mode) else 0)
    cdef ShaScratch s = ShaScratch()
    with nogil:
        err = sha_fd(s.ctx, fd, s.buf, READ_SIZE, &r)
    if err:
        raise OSError(_error_errno(err), os.strerror(_error_errno(err)))
    return to_hex(r.md), r.size
