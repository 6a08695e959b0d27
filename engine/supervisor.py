"""The supervisor: spawns the server and the workers, watches them, restarts, drains.

Deliberately boring: one thread, no gRPC, no asyncio. Signal handlers only record the
signal (the wakeup fd ends the select), and the loop does the work:

    loop: wait ≤0.5s for a signal → handle it (drain) → reap exited children → restart them
          (with backoff; halt on a crash loop) → kill children whose heartbeat went stale

Children are started by exec (`python -m engine worker --slot N`), never by fork, so no gRPC
state or thread ever crosses a fork. The supervisor holds the local CAS open for its whole
life, so a dirty cache is recovered once, here, before any child starts. Before that it
takes the data directory's lock (engine/datadir.py), which every child inherits, and sets
the directory's modes.

For the monitor child (/healthz, /readyz, /statusz, /metrics) the supervisor records its
children in a status file (engine/status.py) when they change, and gives every child one
fresh metrics directory (PROMETHEUS_MULTIPROC_DIR), forgetting a dead child's live gauges.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import multiprocess

from engine import __version__, datadir, heartbeat, reload, status
from engine.cas.local_disk import LocalDiskStore
from engine.config import CONFIG_ENV, Config

log = logging.getLogger(__name__)

CRASH_LOOP_RESTARTS = 5  # this many restarts of one child ...
CRASH_LOOP_WINDOW_S = 60.0  # ... within this window halts Stoker
BOOT_ALLOWANCE_S = 30.0  # a child's first heartbeat may take this long (imports, cache open)
SERVER_STOP_S = 5.0


@dataclass
class Child:
    name: str
    argv: list[str]
    pid_file: str
    heartbeat_file: str
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    exits: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10))


class CrashLoop(Exception):
    pass


class Supervisor:
    def __init__(self, config: Config, *, embedded_server: bool = True,
                 reread: Callable[[], Config] | None = None, lock_fd: int | None = None):
        """reread: how SIGHUP gets the configuration anew (the file and the flags); lock_fd:
        the data directory's lock when the caller took it already (engine/datadir.py)."""
        self.config = config
        self._reread = reread
        self._signals: collections.deque[int] = collections.deque()
        self._children: list[Child] = []
        self._state = "starting"
        self._mode = "up" if embedded_server else "executor"
        self._lock_fd = lock_fd  # <data>/stoker.lock: the CLI's, or taken in run()
        # Private: it holds the workers' socket to the Bots API (see server/app.py).
        os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
        os.chmod(config.run_dir, 0o700)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else config.run_dir
        _remove_stale_shm(shm)
        # A directory of our own under a fresh name, 0700: /dev/shm is world-writable, and a
        # name an action could guess (our pid) could be a symlink it planted.
        self.shm_dir = tempfile.mkdtemp(prefix=f"stoker-{os.getpid()}-", dir=shm)
        # Held by us and every child while any lives: how another Stoker knows, across pid
        # namespaces (a shared /dev/shm), that this directory is still in use.
        self._shm_lock_fd = os.open(os.path.join(self.shm_dir, "lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._shm_lock_fd, fcntl.LOCK_EX)
        prefix = os.path.join(self.shm_dir, "")
        self._prefix = prefix
        self.metrics_dir = f"{prefix}metrics"
        base = [sys.executable, "-m", "engine"]
        self._base = base
        if embedded_server:
            self._children.append(Child("server", [*base, "server"],
                                        os.path.join(config.run_dir, "server.pid"),
                                        f"{prefix}server"))
        for slot in range(config.worker_count):
            self._children.append(Child(f"worker-{slot}", [*base, "worker", "--slot", str(slot)],
                                        os.path.join(config.run_dir, f"worker-{slot}.pid"),
                                        f"{prefix}worker-{slot}"))

    # ---- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        # Before anything touches the data directory: a second Stoker here refuses (a
        # DataDirInUse, a ConfigError: exit code 2) and changes nothing.
        if self._lock_fd is None:
            self._lock_fd = datadir.lock(self.config.data_dir)
        datadir.secure(self.config)
        _protect_from_oom()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._record_signal)
        store = LocalDiskStore(self.config.cache_dir, self.config.cache_max_bytes)
        status.remove_statuses(self.config.run_dir)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.mkdir(self.metrics_dir, 0o700)
        if self.config.health_listen or self.config.metrics_listen:
            # Added here, not in __init__: only a running Stoker serves HTTP.
            self._children.append(Child("monitor", [*self._base, "monitor"],
                                        os.path.join(self.config.run_dir, "monitor.pid"),
                                        f"{self._prefix}monitor"))
        try:
            self._state = "running"
            for child in self._children:
                self.spawn(child)
            self._announce()
            while True:
                select.select([read_fd], [], [], 0.5)
                _drain_pipe(read_fd)
                while self._signals:
                    received = self._signals.popleft()
                    if received in (signal.SIGTERM, signal.SIGINT):
                        self.drain()
                        return 0
                    self.reload()
                self.reap_children()
                self.restart_children()
                self.kill_stale_children()
        except CrashLoop as e:
            log.error("halting: %s", e)
            self._set_state("halted")
            self.stop_all(grace_s=2.0)
            return 1
        finally:
            store.close()
            for child in self._children:
                _unlink(child.heartbeat_file)
                _unlink(child.pid_file)
            status.remove_statuses(self.config.run_dir)
            shutil.rmtree(self.shm_dir, ignore_errors=True)
            os.close(self._shm_lock_fd)
            os.close(self._lock_fd)  # the children are gone: the data directory is free

    def _record_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _announce(self) -> None:
        workers = sum(1 for c in self._children if c.name.startswith("worker"))
        if any(c.name == "server" for c in self._children):
            log.info("stoker %s: serving REAPI on %s://%s with %d worker(s); data in %s",
                     __version__, "grpcs" if self.config.listen_tls_cert_file else "grpc",
                     self.config.listen, workers, self.config.data_dir)
        else:
            log.info("stoker %s: %d worker(s) leasing from %s", __version__, workers,
                     self.config.server_address)

    def reload(self) -> None:
        """SIGHUP: take what can change at once (engine/reload.py), name what cannot."""
        if self._reread is None:
            log.info("SIGHUP: no configuration file to reload")
            return
        try:
            new = self._reread()
        except Exception as e:  # a running Stoker must never die of a bad edit
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return
        self.config, applied, restart = reload.merge(self.config, new)
        if restart:
            log.warning("SIGHUP: changed, but only taken after a restart: %s",
                        ", ".join(restart))
        if not applied:
            log.info("SIGHUP: nothing to reload")
            return
        reload.publish(self.config)
        log.info("SIGHUP: reloading %s", ", ".join(applied))
        for child in self._children:
            if child.name != "monitor" and child.proc is not None:
                child.proc.send_signal(signal.SIGHUP)

    def spawn(self, child: Child) -> None:
        heartbeat.beat(child.heartbeat_file)
        env = dict(os.environ)
        env[CONFIG_ENV] = self.config.to_json()
        env[heartbeat.ENV] = child.heartbeat_file
        env["STOKER_PROCESS"] = child.name
        env["STOKER_SUPERVISOR_PID"] = str(os.getpid())
        # Read by prometheus_client when the child imports it (engine/metrics.py).
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        if self._lock_fd is not None:
            # So the child can keep it from whatever it spawns (engine/cli.py).
            env[datadir.LOCK_FD_ENV] = str(self._lock_fd)
        # A process group of its own: a terminal's Ctrl-C or a `timeout` reaches only the
        # supervisor, which then stops the children in order (workers drain before the server
        # goes). Children die with the supervisor through PR_SET_PDEATHSIG (engine/lifeline.py).
        # SIGHUP ignored across the exec until the child installs its reload handler: a
        # reload sent while it starts must not kill it.
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            # The data directory's lock goes to every child, so it stays held while any
            # of them lives, even after a SIGKILL of the supervisor (engine/datadir.py).
            fds = (self._shm_lock_fd,) if self._lock_fd is None else (
                self._lock_fd, self._shm_lock_fd)
            child.proc = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL,
                                          process_group=0, pass_fds=fds)
        finally:
            signal.signal(signal.SIGHUP, previous)
        if child.started:
            child.restarts += 1
        child.started = time.monotonic()
        child.restart_at = None
        with open(child.pid_file, "w") as f:
            f.write(f"{child.proc.pid}\n")
        log.debug("started %s as pid %d", child.name, child.proc.pid)
        self.write_status()

    def reap_children(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            self._forget(child)
            child.exits.append(now)
            recent = [t for t in child.exits if now - t <= CRASH_LOOP_WINDOW_S]
            if len(recent) >= CRASH_LOOP_RESTARTS:
                raise CrashLoop(f"{child.name} exited {len(recent)} times in "
                                f"{CRASH_LOOP_WINDOW_S:.0f}s (last exit {_describe(code)}); "
                                "see its log lines above")
            delay = min(0.1 * 2 ** (len(recent) - 1), 10.0)
            child.restart_at = now + delay
            log.warning("%s exited (%s); restarting in %.1fs", child.name, _describe(code), delay)
            self.write_status()

    def restart_children(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self.spawn(child)

    def kill_stale_children(self) -> None:
        now = time.monotonic()
        wall = time.time()
        for child in self._children:
            if child.proc is None or now - child.started < BOOT_ALLOWANCE_S:
                continue
            age = heartbeat.age_s(child.heartbeat_file, wall)
            if age > self.config.heartbeat_timeout_s:
                log.error("%s missed its heartbeat for %.0fs; killing it", child.name, age)
                child.proc.kill()

    def drain(self) -> None:
        """Workers stop leasing, finish within the grace period and hand back the rest;
        then the server stops."""
        log.info("draining (grace %.0fs)", self.config.drain_grace_s)
        self._set_state("draining")  # /readyz says no from now on
        workers = [c for c in self._children if c.name.startswith("worker")]
        server = [c for c in self._children if c.name == "server"]
        monitor = [c for c in self._children if c.name == "monitor"]
        self._stop(workers, self.config.drain_grace_s + 5.0)
        self._stop(server, SERVER_STOP_S)
        self._stop(monitor, SERVER_STOP_S)

    def stop_all(self, grace_s: float) -> None:
        self._stop(self._children, grace_s)

    def _stop(self, children: list[Child], grace_s: float) -> None:
        running = [(c, c.proc) for c in children if c.proc is not None and c.proc.poll() is None]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child, proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, grace_s)
                proc.kill()
                proc.wait()
            self._forget(child)

    def _forget(self, child: Child) -> None:
        """A child has exited: its live gauges (actions in flight, queue depth) go with it;
        its counters and histograms stay in the sums."""
        assert child.proc is not None  # only a child that was started exits
        pid = child.proc.pid
        child.proc = None
        try:
            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except OSError as e:
            log.warning("cannot clear the metrics of %s (pid %d): %s", child.name, pid, e)

    # ---- status ---------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self._state = state
        self.write_status()

    def write_status(self) -> None:
        children = {}
        for c in self._children:
            running = c.proc is not None and c.proc.poll() is None
            children[c.name] = {
                "pid": c.proc.pid if c.proc is not None else None,
                "state": ("running" if running else
                          "restarting" if c.restart_at is not None else "stopped"),
                "restarts": c.restarts,
            }
        try:
            status.write_status(self.config.run_dir, "supervisor", {
                "pid": os.getpid(), "mode": self._mode, "state": self._state,
                "children": children})
        except OSError as e:  # informational: supervising goes on
            log.warning("cannot write the supervisor status file: %s", e)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale_shm(shm: str) -> None:
    """Heartbeat and metrics directories of supervisors that died without cleaning up (a
    SIGKILL): ours by owner, and no process holds their lock any more (a pid would not do:
    /dev/shm may be shared with Stokers in other pid namespaces)."""
    for entry in os.scandir(shm):
        if not re.match(r"stoker-\d+-", entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
            continue
        try:
            fd = os.open(os.path.join(entry.path, "lock"),
                         os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # not one of ours, or being made right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)


# Stoker's own processes (this one and every child, which inherit it) are the OOM killer's last
# choice, and actions (+1000, set by the spawn helper) its first: an action that takes the
# machine's or the pod's memory dies, not the supervisor, server, workers or monitor. Not
# -1000, which would make them unkillable even when they are the problem.
STOKER_OOM_SCORE_ADJ = -900


def _protect_from_oom() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(STOKER_OOM_SCORE_ADJ))
    except OSError as e:  # lowering it needs CAP_SYS_RESOURCE (not in the deployments' set)
        log.info("Stoker's OOM score stays as it is (%s); actions (+1000) are still the OOM "
                 "killer's first choice", e.strerror or e)
