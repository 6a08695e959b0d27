# digest_many: the digests of many files in one call, for an action's outputs.

cdef enum:
    # BLAKE3 batches: files are read into an arena without the GIL, then hashed with it.
    ARENA_SIZE = 8 * 1024 * 1024
    # Larger files skip the arena and go through hash_file (mmap, all cores).
    ARENA_FILE_MAX = 1024 * 1024
    DEFERRED = -1100


cdef enum:
    # digest_many's directory cache only takes directory paths shorter than this.
    DIR_PATH_MAX = 4096


def digest_many(function, paths):
    """[(hex digest, size)] of the regular files at paths, in order.

    Every path is attempted. If any failed, OSError (of the errno's subclass) is raised
    after the loop for the first failed path, with .failures = [(index, errno), ...] for all
    of them. SHA-256 runs entirely without the GIL; BLAKE3 reads files in batches without
    it and hashes each batch with it (the blake3 package has no C API to call).
    """
    cdef int fid = function_id(function)
    paths = list(paths)
    cdef Py_ssize_t n = len(paths), i
    cdef const char *cp
    cdef const char **cpaths = <const char **>malloc(max(n, 1) * sizeof(char *))
    cdef Result *res = <Result *>malloc(max(n, 1) * sizeof(Result))
    encoded = []    # keeps alive the bytes of paths that are not plain ASCII str
    try:
        if cpaths == NULL or res == NULL:
            raise MemoryError()
        for i in range(n):
            p = paths[i]
            # The common case costs no new object: an ASCII str's own NUL-terminated text
            # is what os.fsencode would have produced.
            if type(p) is str and PyUnicode_IS_COMPACT_ASCII(p):
                cp = <const char *>PyUnicode_DATA(p)
                if <Py_ssize_t>strlen(cp) != PyUnicode_GET_LENGTH(p):
                    raise ValueError(f"embedded null byte in path {p!r}")
                cpaths[i] = cp
            else:
                b = encode_path(p)
                encoded.append(b)
                cpaths[i] = PyBytes_AS_STRING(b)
        if fid == SHA256:
            sha_many(cpaths, res, n)
            out = None
        else:
            out = blake3_many(cpaths, res, n, paths)
        failures = [(i, _error_errno(res[i].err)) for i in range(n) if res[i].err]
        if failures:
            first = failures[0][0]
            error = _path_error(res[first].err, paths[first])
            error.failures = failures
            raise error
        if out is None:
            return [digest_pair(to_hex(res[i].md), res[i].size) for i in range(n)]
        return [digest_pair(out[i], res[i].size) for i in range(n)]
    finally:
        free(cpaths)
        free(res)


cdef inline tuple digest_pair(str hexdigest, int64_t size):
    """(hexdigest, size), left out of the cyclic GC: 100k results would otherwise trigger
    over a hundred young collections, each walking them, and push them into the old
    generation, whose growth triggers full collections."""
    cdef tuple t = (hexdigest, size)
    PyObject_GC_UnTrack(<void *>t)
    return t


cdef struct DirCache:
    int fd                  # an O_PATH fd of the directory path[:len], or -1
    const char *path
    Py_ssize_t len
    const char *seen        # the directory of the file before, which was opened by full path
    Py_ssize_t seen_len
    int noatime             # O_NOATIME, or 0 once a file has refused it
    char buf[DIR_PATH_MAX]


cdef int open_cached(DirCache *c, const char *path, int flags) noexcept nogil:
    """open(path, flags), resolving the directory part once for a run of files in the same
    directory (an action's outputs come grouped so): openat on the directory's fd walks one
    component instead of the whole path. A directory fd is only opened for the second file
    in a row there, so paths in no particular order cost no extra syscalls."""
    cdef const char *slash = strrchr(path, 47)  # '/'
    cdef Py_ssize_t dlen
    cdef int dfd
    if slash == NULL or slash == path or slash[1] == 0:
        return open(path, flags)
    dlen = slash - path
    if c.fd >= 0 and dlen == c.len and memcmp(path, c.path, dlen) == 0:
        return openat(c.fd, slash + 1, flags)
    if (c.seen != NULL and dlen == c.seen_len and dlen < DIR_PATH_MAX
            and memcmp(path, c.seen, dlen) == 0):
        memcpy(c.buf, path, dlen)
        c.buf[dlen] = 0
        # Resolved as open(path) would resolve it: symlinks before the last component are
        # followed. On failure the full path is opened, so the error is path's own.
        dfd = open(c.buf, O_PATH | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0:
            if c.fd >= 0:
                close(c.fd)
            c.fd = dfd
            c.path = path
            c.len = dlen
            c.seen = NULL
            return openat(dfd, slash + 1, flags)
    c.seen = path
    c.seen_len = dlen
    return open(path, flags)


cdef int sha_file(DirCache *c, EVP_MD_CTX *ctx, const char *path, char *buf, size_t bufsize,
                  Result *r) noexcept nogil:
    """sha_path for digest_many: the directory cache, O_NOATIME, and one read() for a file
    smaller than the buffer."""
    cdef int fd, err
    cdef struct_stat st
    cdef Py_ssize_t n
    cdef unsigned int mdlen
    cdef int flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
    fd = open_cached(c, path, flags | c.noatime)
    if fd < 0 and errno == EPERM and c.noatime:
        c.noatime = 0
        fd = open_cached(c, path, flags)
    if fd < 0:
        return errno
    # fstat stays: only it tells a regular file from a FIFO or device that must be refused.
    if fstat(fd, &st) != 0:
        err = errno
        close(fd)
        return err
    if not S_ISREG(st.st_mode):
        close(fd)
        return EISDIR if S_ISDIR(st.st_mode) else NOT_REGULAR
    if st.st_size >= <int64_t>bufsize:
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        err = sha_fd(ctx, fd, buf, bufsize, r)
    else:
        n = read_some(fd, buf, bufsize)
        if n < 0:
            err = <int>-n
        elif n == st.st_size:
            # A short read of exactly the size fstat saw is the whole file: the read to
            # EOF that would return 0 is skipped. (A file that grew in between returns
            # more than st_size here and is read on to EOF below.)
            r.size = n
            err = 0
            if not (EVP_DigestInit_ex2(ctx, SHA256_MD, NULL)
                    and EVP_DigestUpdate(ctx, buf, n)
                    and EVP_DigestFinal_ex(ctx, r.md, &mdlen)):
                err = DIGEST_FAILED
        else:
            err = sha_fd_after(ctx, fd, buf, bufsize, n, r)
    close(fd)
    return err


cdef void sha_many(const char **cpaths, Result *res, Py_ssize_t n) except *:
    cdef ShaScratch s = ShaScratch()
    cdef DirCache c
    cdef Py_ssize_t i
    c.fd = -1
    c.path = NULL
    c.len = 0
    c.seen = NULL
    c.seen_len = 0
    c.noatime = O_NOATIME
    with nogil:
        for i in range(n):
            res[i].err = sha_file(&c, s.ctx, cpaths[i], s.buf, READ_SIZE, &res[i])
        if c.fd >= 0:
            close(c.fd)


cdef int read_into_arena(const char *path, char *arena, Result *r) noexcept nogil:
    """Read a small file whole into arena; DEFERRED if it is (or grew) too large."""
    cdef int fd, err
    cdef struct_stat st
    cdef Py_ssize_t got = 0
    cdef int64_t room, total = 0
    err = open_regular(path, &fd, &st)
    if err:
        return err
    if st.st_size > ARENA_FILE_MAX:
        close(fd)
        return DEFERRED
    # One byte more than the size fstat saw: a read that fills it means the file grew.
    room = st.st_size + 1
    while total < room:
        got = read_some(fd, arena + total, room - total)
        if got <= 0:
            break
        total += got
    close(fd)
    if got < 0:
        return <int>-got
    if total == room:
        return DEFERRED
    r.size = total
    return 0


cdef list blake3_many(const char **cpaths, Result *res, Py_ssize_t n, names):
    # Uninitialized: only the pages a batch fills are ever touched.
    cdef bytearray arena = PyByteArray_FromStringAndSize(NULL, ARENA_SIZE)
    cdef char *base = PyByteArray_AS_STRING(arena)
    cdef Py_ssize_t i = 0, start, k
    cdef int64_t used
    view = memoryview(arena)
    out = [None] * n
    while i < n:
        start = i
        used = 0
        with nogil:
            # Each file takes at most ARENA_FILE_MAX + 1 bytes, so stop while that fits.
            while i < n and ARENA_SIZE - used > ARENA_FILE_MAX:
                res[i].err = read_into_arena(cpaths[i], base + used, &res[i])
                if res[i].err == 0:
                    res[i].offset = used
                    used += res[i].size
                i += 1
        for k in range(start, i):
            if res[k].err == 0:
                out[k] = _blake3(view[res[k].offset:res[k].offset + res[k].size]).hexdigest()
            elif res[k].err == DEFERRED:
                try:
                    out[k], res[k].size = blake3_path(cpaths[k], names[k])
                    res[k].err = 0
                except OSError as e:
                    res[k].err = e.errno or _errno.EIO
    return out
