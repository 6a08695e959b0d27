"""Helpers for the integration tests: a real `python -m engine up` process and a thin REAPI
client over plain gRPC stubs (no client library between the tests and the wire)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import status_pb2

from engine.proto import (
    bs_grpc,
    bs_pb2,
    error_details_pb2,
    operations_grpc,
    operations_pb2,
    re_grpc,
    re_pb2,
)

REPO = Path(__file__).resolve().parents[2]
SHA256 = re_pb2.DigestFunction.SHA256
BLAKE3 = re_pb2.DigestFunction.BLAKE3
MAX_BATCH = 4 * 1024 * 1024  # what Capabilities advertises; checked by a test
# The client may send more than the server accepts: the over-limit tests need that.
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
EXECUTE_TIMEOUT_S = 60.0
CANARY = "stoker-canary"  # the name every escape attempt tries to create
SECRET = b"the sentinel's secret, never to be read by an action\n"
# From an exec root (<data>/build/worker-N/<id>/root) up to the directory holding <data>.
UP_TO_BASE = "../" * 5
# More '..' than any path here is deep: from anywhere, this reaches /.
UP_TO_SLASH = "../" * 40

RUNNING: list[StokerProcess] = []  # started and not yet stopped, for failure logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the Stoker process -------------------------------------------------------------------


class StokerProcess:
    """`python -m engine up` with its stderr (all its log lines) captured to a file."""

    def __init__(self, data_dir: Path, log_path: Path, *, workers: int = 1,
                 concurrency: int = 2, default_timeout: str | None = "30s",
                 extra_args: Iterable[str] = (), monitor: bool = True,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.data_dir = data_dir
        # How the readiness probe reaches a TLS / API-key endpoint (--tls-cert, --api-key-file).
        self.credentials = credentials
        self.metadata = metadata
        self.log_path = log_path
        self.workers = workers
        self.concurrency = concurrency
        self.default_timeout = default_timeout
        self.extra_args = list(extra_args)
        self.port = free_port()
        # Ports of their own, so instances side by side never fight over 8080/9090.
        self.health_port = free_port() if monitor else None
        self.metrics_port = free_port() if monitor else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def build_dir(self) -> Path:
        return self.data_dir / "build"

    def start(self, ready_within: float = 30.0) -> None:
        """Start and wait until GetCapabilities answers; RuntimeError (with the log) if not."""
        python = REPO / ".venv" / "bin" / "python"
        argv = [
            str(python if python.exists() else Path(sys.executable)),
            "-m", "engine", "up",
            "--data-dir", str(self.data_dir),
            "--listen", self.address,
            "--workers", str(self.workers),
            "--concurrency", str(self.concurrency),
            *(["--default-timeout", self.default_timeout] if self.default_timeout else []),
            "--health-listen", f"127.0.0.1:{self.health_port}" if self.health_port else "off",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off",
            *self.extra_args,
        ]
        if self not in RUNNING:
            RUNNING.append(self)
        with open(self.log_path, "ab") as log:
            # Own session, so the SIGKILL fallback reaches the server and workers by group.
            self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_within
        with (grpc.secure_channel(self.address, self.credentials) if self.credentials
              else grpc.insecure_channel(self.address)) as channel:
            caps = re_grpc.CapabilitiesStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"stoker exited with code {self.proc.returncode} before "
                                       f"serving\n{self.log_tail()}")
                try:
                    caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=1.0,
                                         metadata=self.metadata or None)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"GetCapabilities did not answer within "
                                           f"{ready_within:.0f}s\n{self.log_tail()}") from None
                    time.sleep(0.1)

    def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM (drain), then SIGKILL to the whole group. The exit code, or None if killed."""
        proc = self.proc
        if self in RUNNING:
            RUNNING.remove(self)
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, since: int = 0, limit: int = 8000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        state = "running" if self.alive() else \
            f"exited {self.proc.returncode if self.proc else None}"
        return f"--- stoker log ({state}, last {limit} chars) ---\n{text[-limit:]}"


class ExecutorProcess(StokerProcess):
    """`python -m engine executor`: workers joined to a remote scheduler, configured by an
    executor.yaml written here. Ready once /readyz says a worker is connected. env: variables
    set (over this process's environment) for the child, e.g. EXECUTOR_API_KEY="" so that
    the caller's own cannot win over the file's api_key."""

    def __init__(self, data_dir: Path, log_path: Path, *, server: str, protocol: str,
                 yaml_extra: str = "", env: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(data_dir, log_path, **kwargs)
        self.server = server
        self.protocol = protocol
        self.yaml_extra = yaml_extra
        self.env = dict(env or {})
        self.config_path = data_dir.parent / f"{data_dir.name}-executor.yaml"

    def start(self, ready_within: float = 30.0) -> None:
        self.config_path.write_text(
            "executor:\n"
            f"  server: {self.server}\n"
            f"  protocol: {self.protocol}\n"
            + "".join(f"  {line}\n" for line in self.yaml_extra.splitlines() if line))
        self.config_path.chmod(0o600)  # it may hold an api_key
        python = REPO / ".venv" / "bin" / "python"
        argv = [
            str(python if python.exists() else Path(sys.executable)),
            "-m", "engine", "executor", "--config", str(self.config_path),
            "--data-dir", str(self.data_dir),
            "--workers", str(self.workers),
            "--concurrency", str(self.concurrency),
            *(["--default-timeout", self.default_timeout] if self.default_timeout else []),
            "--health-listen", f"127.0.0.1:{self.health_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            *self.extra_args,
        ]
        if self not in RUNNING:
            RUNNING.append(self)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + ready_within
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stoker executor exited with code {self.proc.returncode} "
                                   f"before it was ready\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stoker executor was not ready within {ready_within:.0f}s"
                                   f"\n{self.log_tail()}")
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.health_url}/readyz", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def statusz(self) -> dict:
        with urllib.request.urlopen(f"{self.health_url}/statusz", timeout=5) as reply:
            return json.loads(reply.read())

    def worker_pid(self, slot: int) -> int | None:
        try:
            return int((self.data_dir / "run" / f"worker-{slot}.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def start(process: StokerProcess) -> StokerProcess:
    """Start (or restart) an instance and wait until it serves; fail the test if it won't."""
    try:
        process.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    return process


# ---- digests and messages -----------------------------------------------------------------


def hash_hex(data: bytes, fn: int = SHA256) -> str:
    if fn == BLAKE3:
        return blake3.blake3(data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, fn: int = SHA256) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hash_hex(data, fn), size_bytes=len(data))


def key(d: re_pb2.Digest) -> tuple[str, int]:
    return d.hash, d.size_bytes


def blob_resource(d: re_pb2.Digest, fn: int = SHA256, *, compressed: bool = False,
                  upload: str | None = None, instance: str = "") -> str:
    parts = [instance] if instance else []
    if upload is not None:
        parts += ["uploads", upload]
    parts += ["compressed-blobs", "zstd"] if compressed else ["blobs"]
    if fn == BLAKE3:
        parts.append("blake3")
    parts += [d.hash, str(d.size_bytes)]
    return "/".join(parts)


@dataclass(frozen=True)
class File:
    data: bytes
    executable: bool = False


@dataclass(frozen=True)
class Symlink:
    target: str


# A tree spec: name -> bytes | File | Symlink | nested spec.
TreeSpec = dict


@dataclass
class Tree:
    root: re_pb2.Digest
    blobs: dict[tuple[str, int], bytes] = field(default_factory=dict)  # every blob of the tree
    directories: list[re_pb2.Directory] = field(default_factory=list)  # distinct, root first


def build_tree(spec: TreeSpec, fn: int = SHA256) -> Tree:
    """The Directory messages for spec, entries sorted by name as the spec requires."""
    tree = Tree(root=re_pb2.Digest())
    seen: set[tuple[str, int]] = set()

    def build(node: TreeSpec) -> re_pb2.Digest:
        d = re_pb2.Directory()
        for name in sorted(node):
            value = node[name]
            if isinstance(value, dict):
                d.directories.add(name=name, digest=build(value))
            elif isinstance(value, Symlink):
                d.symlinks.add(name=name, target=value.target)
            else:
                f = value if isinstance(value, File) else File(value)
                fd = digest_of(f.data, fn)
                tree.blobs[key(fd)] = f.data
                d.files.add(name=name, digest=fd, is_executable=f.executable)
        data = d.SerializeToString()
        dd = digest_of(data, fn)
        tree.blobs[key(dd)] = data
        if key(dd) not in seen:
            seen.add(key(dd))
            tree.directories.append(d)
        return dd

    tree.root = build(spec)
    # build() appends children first; GetTree order is root first.
    tree.directories.reverse()
    return tree


def command(argv: list[str], *, env: dict[str, str] | None = None,
            output_paths: Iterable[str] = (), output_files: Iterable[str] = (),
            output_directories: Iterable[str] = (),
            working_directory: str = "",
            platform: dict[str, str] | None = None) -> re_pb2.Command:
    cmd = re_pb2.Command(arguments=argv, working_directory=working_directory,
                         output_paths=list(output_paths), output_files=list(output_files),
                         output_directories=list(output_directories))
    for name in sorted(platform or {}):
        cmd.platform.properties.add(name=name, value=(platform or {})[name])
    env = {"PATH": "/usr/bin:/bin"} if env is None else env
    for name in sorted(env):
        cmd.environment_variables.add(name=name, value=env[name])
    return cmd


def status_of(err: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status an error carried in grpc-status-details-bin (or an empty one)."""
    for k, v in err.trailing_metadata() or ():
        if k == "grpc-status-details-bin":
            return status_pb2.Status.FromString(v)
    return status_pb2.Status()


def precondition_failure(status: status_pb2.Status) -> error_details_pb2.PreconditionFailure:
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            return failure
    raise AssertionError(f"no PreconditionFailure in status details: {status}")


# ---- the client ---------------------------------------------------------------------------


@dataclass
class Execution:
    action_digest: re_pb2.Digest
    operations: list[operations_pb2.Operation]

    @property
    def last(self) -> operations_pb2.Operation:
        return self.operations[-1]

    @property
    def stages(self) -> list[int]:
        return [metadata(op).stage for op in self.operations]

    @property
    def response(self) -> re_pb2.ExecuteResponse:
        op = self.last
        assert op.done, f"last operation not done: {op}"
        assert op.WhichOneof("result") == "response", f"operation has no response: {op}"
        response = re_pb2.ExecuteResponse()
        assert op.response.Unpack(response)
        return response

    @property
    def result(self) -> re_pb2.ActionResult:
        return self.response.result


def metadata(op: operations_pb2.Operation) -> re_pb2.ExecuteOperationMetadata:
    md = re_pb2.ExecuteOperationMetadata()
    assert op.metadata.Unpack(md), f"metadata is not ExecuteOperationMetadata: {op.metadata}"
    return md


def response_of(op: operations_pb2.Operation) -> re_pb2.ExecuteResponse:
    response = re_pb2.ExecuteResponse()
    assert op.response.Unpack(response)
    return response


class Client:
    def __init__(self, address: str, channel: grpc.Channel | None = None):
        self.address = address
        # A channel of the test's own: TLS, or one that adds an API key to every call.
        self.channel = channel or grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        self.caps = re_grpc.CapabilitiesStub(self.channel)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.exe = re_grpc.ExecutionStub(self.channel)
        self.ops = operations_grpc.OperationsStub(self.channel)
        self.bs = bs_grpc.ByteStreamStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # -- CAS

    def upload(self, blobs: Iterable[bytes], fn: int = SHA256) -> list[re_pb2.Digest]:
        """BatchUpdateBlobs in batches under the limit; every entry must come back OK."""
        digests = []
        batch: list[re_pb2.BatchUpdateBlobsRequest.Request] = []
        size = 0

        def flush() -> None:
            if not batch:
                return
            reply = self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                requests=batch, digest_function=fn), timeout=30)
            bad = [r for r in reply.responses if r.status.code != 0]
            assert not bad, f"BatchUpdateBlobs failed: {bad}"
            batch.clear()

        for data in blobs:
            d = digest_of(data, fn)
            digests.append(d)
            if size + len(data) > MAX_BATCH // 2:
                flush()
                size = 0
            batch.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data))
            size += len(data)
        flush()
        return digests

    def put(self, data: bytes, fn: int = SHA256) -> re_pb2.Digest:
        return self.upload([data], fn)[0]

    def put_message(self, msg, fn: int = SHA256) -> re_pb2.Digest:
        return self.put(msg.SerializeToString(), fn)

    def read(self, d: re_pb2.Digest, fn: int = SHA256) -> bytes:
        reply = self.cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[d], digest_function=fn), timeout=30)
        assert reply.responses[0].status.code == 0, reply.responses[0].status
        return reply.responses[0].data

    def missing(self, digests: Iterable[re_pb2.Digest], fn: int = SHA256) -> set[tuple[str, int]]:
        reply = self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=list(digests), digest_function=fn), timeout=30)
        return {key(d) for d in reply.missing_blob_digests}

    def put_tree(self, spec: TreeSpec, fn: int = SHA256) -> Tree:
        tree = build_tree(spec, fn)
        self.upload(tree.blobs.values(), fn)
        return tree

    # -- ByteStream

    def bs_write(self, resource: str, chunks: Iterable[bytes], *, start: int = 0,
                 finish: bool = True) -> bs_pb2.WriteResponse:
        def requests() -> Iterator[bs_pb2.WriteRequest]:
            offset = start
            chunk_list = list(chunks)
            for i, chunk in enumerate(chunk_list):
                last = i == len(chunk_list) - 1
                yield bs_pb2.WriteRequest(resource_name=resource if i == 0 else "",
                                          write_offset=offset, data=chunk,
                                          finish_write=finish and last)
                offset += len(chunk)

        return self.bs.Write(requests(), timeout=60)

    def bs_read(self, resource: str, offset: int = 0, limit: int = 0) -> bytes:
        return b"".join(r.data for r in self.bs.Read(bs_pb2.ReadRequest(
            resource_name=resource, read_offset=offset, read_limit=limit), timeout=60))

    # -- execution

    def action(self, cmd: re_pb2.Command, root: re_pb2.Digest, *,
               timeout: duration_pb2.Duration | float | None = None, do_not_cache: bool = False,
               fn: int = SHA256, salt: bytes | None = None,
               upload_command: bool = True) -> re_pb2.Digest:
        """Uploads the Command and the Action; a random salt keeps tests' actions distinct."""
        cmd_bytes = cmd.SerializeToString()
        cmd_digest = self.put(cmd_bytes, fn) if upload_command else digest_of(cmd_bytes, fn)
        action = re_pb2.Action(command_digest=cmd_digest, input_root_digest=root,
                               do_not_cache=do_not_cache,
                               salt=uuid.uuid4().bytes if salt is None else salt)
        if isinstance(timeout, duration_pb2.Duration):
            action.timeout.CopyFrom(timeout)
        elif timeout is not None:
            action.timeout.FromNanoseconds(int(timeout * 1e9))
        return self.put_message(action, fn)

    def execute(self, action_digest: re_pb2.Digest, *, skip_cache_lookup: bool = False,
                fn: int = SHA256, timeout: float = EXECUTE_TIMEOUT_S) -> Execution:
        ops = list(self.exe.Execute(re_pb2.ExecuteRequest(
            action_digest=action_digest, skip_cache_lookup=skip_cache_lookup,
            digest_function=fn), timeout=timeout))
        assert ops, "Execute returned no operation"
        return Execution(action_digest, ops)

    def run(self, argv: list[str] | str, inputs: TreeSpec | None = None, *,
            fn: int = SHA256, timeout: float | None = None, do_not_cache: bool = False,
            skip_cache_lookup: bool = False, **command_fields) -> Execution:
        """Run argv (a string is a /bin/sh script) with inputs as the input root."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        root = self.put_tree(inputs or {}, fn).root
        action = self.action(command(argv, **command_fields), root, timeout=timeout,
                             do_not_cache=do_not_cache, fn=fn)
        return self.execute(action, skip_cache_lookup=skip_cache_lookup, fn=fn)

    def output_tree(self, d: re_pb2.Digest, fn: int = SHA256) -> re_pb2.Tree:
        return re_pb2.Tree.FromString(self.read(d, fn))
