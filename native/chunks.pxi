# chunks: a file as read-only memoryview slices of one mmap, for uploads (no copy into
# bytes objects). The file must not shrink while mapped (touching a page past its new end
# raises SIGBUS), which holds for CAS blobs and for outputs of finished actions.


cdef class Mapping:
    """A read-only shared mapping of a whole regular file, exported as a buffer. Views keep
    it alive; it is unmapped when the last one goes."""
    cdef char *addr
    cdef readonly Py_ssize_t size

    @staticmethod
    cdef Mapping from_fd(int fd, name):
        cdef struct_stat st
        cdef Mapping m = Mapping.__new__(Mapping)
        cdef void *addr
        if fstat(fd, &st) != 0:
            raise _path_error(errno, name)
        if not S_ISREG(st.st_mode):
            raise _path_error(EISDIR if S_ISDIR(st.st_mode) else NOT_REGULAR, name)
        if st.st_size == 0:
            return m
        addr = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            raise _path_error(errno, name)
        madvise(addr, st.st_size, MADV_SEQUENTIAL)
        m.addr = <char *>addr
        m.size = st.st_size
        return m

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.addr, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.size)


cdef Mapping map_source(source):
    """Map source: an open fd (int, left open) or a path (opened as hash_file does)."""
    cdef int fd, err
    cdef struct_stat st
    cdef bytes p
    cdef const char *cp
    if isinstance(source, int):
        return Mapping.from_fd(source, f"<fd {source}>")
    p = encode_path(source)
    cp = p
    with nogil:
        err = open_regular(cp, &fd, &st)
    if err:
        raise _path_error(err, source)
    try:
        return Mapping.from_fd(fd, source)
    finally:
        close(fd)


cdef class ChunkReader:
    """Iterates memoryview slices of a mapped file; when hashing, digest() gives
    (hex digest, size) once every chunk was read. One consumer at a time."""
    cdef Mapping mapping
    cdef object view
    cdef Py_ssize_t pos, chunk_size
    cdef int fid            # -1: not hashing
    cdef ShaScratch sha
    cdef object b3
    cdef str hexdigest

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t start = self.pos, n
        cdef int ok = 1
        cdef char *data
        cdef EVP_MD_CTX *ctx
        if start >= self.mapping.size:
            if self.fid >= 0 and self.hexdigest is None:
                self.finish()
            raise StopIteration
        n = min(self.chunk_size, self.mapping.size - start)
        piece = self.view[start:start + n]
        if self.fid == SHA256:
            data = self.mapping.addr + start
            ctx = self.sha.ctx
            with nogil:
                ok = EVP_DigestUpdate(ctx, data, n)
            if not ok:
                raise OSError(_errno.EIO, "OpenSSL digest failed")
        elif self.fid == BLAKE3:
            self.b3.update(piece)
        self.pos = start + n
        return piece

    cdef finish(self):
        cdef unsigned char md[32]
        cdef unsigned int mdlen
        if self.fid == SHA256:
            if not EVP_DigestFinal_ex(self.sha.ctx, md, &mdlen):
                raise OSError(_errno.EIO, "OpenSSL digest failed")
            self.hexdigest = to_hex(md)
        else:
            self.hexdigest = self.b3.hexdigest()

    @property
    def size(self):
        return self.mapping.size

    def digest(self):
        if self.fid < 0:
            raise RuntimeError("these chunks are not being hashed: use hashed_chunks()")
        if self.hexdigest is None:
            if self.pos < self.mapping.size:
                raise RuntimeError(f"digest() before the last chunk was read "
                                   f"({self.pos} of {self.mapping.size} bytes)")
            self.finish()
        return self.hexdigest, self.mapping.size


cdef ChunkReader new_reader(source, Py_ssize_t chunk_size, Py_ssize_t offset, int fid):
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cdef Mapping m = map_source(source)
    if offset < 0 or offset > m.size:
        raise ValueError(f"offset {offset} is outside the file (size {m.size})")
    cdef ChunkReader r = ChunkReader.__new__(ChunkReader)
    r.mapping = m
    r.view = memoryview(m) if m.size else None
    r.pos = offset
    r.chunk_size = chunk_size
    r.fid = fid
    if fid == SHA256:
        r.sha = ShaScratch(False)
        if not EVP_DigestInit_ex2(r.sha.ctx, SHA256_MD, NULL):
            raise OSError(_errno.EIO, "OpenSSL digest failed")
    elif fid == BLAKE3:
        r.b3 = _blake3(max_threads=_AUTO if m.size >= BLAKE3_THREADS_MINSIZE else 1)
    return r


def chunks(source, Py_ssize_t chunk_size, Py_ssize_t offset=0):
    """Read-only memoryview slices of chunk_size bytes (the last may be shorter) covering
    source (a path or an open fd) from offset to its end."""
    return new_reader(source, chunk_size, offset, -1)


def hashed_chunks(function, source, Py_ssize_t chunk_size):
    """chunks() of the whole file that also digests them as they are handed out; call
    .digest() after the last one for (hex digest, size)."""
    return new_reader(source, chunk_size, 0, function_id(function))
