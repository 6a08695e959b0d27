"""No-op actions end to end (Execute → result) through a real `stoker up`.

EmbeddedStoker starts `python -m engine up` on a free loopback port with its own data
directory; run_noop_actions() sends distinct /bin/true actions from client threads and
reports the rate, each action's latency and the executor's own overhead per action (worker
time minus command time, from ExecutedActionMetadata).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.benchmark.scratch import remove_tree
from engine.proto import re_grpc, re_pb2

# The directory holding the engine package, so the child runs the code being measured.
_ENGINE_PARENT = str(Path(__file__).resolve().parents[2])
_START_TIMEOUT_S = 60.0


def _digest(b: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(b).hexdigest(), size_bytes=len(b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartError(RuntimeError):
    """`stoker up` did not come up; the message carries the end of its log."""


class EmbeddedStoker:
    """A `stoker up` of its own, in a temp directory searchable by the user actions run as
    (the system temp dir: pytest's and many home directories are 0700)."""

    def __init__(self, workers: int, concurrency: int, parent: str | None = None,
                 containment: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="stoker-bench-up-", dir=parent)
        os.chmod(self.dir, 0o755)  # actions run as nobody and must reach their exec roots
        self.log_path = os.path.join(self.dir, "stoker.log")
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_ENGINE_PARENT, env.get("PYTHONPATH", "")) if p)
        consent = []
        if containment:  # a weaker mechanism than the default, to measure what it costs
            env["STOKER_CONTAINMENT"] = containment
            # Where actions share the host's network `stoker up` wants this said.
            consent = ["--actions-share-network"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "up", "--data-dir", f"{self.dir}/data",
                 "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers),
                 "--concurrency", str(concurrency),
                 "--health-listen", "off", "--metrics-listen", "off", *consent],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            self._wait_ready(workers)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = grpc.channel_ready_future(self.channel)
        while True:
            if self.proc.poll() is not None:
                raise StartError(f"`stoker up` exited with status {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            try:
                ready.result(timeout=0.5)
                break
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise StartError(f"`stoker up` did not listen within {_START_TIMEOUT_S:.0f}"
                                     f" s:\n{self.log_tail()}") from None
        caps = re_grpc.CapabilitiesStub(self.channel)
        caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), wait_for_ready=True, timeout=30)
        # Workers open their bot sessions once the server is up; the warm-up actions
        # that callers run absorb any that is still starting.
        time.sleep(0.5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        remove_tree(self.dir)

    def __enter__(self) -> EmbeddedStoker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proc_stats() -> Iterator[tuple[int, list[bytes], float]]:
    """(pid, the /proc/PID/stat fields after the command name, CPU seconds used by it and its
    reaped children) of every live process."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        yield int(pid), fields, sum(int(x) for x in fields[11:15]) / tick


def session_cpu_seconds(session: int) -> dict[str, float]:
    """CPU seconds (user + system, reaped children included) used so far by the processes of
    a session, by role: 'server', 'workers' (their actions included) and 'supervisor'."""
    used = {"server": 0.0, "workers": 0.0, "supervisor": 0.0}
    for pid, fields, cpu in proc_stats():
        if int(fields[3]) != session:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        role = ("server" if b"server" in argv else "workers" if b"worker" in argv
                else "supervisor" if b"up" in argv else None)
        if role:
            used[role] += cpu
    return used


@dataclass
class NoopRun:
    rate: float  # actions per second, wall clock
    latencies_s: list[float]  # per action, Execute call to its result
    overheads_ms: list[float]  # per action, worker time minus command time


def run_noop_actions(channel: grpc.Channel, n: int, clients: int) -> NoopRun:
    """n distinct /bin/true actions (so none hits the action cache), clients at a time."""
    if n < 1 or clients < 1:
        raise ValueError(f"need at least one action and one client, got n={n} "
                         f"clients={clients}")
    cas = re_grpc.ContentAddressableStorageStub(channel)
    exe = re_grpc.ExecutionStub(channel)
    root = re_pb2.Directory().SerializeToString()
    salt = os.urandom(8).hex()
    blobs = [root]
    actions = []
    for i in range(n):
        cmd = re_pb2.Command(arguments=["/bin/true", f"{salt}-{i}"]).SerializeToString()
        act = re_pb2.Action(command_digest=_digest(cmd),
                            input_root_digest=_digest(root)).SerializeToString()
        blobs += [cmd, act]
        actions.append(_digest(act))
    for k in range(0, len(blobs), 2000):
        cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)
            for b in blobs[k:k + 2000]]), timeout=60)
    latencies: list[float] = []
    overheads: list[float] = []

    def one(d: re_pb2.Digest) -> None:
        t0 = time.perf_counter()
        for op in exe.Execute(re_pb2.ExecuteRequest(action_digest=d, skip_cache_lookup=True),
                              timeout=120):
            if op.done:
                r = re_pb2.ExecuteResponse()
                op.response.Unpack(r)
                if r.status.code or r.result.exit_code:
                    raise RuntimeError(f"no-op action failed: {r.status} exit "
                                       f"{r.result.exit_code}")
                m = r.result.execution_metadata
                worker = (m.worker_completed_timestamp.ToNanoseconds()
                          - m.worker_start_timestamp.ToNanoseconds())
                command = (m.execution_completed_timestamp.ToNanoseconds()
                           - m.execution_start_timestamp.ToNanoseconds())
                overheads.append((worker - command) / 1e6)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, actions))
    return NoopRun(n / (time.perf_counter() - t0), latencies, overheads)
