"""Helpers for the adversarial tests: real `stoker up` processes attacked through REAPI
Execute the way a hostile action would, and the checks every attack ends with. (A module of
its own rather than conftest.py, so that test files import one instance of it.)

Layout of a module's scratch directory (searchable by every action uid):

    <base>/data/          the module's Stoker --data-dir
    <base>/sentinel/      root-owned tree an escape would touch (owners, modes, contents
                          are snapshotted): rootdir/ (0755), secretdir/ (0700, with a 0600
                          secret out.txt, named like the outputs), open/ (0777)
    <base>/stoker.log     the module's Stoker log

Every process an attack starts carries a marker (in argv and in the environment), so that
the /proc scans find exactly this test's survivors on a machine where other Stokers run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import pytest

from engine.proto import re_pb2
from tests.integration.support import (
    Client,
    StokerProcess,
    blob_resource,
    command,
    hash_hex,
    key,
    start,
)

MARK_ENV = "STOKER_ADV_MARK"
CANARY = "stoker-adv-canary"
SECRET = b"adversarial sentinel secret: root only, never in the CAS " + uuid.uuid4().bytes
PYTHON = "/usr/bin/python3"  # Debian's, so actions need nothing from the venv
ACTION_UIDS = range(60000, 61000)  # the default `action_uids`
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (actions run as other uids)")


# ---- scratch and sentinel ------------------------------------------------------------------


def remove_tree(path: Path) -> None:
    """rm -rf, which (unlike shutil.rmtree) copes with 10k-deep trees and 000 directories."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=120, check=False)


def make_sentinel(base: Path) -> Path:
    s = base / "sentinel"
    (s / "rootdir").mkdir(parents=True)
    (s / "rootdir" / "file.txt").write_bytes(b"root's file\n")
    (s / "secretdir").mkdir()
    (s / "open").mkdir()
    # Named like the outputs the swap attacks ask for.
    (s / "secretdir" / "out.txt").write_bytes(SECRET)
    (s / "secretdir" / "out.txt").chmod(0o600)
    s.chmod(0o755)
    (s / "rootdir").chmod(0o755)
    (s / "secretdir").chmod(0o700)
    (s / "open").chmod(0o777)  # a write that escaped would really land here
    return s


def start_with_env(process: StokerProcess, env: dict[str, str]) -> StokerProcess:
    """start(process) with env added to what it inherits (e.g. STOKER_CONTAINMENT)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start(process)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- processes ------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def proc_info(pid: int) -> dict | None:
    """uid, state, cmdline, environ and cwd of a live (non-zombie) process, or None."""
    status = _read(f"/proc/{pid}/status").decode(errors="replace")
    if not status:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return {"pid": pid, "uid": int(fields["Uid"].split()[0]),
            "ppid": int(fields.get("PPid", "0").strip() or 0),
            "cmdline": _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(
                errors="replace"),
            "environ": _read(f"/proc/{pid}/environ"), "cwd": cwd}


def all_procs() -> Iterator[dict]:
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := proc_info(int(name))) is not None:
            yield info


def marked_procs(mark: str, build_dir: Path | None = None) -> list[dict]:
    """Processes carrying mark in argv or environment, or (given build_dir) whose cwd is
    below it and whose uid is not root: an action's processes, found every way we can."""
    found = []
    needle = mark.encode()
    for p in all_procs():
        if p["pid"] == os.getpid():
            continue
        if mark in p["cmdline"] or needle in p["environ"] or (
                build_dir is not None and p["uid"] != 0
                and p["cwd"].startswith(str(build_dir) + "/")):
            found.append({"pid": p["pid"], "uid": p["uid"], "cmdline": p["cmdline"][:60],
                          "cwd": p["cwd"]})
    return found


def kill_marked(mark: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (procs := marked_procs(mark)) and time.monotonic() < deadline:
        for p in procs:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def children(pid: int) -> list[dict]:
    return [p for p in all_procs() if p["ppid"] == pid]


def stoker_pids(process: StokerProcess) -> dict[str, int]:
    """{'supervisor': pid, 'server': pid, 'worker-0': pid, 'monitor': pid, ...}"""
    assert process.proc is not None
    out = {"supervisor": process.proc.pid}
    for c in children(process.proc.pid):
        args = c["cmdline"].split()
        if "engine" in args and "-m" in args:
            role = args[args.index("engine") + 1]
            if role == "worker" and "--slot" in args:
                role = f"worker-{args[args.index('--slot') + 1]}"
            out[role] = c["pid"]
    return out


def pid_alive(pid: int) -> bool:
    return proc_info(pid) is not None


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
             what: str = "condition"):
    """The predicate's first truthy value within timeout, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def walk(top: Path | str, max_depth: int = 64) -> Iterator[tuple[str, list[str], list[str]]]:
    """(dirpath, dirnames, filenames) like os.walk, but iterative (Python 3.11's os.walk
    recurses, and attacks leave 10k-deep trees) and at most max_depth levels down."""
    stack = [(str(top), 0)]
    while stack:
        path, depth = stack.pop()
        dirs, files = [], []
        try:
            with os.scandir(path) as it:
                for e in it:
                    (dirs if e.is_dir(follow_symlinks=False) else files).append(e.name)
        except OSError:
            continue
        yield path, dirs, files
        if depth < max_depth:
            stack.extend((os.path.join(path, d), depth + 1) for d in dirs)


def find_file(top: Path, name: str, max_depth: int = 5) -> Path | None:
    """A file named name below top (as root), at most max_depth levels down."""
    for dirpath, _, filenames in walk(top, max_depth):
        if name in filenames:
            return Path(dirpath) / name
    return None


def attempt(problems: list[str], label: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), or None with the exception recorded in problems: a test that
    goes on after a step failed reports everything that went wrong, not only the first."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - recorded, whatever it is
        problems.append(f"{label}: {e!r}"[:600])
        return None


def background(fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
    """Run fn in a thread of its own (an Execute that blocks while we attack beside it)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


# ---- actions --------------------------------------------------------------------------------


def marked_env(mark: str, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", MARK_ENV: mark, **extra}


def py_argv(code: str, mark: str, *args: str) -> list[str]:
    """python3 -c code with mark in argv (sys.argv[1]) so that /proc scans find it."""
    return [PYTHON, "-c", code, mark, *args]


def sh_argv(script: str, mark: str) -> list[str]:
    return ["/bin/sh", "-c", script, mark]  # $0 is the mark


def execute(client: Client, argv: list[str], inputs: dict | None = None, *, mark: str,
            timeout: float | None = None, skip_cache_lookup: bool = True,
            exec_timeout: float = 60.0, **fields) -> re_pb2.ExecuteResponse:
    env = fields.pop("env", None) or marked_env(mark)
    root = client.put_tree(inputs or {}).root
    action = client.action(command(argv, env=env, **fields), root, timeout=timeout)
    return client.execute(action, skip_cache_lookup=skip_cache_lookup,
                          timeout=exec_timeout).response


def stdout_of(client: Client, response: re_pb2.ExecuteResponse) -> str:
    if not response.result.HasField("stdout_digest"):
        return ""
    return client.read(response.result.stdout_digest).decode(errors="replace")


def stderr_of(client: Client, response: re_pb2.ExecuteResponse) -> str:
    if not response.result.HasField("stderr_digest"):
        return ""
    return client.read(response.result.stderr_digest).decode(errors="replace")


def describe(client: Client, response: re_pb2.ExecuteResponse) -> str:
    return (f"status={response.status.code} {response.status.message!r} "
            f"exit={response.result.exit_code}\nstdout: {stdout_of(client, response)[-2000:]}"
            f"\nstderr: {stderr_of(client, response)[-2000:]}")


def result_digests(client: Client, result: re_pb2.ActionResult) -> list[re_pb2.Digest]:
    """Every blob an ActionResult refers to: stdout, stderr, output files, and each output
    directory's Tree with every Directory and file in it."""
    out = [d for d in (result.stdout_digest, result.stderr_digest) if d.hash]
    out += [f.digest for f in result.output_files]
    for od in result.output_directories:
        out.append(od.tree_digest)
        tree = re_pb2.Tree.FromString(client.read(od.tree_digest))
        for directory in [tree.root, *tree.children]:
            out += [f.digest for f in directory.files]
            out += [sub.digest for sub in directory.directories]
    return out


def served_blobs(client: Client, digests: Iterable[re_pb2.Digest]) -> dict[tuple, bytes]:
    """Read each blob twice (BatchReadBlobs and ByteStream) and check both against its
    digest; AssertionError names every blob that is missing or wrong."""
    blobs: dict[tuple, bytes] = {}
    bad = []
    for d in digests:
        if key(d) in blobs:
            continue
        reply = client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d]), timeout=30)
        r = reply.responses[0]
        if r.status.code != 0:
            bad.append(f"{d.hash}/{d.size_bytes}: BatchReadBlobs status {r.status}")
            continue
        streamed = client.bs_read(blob_resource(d)) if d.size_bytes else b""
        for how, data in (("BatchReadBlobs", r.data), ("ByteStream", streamed)):
            if len(data) != d.size_bytes or hash_hex(data) != d.hash:
                bad.append(f"{d.hash}/{d.size_bytes}: {how} served {len(data)} bytes hashing "
                           f"to {hash_hex(data)} ({data[:40]!r}...)")
        blobs[key(d)] = r.data
    assert not bad, "served blobs do not match their digests:\n" + "\n".join(bad)
    return blobs


# ---- snapshots ------------------------------------------------------------------------------


def meta_snapshot(path: Path) -> dict[str, tuple]:
    """Every entry under path (and path itself): (kind, uid, gid, mode, content or target)."""
    out: dict[str, tuple] = {}

    def entry(full: str) -> tuple:
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            what: object = os.readlink(full)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(Path(full).read_bytes()).hexdigest()
        else:
            what = None
        return (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), what)

    out["."] = entry(str(path))
    for dirpath, dirnames, filenames in walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = entry(full)
    return out


def diff(before: dict, after: dict) -> list[str]:
    out = []
    for k in sorted(set(before) | set(after)):
        if before.get(k) != after.get(k):
            out.append(f"{k}: {before.get(k)} -> {after.get(k)}")
    return out


def cas_files(data_dir: Path) -> dict[str, tuple]:
    """cache/cas/<fn>/<hh>/<hash>-<size>[-x] -> (uid, mode, sha256 of the content)."""
    out = {}
    top = data_dir / "cache" / "cas"
    for dirpath, _, filenames in walk(top):
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
                content = Path(full).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            except OSError:
                continue  # evicted meanwhile
            out[os.path.relpath(full, top)] = (st.st_uid, stat.S_IMODE(st.st_mode),
                                               st.st_size, hashlib.sha256(content).hexdigest(),
                                               stat.S_ISREG(st.st_mode), content)
    return out


def cas_problems(data_dir: Path, before: dict[str, tuple] | None = None) -> list[str]:
    """What is wrong in the local CAS on disk: a file whose content does not hash to its
    name, that root does not own, that anyone may write, that is not a plain file; a file
    that was there before and changed."""
    problems = []
    now = cas_files(data_dir)
    for rel, (uid, mode, size, sha, regular, content) in now.items():
        fn, _, name = rel.partition("/")
        stem = name.split("/")[-1]
        if stem.endswith("-x"):
            stem = stem[:-2]
        digest, _, declared = stem.rpartition("-")
        if not regular:
            problems.append(f"{rel}: not a regular file")
            continue
        if fn == "sha256" and (sha != digest or str(size) != declared):
            problems.append(f"{rel}: content hashes to {sha}/{size} ({content[:40]!r}...)")
        if uid != 0:
            problems.append(f"{rel}: owned by uid {uid}, not root")
        if mode & 0o222:
            problems.append(f"{rel}: writable mode {oct(mode)}")
        if SECRET in content:
            problems.append(f"{rel}: holds the sentinel's secret")
        if before is not None and rel in before and before[rel][:4] != (uid, mode, size, sha):
            problems.append(f"{rel}: changed from {before[rel][:4]} to {(uid, mode, size, sha)}")
    return problems


def ac_snapshot(data_dir: Path) -> dict[str, bytes]:
    out = {}
    top = data_dir / "ac"
    for dirpath, _, filenames in walk(top):
        if os.path.basename(dirpath) == "tmp":
            continue
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(full, top)] = Path(full).read_bytes()
            except OSError:
                pass
    return out


def canaries(base: Path, mark: str = "") -> list[str]:
    """Files named like CANARY (and carrying mark) anywhere under base, exec roots included
    (a canary that outlived its action was planted where no action of its own writes), and
    at the top of / and /tmp."""
    found = []

    def planted(name: str) -> bool:
        return CANARY in name and mark in name

    for dirpath, dirnames, filenames in walk(base, 12):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if planted(n)]
    for top in ("/", "/tmp"):
        found += [os.path.join(top, n) for n in os.listdir(top) if planted(n)]
    return found


# ---- health ---------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # refused, reset, timed out: no answer at all
        return 0, repr(e).encode()


def statusz(process: StokerProcess) -> dict:
    code, body = http_get(process.health_url + "/statusz")
    assert code == 200, (code, body[:500])
    return json.loads(body)


def health_problems(process: StokerProcess, client: Client) -> list[str]:
    """Why Stoker is not healthy: dead, /healthz not 200, a trivial action that fails."""
    if not process.alive():
        return ["stoker is not running"]
    problems = []
    code, body = http_get(process.health_url + "/healthz")
    if code != 200:
        problems.append(f"/healthz {code}: {body[:300]!r}")
    nonce = uuid.uuid4().hex
    try:
        response = execute(client, ["/bin/sh", "-c", f"echo ok {nonce}"], {"in": b"x"},
                           mark="health", exec_timeout=30)
        if response.status.code != 0 or stdout_of(client, response) != f"ok {nonce}\n":
            problems.append("a trivial action failed: " + describe(client, response))
    except Exception as e:  # noqa: BLE001 - reported, whatever it is
        problems.append(f"a trivial action raised {e!r}")
    return problems


class Guard:
    """Snapshots taken before an attack and the checks after it: the sentinel tree (owners,
    modes, contents), the local CAS (every file matches its name, root-owned, read-only;
    files present before unchanged), the action cache entries present before, no canary
    anywhere, every blob of the results served intact, and Stoker healthy."""

    def __init__(self, process: StokerProcess, client: Client, sentinel: Path,
                 base: Path, mark: str = "") -> None:
        self.process, self.client, self.sentinel, self.base = process, client, sentinel, base
        self.mark = mark
        self.data = process.data_dir
        self.sentinel_before = meta_snapshot(sentinel)
        self.cas_before = cas_files(self.data)
        self.ac_before = ac_snapshot(self.data)

    def problems(self, results: Iterable[re_pb2.ActionResult] = (), *,
                 health: bool = True) -> list[str]:
        problems = [f"sentinel changed: {d}" for d in diff(self.sentinel_before,
                                                           meta_snapshot(self.sentinel))]
        problems += [f"local CAS: {p}" for p in cas_problems(self.data, self.cas_before)]
        ac_now = ac_snapshot(self.data)
        problems += [f"action cache entry {k} changed" for k, v in self.ac_before.items()
                     if k in ac_now and ac_now[k] != v]
        problems += [f"canary planted: {c}" for c in canaries(self.base, self.mark)]
        for result in results:
            try:
                blobs = served_blobs(self.client, result_digests(self.client, result))
            except AssertionError as e:
                problems.append(str(e))
                continue
            except grpc.RpcError as e:  # e.g. an output Tree the server cannot serve
                problems.append(f"reading a result's blobs: {e.code()} {e.details()}"[:500])
                continue
            problems += [f"a served blob holds the secret: {k}" for k, v in blobs.items()
                         if SECRET in v]
        if health:
            problems += health_problems(self.process, self.client)
        return problems

    def check(self, results: Iterable[re_pb2.ActionResult] = (), *,
              health: bool = True) -> None:
        problems = self.problems(results, health=health)
        assert not problems, "\n".join(problems)


# ---- the Command's environment as an attack (milestone 6) ---------------------------------

# Loaded by any process whose loader honours the environment: appends "<euid> <comm>" to
# the file named at build time. la_version makes it a valid LD_AUDIT module too.
EVIL_SO = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
unsigned int la_version(unsigned int v) { return v; }
__attribute__((constructor)) static void evil(void) {
    char comm[64] = "?", line[128];
    int c = open("/proc/self/comm", O_RDONLY);
    if (c >= 0) {
        ssize_t n = read(c, comm, sizeof comm - 1);
        if (n > 0) comm[n - 1] = 0;
        close(c);
    }
    snprintf(line, sizeof line, "EVIL %%d %%s\n", (int)geteuid(), comm);
    /* Where the test can read it: the process's stderr (the action's, for a process that
     * starts it), and the log file where the process may write (not from inside an action's
     * read-only view of the host). */
    write(2, line, strlen(line));
    int fd = open("%(log)s", O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (fd < 0) return;
    write(fd, line, strlen(line));
    close(fd);
}
"""


def build_evil_libs(shared_dir: Path) -> tuple[Path, Path]:
    """(a directory holding the evil library under the names a root process would load, the
    log it writes besides stderr) in shared_dir (not under /tmp: an action's /tmp is its
    own)."""
    log = shared_dir / "loaded.log"
    src = shared_dir / "evil.c"
    src.write_text(EVIL_SO % {"log": log})
    libs = shared_dir / "libs"
    libs.mkdir(mode=0o755)
    lib = libs / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    # The names of libraries the spawn helper and util-linux tools link against: a root
    # process that honoured LD_LIBRARY_PATH would load these instead of the system's.
    for name in ("libseccomp.so.2", "libcap-ng.so.0", "libselinux.so.1"):
        shutil.copy(lib, libs / name)
    gconv = shared_dir / "gconv"
    gconv.mkdir(mode=0o755)
    (gconv / "gconv-modules").write_text("module EVIL// INTERNAL evil 1\nalias X// EVIL//\n")
    shutil.copy(lib, gconv / "evil.so")
    for p in (libs, gconv, *libs.iterdir(), *gconv.iterdir()):
        p.chmod(0o755)
    return libs, log



# The command is the action's to run as it likes: it loads the library (as the slot uid)
# through iconv or by linking a library of that name, then says which uid it ran as.
EVIL_SCRIPT = ("iconv -f X -t UTF-8 </dev/null >/dev/null 2>&1; "
               "/usr/bin/python3 -c 'import os; print(os.getuid())'")


def evil_value(libs: Path, variable: str) -> str:
    """What the attack sets `variable` (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, GCONV_PATH) to."""
    return {"LD_PRELOAD": f"{libs}/evil.so", "LD_LIBRARY_PATH": str(libs),
            "LD_AUDIT": f"{libs}/evil.so", "GCONV_PATH": str(libs.parent / "gconv")}[variable]


def evil_loads(log: Path, stderr: str) -> list[tuple[int, str]]:
    """(euid, command name) of every process that loaded the evil library, from its log and
    an action's stderr."""
    text = (log.read_text() if log.exists() else "") + stderr
    return [(int(f[1]), f[2] if len(f) > 2 else "?")
            for f in (line.split() for line in text.splitlines()) if f[:1] == ["EVIL"]]


def root_loads(log: Path, stderr: str) -> list[tuple[int, str]]:
    """The loads of the evil library by a process of euid 0."""
    return [load for load in evil_loads(log, stderr) if load[0] == 0]
