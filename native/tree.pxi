# link_tree: stage a whole input tree (directories, hardlinks from the CAS, empty files) in
# one call without the GIL.
#
# Nothing in the destination is ever followed: every parent directory is reached one
# component at a time with O_NOFOLLOW from the root's fd, and every final name is created
# with mkdirat, linkat or O_CREAT|O_EXCL, which fail on any existing entry, a dangling
# symlink included.

cdef enum:
    PATH_BUF = 4096

cdef enum:
    STAGE_DIR = 0
    STAGE_LINK = 1
    STAGE_EMPTY = 2


cdef struct Parent:
    int root
    int fd              # the cached parent directory (an O_PATH fd, or root itself)
    const char *path    # its relative path (not NUL-terminated at len), NULL if root
    Py_ssize_t len
    char buf[PATH_BUF]


cdef inline bint bad_name(const char *name) noexcept nogil:
    return (name[0] == 0 or (name[0] == 46 and name[1] == 0)
            or (name[0] == 46 and name[1] == 46 and name[2] == 0))


cdef int walk_to(Parent *p, const char *rel, Py_ssize_t plen) noexcept nogil:
    """Open rel[:plen] below root one component at a time: an fd, -errno or BAD_COMPONENT."""
    cdef int fd = p.root, nfd, err
    cdef char *comp
    cdef char *slash
    # Deeper than PATH_MAX is fine: each openat resolves one component.
    cdef char *buf = <char *>p.buf
    if plen >= PATH_BUF:
        buf = <char *>malloc(plen + 1)
    if buf == NULL:
        return -ENOMEM
    memcpy(buf, rel, plen)
    buf[plen] = 0
    comp = buf
    while True:
        slash = strchr(comp, 47)  # '/'
        if slash != NULL:
            slash[0] = 0
        if bad_name(comp):
            nfd = -1
            err = BAD_COMPONENT
        else:
            nfd = openat(fd, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            err = -errno
        if fd != p.root:
            close(fd)
        if nfd < 0 or slash == NULL:
            if buf != <char *>p.buf:
                free(buf)
            return err if nfd < 0 else nfd
        fd = nfd
        comp = slash + 1


cdef int parent_of(Parent *p, const char *rel, const char **name) noexcept nogil:
    """The directory fd that rel's last component goes in (cached: entries arrive grouped
    by directory), with *name set to that component; or -errno or BAD_COMPONENT."""
    cdef const char *slash = strrchr(rel, 47)
    cdef Py_ssize_t plen
    cdef int fd
    if slash == NULL:
        name[0] = rel
        return p.root
    name[0] = slash + 1
    plen = slash - rel
    if p.path != NULL and p.len == plen and memcmp(p.path, rel, plen) == 0:
        return p.fd
    if p.fd != p.root:
        close(p.fd)
    p.fd = p.root
    p.path = NULL
    fd = walk_to(p, rel, plen)
    if fd >= 0:
        p.fd = fd
        p.path = rel
        p.len = plen
    return fd


cdef const char **c_strings(list items, Py_ssize_t n) except NULL:
    cdef const char **out = <const char **>malloc(max(n, 1) * sizeof(char *))
    cdef Py_ssize_t i
    if out == NULL:
        raise MemoryError()
    for i in range(n):
        out[i] = PyBytes_AS_STRING(items[i])
    return out


def link_tree(dest_root, dirs, links, empties=(), int dir_mode=0o777):
    """Create a tree under the existing directory dest_root in one call.

    dirs: relative paths, parents before children, made with dir_mode (minus the umask).
    links: (relative dest, source path) pairs, each hardlinked from source (a CAS file).
    empties: (relative dest, mode) pairs, each a new empty file with exactly mode.
    Returns [(index into links, errno)] for links whose source hit EMLINK (the inode is at
    the link limit) or ENOENT (evicted), which the caller renews and retries. Any other
    failure stops the call with OSError naming the destination; the tree is then partial.
    """
    cdef bytes root = encode_path(dest_root)
    dirs = [encode_path(d) for d in dirs]
    links = list(links)
    link_dests = [encode_path(d) for d, _ in links]
    link_srcs = [encode_path(s) for _, s in links]
    empties = list(empties)
    empty_dests = [encode_path(d) for d, _ in empties]
    cdef Py_ssize_t ndirs = len(dirs), nlinks = len(links), nempties = len(empties)
    cdef Py_ssize_t i, nfail = 0, failed_at = -1
    cdef int failed_kind = -1, failed_err = 0, fd, err
    cdef mode_t dmode = dir_mode & 0o7777
    cdef const char *name
    cdef const char *croot = root
    cdef Parent p
    cdef const char **cdirs = NULL
    cdef const char **cdests = NULL
    cdef const char **csrcs = NULL
    cdef const char **cempties = NULL
    cdef mode_t *emodes = NULL
    cdef int64_t *fails = NULL
    try:
        cdirs = c_strings(dirs, ndirs)
        cdests = c_strings(link_dests, nlinks)
        csrcs = c_strings(link_srcs, nlinks)
        cempties = c_strings(empty_dests, nempties)
        emodes = <mode_t *>malloc(max(nempties, 1) * sizeof(mode_t))
        fails = <int64_t *>malloc(max(nlinks, 1) * 2 * sizeof(int64_t))
        if emodes == NULL or fails == NULL:
            raise MemoryError()
        for i in range(nempties):
            emodes[i] = <mode_t>(<int>empties[i][1]) & 0o7777
        with nogil:
            p.root = open(croot, O_PATH | O_DIRECTORY | O_CLOEXEC)
            p.fd = p.root
            p.path = NULL
            if p.root < 0:
                failed_err = errno
            for i in range(ndirs if p.root >= 0 else 0):
                fd = parent_of(&p, cdirs[i], &name)
                if fd < 0:
                    failed_err = fd
                elif bad_name(name):
                    failed_err = BAD_COMPONENT
                elif mkdirat(fd, name, dmode) != 0:
                    failed_err = errno
                if failed_err:
                    failed_kind = STAGE_DIR
                    failed_at = i
                    break
            for i in range(nlinks if failed_err == 0 and p.root >= 0 else 0):
                fd = parent_of(&p, cdests[i], &name)
                if fd < 0:
                    failed_err = fd
                elif bad_name(name):
                    failed_err = BAD_COMPONENT
                elif linkat(AT_FDCWD, csrcs[i], fd, name, 0) != 0:
                    err = errno
                    if err == EMLINK or err == ENOENT:
                        fails[2 * nfail] = i
                        fails[2 * nfail + 1] = err
                        nfail += 1
                    else:
                        failed_err = err
                if failed_err:
                    failed_kind = STAGE_LINK
                    failed_at = i
                    break
            for i in range(nempties if failed_err == 0 and p.root >= 0 else 0):
                fd = parent_of(&p, cempties[i], &name)
                if fd < 0:
                    failed_err = fd
                elif bad_name(name):
                    failed_err = BAD_COMPONENT
                else:
                    fd = openat(fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                                emodes[i])
                    # fchmod: the umask must not strip bits the tree asks for.
                    if fd < 0 or fchmod(fd, emodes[i]) != 0:
                        failed_err = errno
                    if fd >= 0:
                        close(fd)
                if failed_err:
                    failed_kind = STAGE_EMPTY
                    failed_at = i
                    break
            if p.fd != p.root:
                close(p.fd)
            if p.root >= 0:
                close(p.root)
        if failed_err:
            if -1000 < failed_err < 0:
                failed_err = -failed_err   # a negated errno from parent_of
            if failed_kind == STAGE_DIR:
                rel = dirs[failed_at]
            elif failed_kind == STAGE_LINK:
                rel = link_dests[failed_at]
            elif failed_kind == STAGE_EMPTY:
                rel = empty_dests[failed_at]
            else:
                raise _path_error(failed_err, dest_root)
            error = _path_error(failed_err, os.path.join(os.fsdecode(root), os.fsdecode(rel)))
            if failed_kind == STAGE_LINK:
                error.filename2 = links[failed_at][1]
            raise error
        return [(<Py_ssize_t>fails[2 * i], <int>fails[2 * i + 1]) for i in range(nfail)]
    finally:
        free(cdirs)
        free(cdests)
        free(csrcs)
        free(cempties)
        free(emodes)
        free(fails)
