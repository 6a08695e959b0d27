"""A real BuildGrid 0.9.1 (with its PostgreSQL) on loopback, for tests and benchmarks.

Plain functions and classes, no pytest: bench/ uses them too.

    with Postgres() as pg, BuildGridServer(workdir, pg) as bg:
        ... talk REAPI and RWAPI to bg.address ...

BuildGrid 0.9.1 needs Python >= 3.13 (pip on an older Python silently picks 0.4.4), so it
lives in a venv of its own, built once from pyenv's 3.13 and cached (bgd_venv()). Its
scheduler refuses SQLite, so every server gets a fresh database in a private PostgreSQL
cluster (Postgres). Facts and config: shared/reference/peers.md, sections 0-4.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from engine.proto import re_grpc, re_pb2

BGD_VERSION = "0.9.1"
# Overridable so CI or a developer can keep the venv elsewhere.
CACHE_ROOT = Path(os.environ.get("STOKER_TEST_CACHE",
                                 Path.home() / ".cache" / "stoker-tests"))
VENV_DIR = CACHE_ROOT / f"bgd-{BGD_VERSION}"
_VENV_STAMP = ".stoker-ok"  # written last: a venv without it is half built
_VENV_BUILD_TIMEOUT_S = 900.0  # pip on a slow mirror; also bounds the wait for the lock
_PG_USER = "postgres"  # initdb and postgres refuse to run as root
_DB_ROLE = "bgd"
_HOW_TO_GET_313 = (
    "BuildGrid 0.9.1 needs CPython 3.13 and none was found (looked for pyenv's "
    "$(pyenv root)/versions/3.13*, ~/.pyenv/versions/3.13* and python3.13 on PATH). Debian 12 "
    "ships only 3.11, and PyPI has no installable CPython, only downloaders that fetch it "
    "from outside. Install a 3.13 with pyenv (`pyenv install 3.13`) or your OS's packages, "
    "or point STOKER_PYTHON313 at its interpreter.")


class Python313Missing(RuntimeError):
    """No CPython 3.13 on this machine: BuildGrid 0.9.1 cannot be installed."""


class HarnessError(RuntimeError):
    """A BuildGrid or PostgreSQL process did not come up; the message carries its log."""


# For channels opened before their server listens (readiness probes, bots across a restart).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- last {limit} chars of {path} ---\n{text}"


# ---- Python 3.13 and the BuildGrid venv ------------------------------------------------------


def _is_313(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys, venv; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "(3, 13)"


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"/3\.13\.(\d+)", path)
    return (int(m.group(1)),) if m else (-1,)


def find_python313() -> Path | None:
    """A CPython 3.13 interpreter: $STOKER_PYTHON313, pyenv's newest 3.13.x, python3.13 on
    PATH; None if there is none."""
    candidates: list[str] = []
    if os.environ.get("STOKER_PYTHON313"):
        candidates.append(os.environ["STOKER_PYTHON313"])
    roots = [os.environ.get("PYENV_ROOT", "")]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        roots.append(subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    roots.append(str(Path.home() / ".pyenv"))
    for root in dict.fromkeys(r for r in roots if r):
        found = glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python3.13"))
        # Newest patch release first; free-threaded builds ("3.13.0t") sort with their base.
        candidates += sorted(found, key=_version_key, reverse=True)
    on_path = shutil.which("python3.13")
    if on_path:
        candidates.append(on_path)
    for c in dict.fromkeys(candidates):
        if _is_313(c):
            return Path(c)
    return None


def _bgd_runs(venv: Path) -> bool:
    try:
        out = subprocess.run([str(venv / "bin" / "bgd"), "--help"], capture_output=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


_verified: set[Path] = set()  # `bgd --help` takes 2 s: once per process is enough


def _venv_ok(venv: Path) -> bool:
    if venv in _verified:
        return True
    if (venv / _VENV_STAMP).exists() and _bgd_runs(venv):
        _verified.add(venv)
        return True
    return False


def bgd_venv() -> Path:
    """The venv holding buildgrid==0.9.1, built on first use under CACHE_ROOT and reused.

    A flock serialises concurrent builders (two pytest runs, a bench beside a test); the
    stamp is written only after `bgd --help` worked, so an interrupted build is redone.
    pip reads the machine's own configuration (index, mirror): nothing is passed here."""
    if _venv_ok(VENV_DIR):
        return VENV_DIR
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f"bgd-{BGD_VERSION}.lock", "w") as lock:
        deadline = time.monotonic() + _VENV_BUILD_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"another process held {lock.name} for "
                                       f"{_VENV_BUILD_TIMEOUT_S:.0f} s") from None
                time.sleep(0.5)
        if _venv_ok(VENV_DIR):  # built by whoever held the lock
            return VENV_DIR
        python = find_python313()
        if python is None:
            raise Python313Missing(_HOW_TO_GET_313)
        shutil.rmtree(VENV_DIR, ignore_errors=True)
        log = CACHE_ROOT / f"bgd-{BGD_VERSION}-build.log"
        with open(log, "wb") as out:
            for argv in ([str(python), "-m", "venv", str(VENV_DIR)],
                         [str(VENV_DIR / "bin" / "python"), "-m", "pip", "install",
                          "--no-input", f"buildgrid=={BGD_VERSION}"]):
                out.write(f"$ {' '.join(argv)}\n".encode())
                out.flush()
                try:
                    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT,
                                        timeout=_VENV_BUILD_TIMEOUT_S).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                if rc != 0:
                    raise HarnessError(f"building the BuildGrid venv failed ({rc}):\n"
                                       f"{tail(log)}")
        if not _bgd_runs(VENV_DIR):
            raise HarnessError(f"`bgd --help` fails in the fresh venv {VENV_DIR}")
        (VENV_DIR / _VENV_STAMP).write_text(f"buildgrid=={BGD_VERSION} from {python}\n")
        _verified.add(VENV_DIR)
        return VENV_DIR


def bgd() -> str:
    return str(bgd_venv() / "bin" / "bgd")


# ---- processes ---------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 grace_s: float = 20.0) -> None:
    """sig, then SIGKILL to the whole process group (each child here leads its own)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---- PostgreSQL --------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The server binaries: Debian's postgresql-15 (what peers.md tested), else the newest."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    preferred = [p for p in found if "/15/" in p] or found[-1:]
    if not preferred:
        raise HarnessError("PostgreSQL server binaries not found under /usr/lib/postgresql "
                           "(install Debian's postgresql-15: scripts/install-test-deps.sh)")
    return Path(preferred[0]).parent


class Postgres:
    """A private PostgreSQL cluster on a free 127.0.0.1 port: fsync off, trust auth for role
    'bgd', stopped and deleted by close(). new_database() hands each BuildGrid a fresh,
    migrated database, so servers sharing one cluster never see each other's jobs."""

    def __init__(self, parent: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.bin = postgres_bin()
        # Its own directory, world-searchable: as root the server runs as 'postgres', which
        # cannot enter a 0700 pytest tmpdir.
        self.dir = Path(tempfile.mkdtemp(prefix="stoker-bgd-pg-", dir=parent or "/tmp"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log_path = self.dir / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(_PG_USER)
            except KeyError:
                raise HarnessError(f"as root, PostgreSQL must run as user {_PG_USER!r}, "
                                   "which Debian's postgresql-15 creates; it is missing") from None
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                        "env": {**os.environ, "HOME": str(self.dir), "USER": _PG_USER}}
        try:
            for d in (self.data, self.socket_dir):
                d.mkdir(mode=0o700)
                if self._as:
                    os.chown(d, self._as["user"], self._as["group"])
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", _DB_ROLE,
                       "--auth=trust", "-E", "UTF8", "--no-sync"], timeout=120)
            self._start(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _run(self, argv: list[str], timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            try:
                rc = subprocess.run(argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout,
                                    **self._as).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            raise HarnessError(f"{Path(argv[0]).name} failed ({rc})\n{tail(self.log_path)}")

    def _start(self, timeout_s: float) -> None:
        for _ in range(3):  # another process may take the free port before postgres binds it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bin / "postgres"), "-D", str(self.data),
                     "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
                     "-c", f"unix_socket_directories={self.socket_dir}",
                     # Throwaway data: durability costs time and buys nothing.
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=300"],
                    cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, **self._as)
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                probe = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1",
                                        "-p", str(self.port), "-U", _DB_ROLE, "-d", "postgres"],
                                       capture_output=True, timeout=30)
                if probe.returncode == 0:
                    return
                time.sleep(0.1)
            if self.proc.poll() is None:
                raise HarnessError(f"postgres not ready within {timeout_s:.0f} s\n"
                                   f"{tail(self.log_path)}")
            if b"could not bind" not in self.log_path.read_bytes()[-4000:]:
                break
        raise HarnessError(f"postgres exited ({self.proc.returncode})\n{tail(self.log_path)}")

    def url(self, database: str) -> str:
        return f"postgresql://{_DB_ROLE}@127.0.0.1:{self.port}/{database}"

    def new_database(self, migrate: bool = True) -> str:
        """A fresh database (with BuildGrid's schema unless migrate is False); its URL."""
        name = f"bgd_{uuid.uuid4().hex[:12]}"
        self._run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", _DB_ROLE, name], timeout=60)
        if migrate:
            argv = [bgd(), "migrate", "apply", self.url(name)]
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=120)
            if out.returncode != 0:
                raise HarnessError(f"`bgd migrate apply` failed ({out.returncode}):\n"
                                   f"{out.stdout.decode(errors='replace')[-3000:]}"
                                   f"{out.stderr.decode(errors='replace')[-3000:]}")
        return self.url(name)

    def close(self) -> None:
        # SIGINT is postgres' "fast" shutdown: ends sessions, no waiting for clients.
        stop_process(self.proc, signal.SIGINT, grace_s=30)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- BuildGrid ---------------------------------------------------------------------------------

# peers.md's all-in-one config: Execution, Bots, Operations, CAS, ByteStream, ActionCache and
# Capabilities on instance "", disk CAS, the in-memory action cache (lost on restart).
_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
connections:
  - !sql-connection &sql
    connection-string: {db_url}
    pool-size: {pool_size}
    max-overflow: 20
storages:
  - !disk-storage &main-storage
    path: {cas_dir}
caches:
  - !lru-action-cache &main-action
    storage: *main-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
schedulers:
  - !sql-scheduler &state-database
    sql: *sql
    storage: *main-storage
    action-cache: *main-action
    bot-session-keepalive-timeout: {keepalive_s}
    property-set: !dynamic-property-set
      match-property-keys: []
      wildcard-property-keys: []
{assigners}instances:
  - name: ''
    services:
      - !action-cache
        cache: *main-action
      - !execution
        scheduler: *state-database
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
thread-pool-size: {threads}
"""
# The default assigner sleeps 1 s plus up to 1 s of jitter when idle: ~1.4 s per action.
_TUNED_ASSIGNERS = """\
    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.05
        jitter-factor: 0.05
"""


class BuildGridServer:
    """`bgd server start` on 127.0.0.1 with its CAS under workdir and a fresh database in pg.

    restart() keeps the port, the CAS and the database (a scheduler restart: queued jobs and
    bot sessions survive in PostgreSQL); the action cache is in memory and does not.
    Every open Execute stream holds one of thread_pool_size threads: keep the clients'
    concurrency well below it, or bots' calls are refused (RESOURCE_EXHAUSTED)."""

    def __init__(self, workdir: str | os.PathLike, pg: Postgres, *, tuned: bool = True,
                 keepalive_s: int = 120, port: int | None = None, thread_pool_size: int = 80,
                 sql_pool_size: int = 10, verbose: bool = False, start: bool = True) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pg = pg
        self._auto_port = port is None
        self._served = False  # once it has served, the port is its own: never changed
        self.port = port or free_port()
        self.db_url = pg.new_database()
        self.config_path = self.dir / "server.yml"
        self.log_path = self.dir / "bgd.log"
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None
        self._settings = {"db_url": self.db_url, "cas_dir": self.dir / "cas",
                          "keepalive_s": int(keepalive_s),
                          "assigners": _TUNED_ASSIGNERS if tuned else "",
                          "threads": int(thread_pool_size), "pool_size": int(sql_pool_size)}
        self._write_config()
        if start:
            self.start()

    def _write_config(self) -> None:
        self.config_path.write_text(_CONFIG.format(port=self.port, **self._settings))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, limit: int = 6000) -> str:
        state = "running" if self.alive() else \
            f"exited {self.proc.returncode if self.proc else None}"
        return f"[bgd {self.address}, {state}]\n{tail(self.log_path, limit)}"

    def start(self, ready_within_s: float = 180.0) -> None:
        """Start and wait until GetCapabilities answers; HarnessError with the log if not.
        (bgd needs 6-9 s to serve on an idle 2-core machine, far more on a busy one.)"""
        if self.alive():
            return
        for _ in range(3):
            since = self.log_path.stat().st_size if self.log_path.exists() else 0
            if self._start_once(ready_within_s):
                self._served = True
                return
            # Its free port was taken meanwhile (bgd takes seconds to bind): pick another,
            # unless it has served on this one (a restart keeps its address).
            if self._served or not self._auto_port or \
                    b"Failed to bind to address" not in self.log_path.read_bytes()[since:]:
                break
            self.port = free_port()
            self._write_config()
        raise HarnessError(f"bgd exited ({self.proc.returncode}) before serving\n"
                           f"{self.log_tail()}")

    def _start_once(self, ready_within_s: float) -> bool:
        """True once it serves; False if it exited first."""
        argv = [bgd(), "server", "start", *(["-v"] if self.verbose else []),
                str(self.config_path)]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + ready_within_s
        # Short reconnect backoff: the default (1 s, growing) would notice the listener late.
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            caps = re_grpc.CapabilitiesStub(channel)
            while self.proc.poll() is None:
                try:
                    caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=2.0)
                    return True
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise HarnessError(f"bgd did not answer GetCapabilities within "
                                           f"{ready_within_s:.0f} s\n{self.log_tail()}") from None
                    time.sleep(0.2)
        return False

    def stop(self, grace_s: float = 20.0) -> None:
        stop_process(self.proc, signal.SIGTERM, grace_s)

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash looks like to bots and clients."""
        stop_process(self.proc, signal.SIGKILL, grace_s=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> BuildGridServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- a plain REAPI client ----------------------------------------------------------------------


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload_action(channel: grpc.Channel, argv: list[str], *,
                  do_not_cache: bool = True) -> re_pb2.Digest:
    """Uploads the Command, an empty input root and the Action (BatchUpdateBlobs, SHA-256:
    all BuildGrid speaks); the Action's digest."""
    root = re_pb2.Directory().SerializeToString()
    cmd = re_pb2.Command(arguments=argv).SerializeToString()
    action = re_pb2.Action(command_digest=digest_of(cmd), input_root_digest=digest_of(root),
                           do_not_cache=do_not_cache).SerializeToString()
    reply = re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b)
            for b in (root, cmd, action)]), timeout=30)
    bad = [r for r in reply.responses if r.status.code]
    if bad:
        raise HarnessError(f"BatchUpdateBlobs refused: {bad}")
    return digest_of(action)


def execute(channel: grpc.Channel, action: re_pb2.Digest, *, timeout_s: float = 60.0,
            skip_cache_lookup: bool = True) -> re_pb2.ExecuteResponse:
    """Execute, reading the stream until the operation is done; its ExecuteResponse."""
    for op in re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=action, skip_cache_lookup=skip_cache_lookup),
            timeout=timeout_s):
        if op.done:
            if op.HasField("error"):
                raise HarnessError(f"operation {op.name} failed: {op.error}")
            response = re_pb2.ExecuteResponse()
            op.response.Unpack(response)
            return response
    raise HarnessError("Execute stream ended before the operation was done")
