/* stoker-spawn: the last privileged step before an action's command.
 *
 * Started by a worker (root, with an EMPTY environment, so the loader of this root process
 * honours nothing of the action's), it sets up what the worker asked for on the command
 * line, drops to the action's uid and gid with no capabilities, and only then execs the
 * command with the Command's environment, which it reads as data from a file descriptor.
 * The command is looked up through the Command's PATH as the action's uid, never as root.
 *
 * Policy stays in Python (engine/runners/spawn.py builds the command line); this file only
 * carries it out, in the order the kernel needs:
 *   join cgroups -> oom_score_adj -> rlimits -> the slot's network namespace -> unshare ->
 *   [fork: pid 1 of a new pid
 *   namespace; the parent waits and passes its status on] -> mounts (private /, /proc of the
 *   namespace, private tmpfs with the action's directories bound back) -> loopback up ->
 *   setgroups/setresgid/setresuid -> no_new_privs -> fresh keyrings -> seccomp (no user
 *   namespaces) -> chdir -> exec.
 *
 * Reports on --status-fd (close-on-exec, so an exec that worked leaves it empty):
 *   "S<errno> <text>"  setup failed: Stoker's fault (exit 125)
 *   "E<errno> <text>"  the command could not be executed: the action's (exit 126 or 127)
 * Like the kernel (and unlike execvp), a file without #! or a known format is not run with
 * the shell: ENOEXEC, exit 126.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/keyctl.h>
#include <net/if.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/close_range.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SETUP_EXIT 125
#define MAX_LIST 8

static int status_fd = -1;

static void report(char kind, int err, const char *fmt, ...) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "%c%d ", kind, err);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (status_fd >= 0) {
        ssize_t unused = write(status_fd, buf, strlen(buf));
        (void)unused;
    }
}

static void setup_failed(const char *what, const char *arg) {
    int err = errno;
    report('S', err, "%s%s%s: %s", what, arg ? " " : "", arg ? arg : "", strerror(err));
    _exit(SETUP_EXIT);
}

static void usage(const char *msg) {
    errno = EINVAL;
    setup_failed("usage:", msg);
}

static long number(const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s) usage(s);
    return v;
}

struct options {
    long uid, gid;
    const char *cwd;
    const char *netns_file;
    const char *resolv_conf;
    int env_fd;
    int pidns, ipcns, netns, mountns, deny_userns, clear_keyrings;
    long nproc, oom_score_adj;
    const char *cgroups[MAX_LIST]; int ncgroups;
    const char *tmpfs[MAX_LIST]; int ntmpfs;
    const char *tmp_size;
    int classic_mounts;
    int report_start;
    int reap_all, check_ipc;
    const char *check_empty[MAX_LIST]; int ncheck_empty;
    const char *env_file, *status_file, *stdout_file, *stderr_file;
    const char *keep[MAX_LIST]; int nkeep;
    const char *hide[MAX_LIST]; int nhide;
    int keep_fds[MAX_LIST]; int nkeep_fds;
    char **argv;
};

static void parse(int argc, char **argv, struct options *o) {
    memset(o, 0, sizeof *o);
    o->uid = o->gid = -1;
    o->env_fd = -1;
    o->nproc = -1;
    o->oom_score_adj = -10000;
    o->tmp_size = "64m";
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--")) { i++; break; }
        if (!strcmp(a, "--pidns")) { o->pidns = 1; continue; }
        if (!strcmp(a, "--ipcns")) { o->ipcns = 1; continue; }
        if (!strcmp(a, "--netns")) { o->netns = 1; continue; }
        if (!strcmp(a, "--mountns")) { o->mountns = 1; continue; }
        if (!strcmp(a, "--deny-userns")) { o->deny_userns = 1; continue; }
        if (!strcmp(a, "--clear-keyrings")) { o->clear_keyrings = 1; continue; }
        if (!strcmp(a, "--classic-mounts")) { o->classic_mounts = 1; continue; }
        if (!strcmp(a, "--report-start")) { o->report_start = 1; continue; }
        if (!strcmp(a, "--reap-all")) { o->reap_all = 1; continue; }
        if (!strcmp(a, "--check-ipc")) { o->check_ipc = 1; continue; }
        if (!v) usage(a);
        i++;
        if (!strcmp(a, "--status-fd")) status_fd = (int)number(v);
        else if (!strcmp(a, "--uid")) o->uid = number(v);
        else if (!strcmp(a, "--gid")) o->gid = number(v);
        else if (!strcmp(a, "--cwd")) o->cwd = v;
        else if (!strcmp(a, "--netns-file")) o->netns_file = v;
        else if (!strcmp(a, "--resolv-conf")) o->resolv_conf = v;
        /* Inside a container that takes no fds (Docker's API): files instead. */
        else if (!strcmp(a, "--env-file")) o->env_file = v;
        else if (!strcmp(a, "--status-file")) o->status_file = v;
        else if (!strcmp(a, "--stdout")) o->stdout_file = v;
        else if (!strcmp(a, "--stderr")) o->stderr_file = v;
        else if (!strcmp(a, "--env-fd")) o->env_fd = (int)number(v);
        else if (!strcmp(a, "--nproc")) o->nproc = number(v);
        else if (!strcmp(a, "--oom-score-adj")) o->oom_score_adj = number(v);
        else if (!strcmp(a, "--cgroup") && o->ncgroups < MAX_LIST) o->cgroups[o->ncgroups++] = v;
        else if (!strcmp(a, "--keep") && o->nkeep < MAX_LIST) o->keep[o->nkeep++] = v;
        else if (!strcmp(a, "--hide") && o->nhide < MAX_LIST) o->hide[o->nhide++] = v;
        else if (!strcmp(a, "--pass-fd") && o->nkeep_fds < MAX_LIST)
            o->keep_fds[o->nkeep_fds++] = (int)number(v);
        else if (!strcmp(a, "--tmpfs") && o->ntmpfs < MAX_LIST) o->tmpfs[o->ntmpfs++] = v;
        else if (!strcmp(a, "--tmp-size")) o->tmp_size = v;
        else if (!strcmp(a, "--check-empty") && o->ncheck_empty < MAX_LIST)
            o->check_empty[o->ncheck_empty++] = v;
        else usage(a);
    }
    if (i >= argc) usage("no command after --");
    o->argv = argv + i;
}

static void redirect(int target, const char *path) {
    int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
    if (fd < 0) setup_failed("open", path);
    if (dup2(fd, target) < 0) setup_failed("dup2", path);
    close(fd);
}

/* The Command's environment: NUL-terminated NAME=VALUE entries, read to EOF. */
static char **read_env(int fd) {
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf) setup_failed("malloc", NULL);
    for (;;) {
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf) setup_failed("realloc", NULL);
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0) {
            if (errno == EINTR) continue;
            setup_failed("read the environment", NULL);
        }
        if (n == 0) break;
        len += (size_t)n;
    }
    close(fd);
    size_t count = 0;
    for (size_t k = 0; k < len; k++) count += buf[k] == '\0';
    char **env = calloc(count + 1, sizeof *env);
    if (!env) setup_failed("calloc", NULL);
    size_t j = 0;
    for (size_t k = 0; k < len && j < count; j++) {
        env[j] = buf + k;
        k += strlen(buf + k) + 1;
    }
    return env;
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) setup_failed("open", path);
    if (write(fd, text, strlen(text)) < 0) setup_failed("write", path);
    close(fd);
}

/* mkdir -p of rel below an open directory (components 0711: passable, not listable). */
static void make_path(const char *path) {
    char buf[4096];
    if (strlen(path) >= sizeof buf) { errno = ENAMETOOLONG; setup_failed("mkdir", path); }
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0711) < 0 && errno != EEXIST) setup_failed("mkdir", buf);
        *p = '/';
    }
    if (mkdir(buf, 0711) < 0 && errno != EEXIST) setup_failed("mkdir", buf);
}

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
static void unescape(char *s) {
    char *w = s;
    for (char *r = s; *r; r++) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' &&
            r[3] >= '0' && r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 3;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

/* Every mount the action inherits becomes read-only in its namespace: no world-writable place
 * of the host's (/run/lock, /dev/mqueue, ...) is a rendezvous between actions or a place to
 * leave something for the next one. Device nodes stay usable (/dev/null): a read-only mount
 * refuses writes to files, not to devices. */
static void remount_all_readonly(void) {
    /* One call for the whole tree where the kernel has it (5.12+); else mount by mount. */
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY};
    if (syscall(SYS_mount_setattr, -1, "/", AT_RECURSIVE, &attr, sizeof attr) == 0) return;
    if (errno != ENOSYS && errno != EINVAL && errno != EPERM)
        setup_failed("make read-only", "/");
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) setup_failed("open", "/proc/self/mountinfo");
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        char *save = NULL, *mp = NULL, *opts = NULL;
        int i = 0;
        for (char *tok = strtok_r(line, " ", &save); tok && i < 6;
             tok = strtok_r(NULL, " ", &save), i++) {
            if (i == 4) mp = tok;
            if (i == 5) opts = tok;
        }
        if (!mp || !opts) continue;
        unescape(mp);
        /* /proc is replaced below; its own submounts go with it. */
        if (!strcmp(mp, "/proc") || !strncmp(mp, "/proc/", 6)) continue;
        unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY;
        char *osave = NULL;
        for (char *opt = strtok_r(opts, ",", &osave); opt; opt = strtok_r(NULL, ",", &osave)) {
            if (!strcmp(opt, "nosuid")) flags |= MS_NOSUID;
            else if (!strcmp(opt, "nodev")) flags |= MS_NODEV;
            else if (!strcmp(opt, "noexec")) flags |= MS_NOEXEC;
            else if (!strcmp(opt, "noatime")) flags |= MS_NOATIME;
            else if (!strcmp(opt, "nodiratime")) flags |= MS_NODIRATIME;
            else if (!strcmp(opt, "relatime")) flags |= MS_RELATIME;
            else if (!strcmp(opt, "strictatime")) flags |= MS_STRICTATIME;
        }
        /* A mount hidden under another one (or gone) cannot be reached, nor remounted. */
        if (mount(NULL, mp, NULL, flags, NULL) < 0 && errno != ENOENT && errno != EINVAL &&
            errno != EACCES)
            setup_failed("make read-only", mp);
    }
    free(line);
    fclose(f);
}

/* The private tmpfs and the hiding places, one superblock for all (a tmpfs costs far more to
 * make than a bind of one): /tmp, /var/tmp and /dev/shm share its size, each its own
 * directory (1777), and each hidden directory gets an empty one (0711, root's). Made detached
 * (fsopen/fsmount) so no path of the host holds it while its directories are cut out. */
static int private_tmpfs(const struct options *o) {
    int fs = fsopen("tmpfs", FSOPEN_CLOEXEC);
    if (fs < 0) return -1;  /* before Linux 5.2: the caller mounts the classic way */
    if (fsconfig(fs, FSCONFIG_SET_STRING, "size", o->tmp_size, 0) < 0 ||
        fsconfig(fs, FSCONFIG_SET_STRING, "mode", "0711", 0) < 0 ||
        fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        setup_failed("make a tmpfs of size", o->tmp_size);
    int mnt = fsmount(fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV);
    if (mnt < 0) setup_failed("fsmount", "tmpfs");
    close(fs);
    return mnt;
}

/* A detached mount (a clone, or a new tmpfs) moved onto target, with attr set on it first. */
static void place_tree(int tree, const char *target, unsigned long long attr) {
    struct mount_attr a = {.attr_set = attr};
    int later = 0;
    if (attr && mount_setattr(tree, "", AT_EMPTY_PATH, &a, sizeof a) < 0) {
        if (errno != ENOSYS) setup_failed("set the mount options of", target);
        later = 1;  /* before Linux 5.12: remounted once in place */
    }
    if (move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        setup_failed("mount on", target);
    close(tree);
    if (later && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, NULL) < 0)
        setup_failed("make writable", target);
}

/* dir of the private tmpfs, bound onto target. */
static void place(int tmp, const char *dir, const char *target) {
    int tree = open_tree(tmp, dir, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (tree < 0) setup_failed("clone", dir);
    place_tree(tree, target, 0);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static void mounts(const struct options *o) {
    int keep_tree[MAX_LIST], keep_fd[MAX_LIST];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) setup_failed("make / private", NULL);
    int tmp = o->classic_mounts ? -1 : private_tmpfs(o);
    for (int k = 0; k < o->nkeep; k++) {
        /* Cloned before the host goes read-only, so they stay writable. */
        keep_tree[k] = tmp < 0 ? -1 : open_tree(AT_FDCWD, o->keep[k],
                                                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        keep_fd[k] = open(o->keep[k], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (keep_fd[k] < 0 || (tmp >= 0 && keep_tree[k] < 0)) setup_failed("open", o->keep[k]);
    }
    /* Opened now: it may sit in the data directory, hidden below. */
    int resolv_fd = -1;
    if (o->resolv_conf && (resolv_fd = open(o->resolv_conf, O_PATH | O_CLOEXEC)) < 0)
        setup_failed("open", o->resolv_conf);
    remount_all_readonly();
    /* Empty, root's: what the action must not see (other actions' directories, the data
     * directory). */
    for (int h = 0; h < o->nhide; h++) {
        if (!is_dir(o->hide[h])) continue;
        if (tmp >= 0) {
            char dir[16];
            snprintf(dir, sizeof dir, "hide%d", h);
            if (mkdirat(tmp, dir, 0711) < 0) setup_failed("mkdir", dir);
            place(tmp, dir, o->hide[h]);
        } else if (mount("tmpfs", o->hide[h], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                         "size=64k,mode=0711") < 0) {
            setup_failed("hide", o->hide[h]);
        }
    }
    for (int t = 0; t < o->ntmpfs; t++) {
        if (!is_dir(o->tmpfs[t])) continue;
        if (tmp >= 0) {
            char dir[16];
            snprintf(dir, sizeof dir, "tmp%d", t);
            /* mkdirat's mode passes the umask: the sticky, world-writable bits are set after */
            if (mkdirat(tmp, dir, 0700) < 0 || fchmodat(tmp, dir, 01777, 0) < 0)
                setup_failed("mkdir", dir);
            place(tmp, dir, o->tmpfs[t]);
            continue;
        }
        char data[64];
        snprintf(data, sizeof data, "size=%s,mode=1777", o->tmp_size);
        if (mount("tmpfs", o->tmpfs[t], "tmpfs", MS_NOSUID | MS_NODEV, data) < 0)
            setup_failed("mount a tmpfs on", o->tmpfs[t]);
    }
    if (tmp >= 0) close(tmp);
    /* The action's own directories come back, writable, where they were (under a tmpfs
     * above their parents are made: 0711, root's). */
    for (int k = 0; k < o->nkeep; k++) {
        make_path(o->keep[k]);
        if (keep_tree[k] >= 0) {
            place_tree(keep_tree[k], o->keep[k], MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV);
        } else {
            char src[64];
            snprintf(src, sizeof src, "/proc/self/fd/%d", keep_fd[k]);
            if (mount(src, o->keep[k], NULL, MS_BIND, NULL) < 0) setup_failed("bind", o->keep[k]);
            if (mount(NULL, o->keep[k], NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV,
                      NULL) < 0)
                setup_failed("make writable", o->keep[k]);
        }
        close(keep_fd[k]);
    }
    /* A user-mode network's resolver, where the host's is on its loopback (out of reach). */
    if (resolv_fd >= 0) {
        char src[64];
        snprintf(src, sizeof src, "/proc/self/fd/%d", resolv_fd);
        if (mount(src, "/etc/resolv.conf", NULL, MS_BIND, NULL) < 0)
            setup_failed("bind", "/etc/resolv.conf");
        if (mount(NULL, "/etc/resolv.conf", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID |
                  MS_NODEV | MS_NOEXEC, NULL) < 0)
            setup_failed("make read-only", "/etc/resolv.conf");
        close(resolv_fd);
    }
    if (o->pidns && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        setup_failed("mount /proc", NULL);
}

static void loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) setup_failed("socket", NULL);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) setup_failed("SIOCGIFFLAGS", "lo");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) setup_failed("SIOCSIFFLAGS", "lo");
    close(s);
}

/* The slot's own network namespace, kept at path (a bind mount of its nsfs file) and reused
 * by the slot's next action: making one costs ~0.5 ms and serializes in the kernel, joining
 * one costs nothing. Only one action of a slot runs at a time, it cannot change the
 * namespace's configuration (no CAP_NET_ADMIN there), and its sockets die with its processes.
 * A file that is not one yet (empty, as the worker creates it) gets a new namespace. */
static void join_or_make_netns(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) setup_failed("open", path);
    if (setns(fd, CLONE_NEWNET) == 0) {
        close(fd);
        return;
    }
    close(fd);
    if (unshare(CLONE_NEWNET) < 0) setup_failed("unshare", "CLONE_NEWNET");
    loopback_up();
    if (mount("/proc/self/ns/net", path, NULL, MS_BIND, NULL) < 0) setup_failed("keep", path);
}

/* No user namespaces (a way to capabilities and kernel surface no build needs) and no
 * keyrings (the uid's persistent keyring would outlive the action, and reach the next build
 * that gets the uid), for 64- and 32-bit programs alike. */
static void restrict_syscalls(void) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) { errno = ENOMEM; setup_failed("seccomp_init", NULL); }
    int rc = 0;
#ifdef __x86_64__
    /* Without these, libseccomp's filter kills every i386 or x32 program outright. */
    rc = seccomp_arch_add(ctx, SCMP_ARCH_X86);
    if (!rc || rc == -EEXIST) rc = seccomp_arch_add(ctx, SCMP_ARCH_X32);
    if (rc == -EEXIST) rc = 0;
#endif
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(unshare), 1,
                                   SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER));
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                                   SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER));
    /* clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc fall
     * back to clone, which the rule above sees. */
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(keyctl), 0);
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(add_key), 0);
    if (!rc) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(request_key), 0);
    if (!rc) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    if (rc) { errno = -rc; setup_failed("seccomp", NULL); }
}

static void become(const struct options *o) {
    if (o->gid >= 0) {
        if (setgroups(0, NULL) < 0) setup_failed("setgroups", NULL);
        if (setresgid((gid_t)o->gid, (gid_t)o->gid, (gid_t)o->gid) < 0)
            setup_failed("setresgid", NULL);
    }
    if (o->uid >= 0 && setresuid((uid_t)o->uid, (uid_t)o->uid, (uid_t)o->uid) < 0)
        setup_failed("setresuid", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) setup_failed("no_new_privs", NULL);
}

static const char *env_get(char **env, const char *name) {
    size_t n = strlen(name);
    for (; *env; env++)
        if (!strncmp(*env, name, n) && (*env)[n] == '=') return *env + n + 1;
    return NULL;
}

/* Like execvp: a candidate that is not there (ENOENT, ENOTDIR) or not ours to run (EACCES,
 * remembered) sends the search on; any other failure (ENOEXEC, E2BIG, ETXTBSY, ELOOP,
 * EAGAIN...) is the answer. */
static int try_exec(const char *path, char **argv, char **env, int *denied) {
    execve(path, argv, env);
    if (errno == EACCES) *denied = 1;
    return errno == ENOENT || errno == ENOTDIR || errno == EACCES;
}

static void exec_failed(const char *name, int err) {
    report('E', err, "%s", strerror(err));
    dprintf(2, "stoker: cannot execute '%s': %s\n", name, strerror(err));
    _exit(err == ENOENT || err == ENOTDIR ? 127 : 126);
}

/* As the action: argv[0] with a '/' is a path (relative to the cwd); otherwise looked up in
 * the Command's PATH (the system default without one; empty or relative entries are relative
 * to the cwd), then taken literally from the cwd (the pre-v2.3 reading). */
static void exec_command(char **argv, char **env) {
    const char *name = argv[0];
    int denied = 0;
    if (strchr(name, '/')) {
        try_exec(name, argv, env, &denied);
        exec_failed(name, errno);
    }
    const char *path = env_get(env, "PATH");
    if (!path) path = "/bin:/usr/bin";
    size_t nlen = strlen(name);
    for (const char *p = path;;) {
        const char *end = strchrnul(p, ':');
        size_t dlen = (size_t)(end - p);
        char *cand = malloc(dlen + nlen + 3);
        if (!cand) setup_failed("malloc", NULL);
        if (dlen == 0) strcpy(cand, ".");
        else { memcpy(cand, p, dlen); cand[dlen] = '\0'; }
        strcat(cand, "/");
        strcat(cand, name);
        if (!try_exec(cand, argv, env, &denied)) exec_failed(name, errno);
        free(cand);
        if (!*end) break;
        p = end + 1;
    }
    char *literal = malloc(nlen + 3);
    if (!literal) setup_failed("malloc", NULL);
    strcpy(literal, "./");
    strcat(literal, name);
    if (!try_exec(literal, argv, env, &denied)) exec_failed(name, errno);
    if (denied) exec_failed(name, EACCES);
    report('E', ENOENT, "not found in PATH (%s) or in the working directory", path);
    dprintf(2, "stoker: cannot execute '%s': not found in PATH (%s) or in the working "
            "directory\n", name, path);
    _exit(127);
}

/* `stoker-spawn --make-netns FILE`: a new network namespace with only `lo` up, kept at FILE
 * (an existing empty file) for a user-mode network stack to attach to before the action
 * joins it with --netns-file. */
static int make_netns(const char *path) {
    if (unshare(CLONE_NEWNET) < 0) setup_failed("unshare", "CLONE_NEWNET");
    loopback_up();
    if (mount("/proc/self/ns/net", path, NULL, MS_BIND, NULL) < 0) setup_failed("keep", path);
    return 0;
}

/* The command starts with every signal at its default and none blocked, whatever its
 * starter had (Python ignores SIGPIPE and SIGXFSZ: `yes | head` would see EPIPE). */
static void default_signals(void) {
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);  /* KILL, STOP: refused, fine */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* `stoker-spawn --hold`: pid 1 of a kept (recycled) container. It only waits, reaping what
 * is reparented to it, so that the container lives between the actions run in it with
 * --in-container --reap-all; SIGTERM ends it. */
static int hold(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig == SIGTERM || sig == SIGINT) return 0;
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
}

static int dir_is_empty(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT;  /* not there: nothing left in it */
    DIR *d = fdopendir(fd);
    if (!d) { close(fd); return 0; }
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) { empty = 0; break; }
    closedir(d);
    return empty;
}

/* Lines past the header of /proc/sysvipc/NAME: System V objects left in this IPC namespace. */
static int sysv_objects(const char *name) {
    char path[64];
    snprintf(path, sizeof path, "/proc/sysvipc/%s", name);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    int lines = 0, c;
    while ((c = getc(f)) != EOF) lines += c == '\n';
    fclose(f);
    return lines > 1 ? lines - 1 : 0;
}

/* --reap-all (in a kept container, as the action's uid): the command runs as a child; once it
 * exits, every other process this uid can signal in the container's pid namespace (all but
 * its pid 1) is killed and reaped, so nothing the action started outlives it. Then reports
 * on the status fd, on a line of its own after any report of the command's, the command's
 * exit code and whether the container is as clean as it was made ("C<code>") or not
 * ("D<code> <what is left>"): the caller throws away a container that is not clean. Exits as
 * the command did (an engine that cannot say how an exec ended has the code from the
 * report; one that waits on the exec's output has it end with this process: see main). */
static int verdict_fd = -1;  /* the engine's attached stdout, kept (see main) */

static void reap_all(const struct options *o) {
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) setup_failed("subreaper", NULL);
    /* The command runs as this process's uid: not dumpable, its fds (the status pipe, the
     * kept stdout) cannot be opened through /proc/PID/fd by the command to forge the
     * verdict (an exec makes the command dumpable again, not this process). */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) setup_failed("dumpable", NULL);
    pid_t child = fork();
    if (child < 0) setup_failed("fork", NULL);
    if (child == 0) return;
    int st = 0, got = 0;
    while (!got) {
        int s;
        pid_t p = waitpid(-1, &s, 0);
        if (p == child) { st = s; got = 1; }
        else if (p < 0 && errno != EINTR) _exit(SETUP_EXIT);
    }
    int gone = 0;
    for (int tries = 0; tries < 5000 && !gone; tries++) {
        if (kill(-1, SIGKILL) < 0 && errno == ESRCH) gone = 1;
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        if (!gone) usleep(1000);
    }
    char left[256] = "";
    if (!gone) snprintf(left, sizeof left, "processes that would not die");
    for (int k = 0; k < o->ncheck_empty && !left[0]; k++)
        if (!dir_is_empty(o->check_empty[k]))
            snprintf(left, sizeof left, "files in %s", o->check_empty[k]);
    if (o->check_ipc && !left[0]) {
        static const char *kinds[] = {"shm", "msg", "sem"};
        for (int k = 0; k < 3 && !left[0]; k++)
            if (sysv_objects(kinds[k]))
                snprintf(left, sizeof left, "System V %s objects", kinds[k]);
    }
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    /* On the status fd, and on the kept stdout where there is one (a status file is the
     * uid's own, so the engine reads the verdict from the exec's output there). */
    int outs[2] = {status_fd, verdict_fd};
    for (int k = 0; k < 2; k++) {
        if (outs[k] < 0) continue;
        ssize_t unused = left[0] ? dprintf(outs[k], "\nD%d %s", code, left)
                                 : dprintf(outs[k], "\nC%d", code);
        (void)unused;
    }
    _exit(code);
}

int main(int argc, char **argv) {
    struct options o;
    /* In a container the runtime, not a worker, starts it (a `podman exec`'s parent may exit
     * at any moment): no tie to its parent; the container's lifetime bounds it. */
    int in_container = argc > 1 && !strcmp(argv[1], "--in-container");
    if (in_container) { argv++; argc--; }
    if (argc == 2 && !strcmp(argv[1], "--hold")) return hold();
    /* Dies with the worker that started it (and, below, its command with it). */
    pid_t worker = getppid();
    if (!in_container &&
        (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != worker))
        _exit(SETUP_EXIT);
    if (argc == 3 && !strcmp(argv[1], "--make-netns")) return make_netns(argv[2]);
    parse(argc, argv, &o);
    if (o.status_file && (status_fd = open(o.status_file, O_WRONLY | O_TRUNC | O_CLOEXEC)) < 0)
        _exit(SETUP_EXIT);
    /* Under --reap-all the process that waits for the command keeps its starter's stdout
     * open, so that an engine attached to it (the Docker API's exec) sees the end only
     * once everything is done; the command itself gets only the file. */
    if (o.reap_all && o.stdout_file && (verdict_fd = fcntl(1, F_DUPFD_CLOEXEC, 3)) < 0)
        setup_failed("dup", "stdout");
    if (o.stdout_file) redirect(1, o.stdout_file);
    if (o.stderr_file) redirect(2, o.stderr_file);
    if (o.env_file && (o.env_fd = open(o.env_file, O_RDONLY | O_CLOEXEC)) < 0)
        setup_failed("open", o.env_file);
    /* Inside a container: whoever reads the status learns the container started. */
    if (o.report_start && status_fd >= 0 && write(status_fd, "X", 1) != 1) _exit(SETUP_EXIT);
    /* The action gets stdin, stdout and stderr only, whatever its starter left open... */
    if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = 3; fd < 1024; fd++) fcntl(fd, F_SETFD, FD_CLOEXEC);  /* before 5.11 */
    }
    /* ...but for those the command is handed on purpose (a sandbox's arguments, its
     * directories). */
    for (int k = 0; k < o.nkeep_fds; k++)
        if (fcntl(o.keep_fds[k], F_SETFD, 0) < 0) setup_failed("pass fd", NULL);
    char **env = o.env_fd >= 0 ? read_env(o.env_fd) : calloc(1, sizeof(char *));

    char pid[32];
    snprintf(pid, sizeof pid, "%d", getpid());
    for (int k = 0; k < o.ncgroups; k++) write_file(o.cgroups[k], pid);
    if (o.oom_score_adj > -10000) {
        char adj[32];
        snprintf(adj, sizeof adj, "%ld", o.oom_score_adj);
        write_file("/proc/self/oom_score_adj", adj);
    }
    if (o.nproc >= 0) {
        struct rlimit rl = {(rlim_t)o.nproc, (rlim_t)o.nproc};
        if (setrlimit(RLIMIT_NPROC, &rl) < 0) setup_failed("setrlimit NPROC", NULL);
    }
    /* Before the mount namespace: the kept namespace is bound in the worker's. */
    if (o.netns && o.netns_file) join_or_make_netns(o.netns_file);
    int flags = (o.pidns ? CLONE_NEWPID : 0) | (o.ipcns ? CLONE_NEWIPC : 0) |
                (o.netns && !o.netns_file ? CLONE_NEWNET : 0) | (o.mountns ? CLONE_NEWNS : 0);
    if (flags && unshare(flags) < 0) setup_failed("unshare", NULL);
    if (o.pidns) {
        pid_t child = fork();
        if (child < 0) setup_failed("fork", NULL);
        if (child > 0) {
            /* Outside the namespace: wait for its pid 1 and exit as it did. Its exit comes
             * only once every process of the namespace is gone. */
            close(status_fd);
            int st;
            while (waitpid(child, &st, 0) < 0)
                if (errno != EINTR) _exit(SETUP_EXIT);
            _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        }
        /* Dies with the waiting parent from here on (set again after the uid change). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) setup_failed("pdeathsig", NULL);
    }
    if (o.mountns) mounts(&o);
    if (o.netns && !o.netns_file) loopback_up();
    become(&o);
    /* Again after the uid change, which clears it: the command dies with its parent (the
     * helper waiting outside its pid namespace, or else the worker). */
    if (!in_container) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) setup_failed("pdeathsig", NULL);
        if (!o.pidns && getppid() != worker) _exit(SETUP_EXIT);
    }
    if (o.reap_all) reap_all(&o);
    if (o.clear_keyrings) {
        /* The uid's user keyrings outlive its processes: what a previous action of this
         * slot stored there must not reach the next build. Refused inside some containers
         * (then nothing can be stored either). */
        syscall(SYS_keyctl, KEYCTL_CLEAR, KEY_SPEC_USER_KEYRING);
        syscall(SYS_keyctl, KEYCTL_CLEAR, KEY_SPEC_USER_SESSION_KEYRING);
        syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, NULL);
    }
    if (o.deny_userns) restrict_syscalls();
    if (o.cwd && chdir(o.cwd) < 0) setup_failed("chdir", o.cwd);
    default_signals();
    exec_command(o.argv, env);
    return SETUP_EXIT;
}
