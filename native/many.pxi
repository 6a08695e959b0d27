# digest_many: the digests of many files in one call, for an action's outputs.

cdef enum:
    # BLAKE3 batches: files are read into an arena without the GIL, then hashed with it.
    ARENA_SIZE = 8 * 1024 * 1024
    # Larger files skip the arena and go through hash_file (mmap, all cores).
    ARENA_FILE_MAX = 1024 * 1024
    DEFERRED = -1100


def digest_many(function, paths):
    """[(hex digest, size)] of the regular files at paths, in order.

    Every path is attempted. If any failed, OSError (of the errno's subclass) is raised
    after the loop for the first failed path, with .failures = [(index, errno), ...] for all
    of them. SHA-256 runs entirely without the GIL; BLAKE3 reads files in batches without
    it and hashes each batch with it (the blake3 package has no C API to call).
    """
    cdef int fid = function_id(function)
    paths = list(paths)
    encoded = [encode_path(p) for p in paths]
    cdef Py_ssize_t n = len(encoded), i
    cdef const char **cpaths = <const char **>malloc(max(n, 1) * sizeof(char *))
    cdef Result *res = <Result *>malloc(max(n, 1) * sizeof(Result))
    try:
        if cpaths == NULL or res == NULL:
            raise MemoryError()
        for i in range(n):
            cpaths[i] = PyBytes_AS_STRING(encoded[i])
        if fid == SHA256:
            sha_many(cpaths, res, n)
            out = [to_hex(res[i].md) if res[i].err == 0 else None for i in range(n)]
        else:
            out = blake3_many(cpaths, res, n, paths)
        failures = [(i, _error_errno(res[i].err)) for i in range(n) if res[i].err]
        if failures:
            first = failures[0][0]
            error = _path_error(res[first].err, paths[first])
            error.failures = failures
            raise error
        return [(out[i], res[i].size) for i in range(n)]
    finally:
        free(cpaths)
        free(res)


cdef void sha_many(const char **cpaths, Result *res, Py_ssize_t n) except *:
    cdef ShaScratch s = ShaScratch()
    cdef Py_ssize_t i
    with nogil:
        for i in range(n):
            res[i].err = sha_path(s.ctx, cpaths[i], s.buf, READ_SIZE, &res[i])


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
