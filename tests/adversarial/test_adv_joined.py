"""Joined mode under attack: a real `stoker executor` whose scheduler and remote CAS are hostile.

Every attack runs a real executor process (tests/integration/support.py ExecutorProcess)
against a scheduler double (tests/doubles/), whose CAS is played by FakeCas, a fake defined
here that serves what the attack wants: a 10k-deep or over-wide tree, wrong bytes, reads
that stall forever, blobs that claim to be a terabyte, Directory blobs that are no
Directory. The scheduler attacks itself too: garbage tasks (the Buildbarn double without an
Action, the BuildBuddy double with a serialized_task that does not parse), more leases than
the worker has slots (FakeBots, a fake Remote Workers scheduler: there is no double for
one), and error messages quoting the API key and JWTs it was sent. Each attack must end in
a clear status for that action (never a crash of the worker, a hang, or a wrong byte in the
machine's local CAS), and the worker must serve the next action afterwards. Attacks that
are about the fetcher alone (stalls, measured with a short timeout; a disk-sized input)
run a RemoteFetcher against the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import uvloop
from google.protobuf import any_pb2
from google.rpc import code_pb2

from engine import digest as dg
from engine.cas.fetcher import FetchUnavailable, RemoteFetcher
from engine.cas.local_disk import LocalDiskStore
from engine.errors import ResourceExhausted
from engine.proto import (
    bots_grpc,
    bots_pb2,
    bs_grpc,
    bs_pb2,
    re_grpc,
    re_pb2,
)
from engine.server.bytestream_service import ByteStreamService
from engine.server.capabilities_service import CapabilitiesService
from engine.server.cas_service import CasService
from tests.adversarial.adv_support import cas_problems, http_get, remove_tree
from tests.doubles import buildbuddy_scheduler as bb_double
from tests.doubles.buildbarn_scheduler import BuildbarnSchedulerDouble, Job
from tests.doubles.buildbuddy_scheduler import JWT_HEADER, BuildBuddySchedulerDouble
from tests.doubles.cas import CasDouble
from tests.integration.support import ExecutorProcess, command, digest_of

pytestmark = pytest.mark.timeout(150)

MiB = 1 << 20
GiB = 1 << 30
Key = tuple[str, int]
ENDLESS_CAP = 32 * MiB  # the most an "endless" read sends before it fails: never a full disk
API_KEY = "adv-api-key-" + uuid.uuid4().hex


def key_of(d: re_pb2.Digest) -> Key:
    return d.hash, d.size_bytes


def fake_digest(label: str, size: int) -> re_pb2.Digest:
    """A digest of the right shape that no content of ours has: what a hostile CAS makes up."""
    return re_pb2.Digest(hash=hashlib.sha256(label.encode()).hexdigest(), size_bytes=size)


# ---- the fake CAS ---------------------------------------------------------------------------


class FakeCas(CasDouble):
    """A FAKE of the scheduler's CAS. Writes (FindMissingBlobs, BatchUpdateBlobs, ByteStream
    Write: the executor's outputs) and Capabilities are Stoker's own servicers over the
    double's store; reads serve, for each digest, first `lies` (bytes that are not the
    digest's), then `extra` (blobs only served, never stored: hostile trees), then the store.
    The ActionCache is the double's own. Digests in `stall` never finish reading (a
    ByteStream Read sends one chunk first); those in `endless` stream zeros, up to
    ENDLESS_CAP, then fail. GetTree answers one page of at most 1000 directories per call
    ("pages"), UNIMPLEMENTED ("unimplemented"), or one made-up directory per call with a
    fresh page token, forever ("endless", capped at 100k calls).
    Every call is recorded with the deadline the caller gave it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lies: dict[Key, bytes] = {}
        self.extra: dict[Key, bytes] = {}
        self.stall: set[Key] = set()
        self.endless: set[Key] = set()
        self.get_tree = "pages"
        self.calls: list[tuple[str, float | None]] = []  # (method, seconds left)
        self.read_keys: list[Key] = []  # every digest a read asked for
        self.stalled = 0  # reads stalled so far
        self.released = False
        self._release: asyncio.Event | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(_FakeCasService(self), server)
        bs_grpc.add_ByteStreamServicer_to_server(_FakeByteStream(self), server)
        # Buildbarn's workers write the ActionCache (the double checks each write).
        re_grpc.add_ActionCacheServicer_to_server(self.action_cache, server)

    def serve(self, data: bytes) -> re_pb2.Digest:
        d = digest_of(data)
        self.extra[key_of(d)] = data
        return d

    def serve_message(self, message) -> re_pb2.Digest:
        return self.serve(message.SerializeToString())

    def blob(self, k: Key) -> bytes | None:
        if k in self.lies:
            return self.lies[k]
        if k in self.extra:
            return self.extra[k]
        try:
            return self.store.read_bytes(dg.Digest(dg.SHA256, k[0], k[1]))
        except Exception:  # noqa: BLE001 - absent, or not a digest at all
            return None

    def note(self, method: str, context) -> None:
        self.calls.append((method, context.time_remaining()))

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def hang(self) -> None:
        """Until release(): what a stalled call does."""
        if self._release is None:
            self._release = asyncio.Event()
        self.stalled += 1
        if not self.released:
            await self._release.wait()

    def release(self) -> None:
        self.released = True
        if self._release is not None:
            self._release.set()


class _FakeCasService(CasService):
    def __init__(self, fake: FakeCas) -> None:
        super().__init__(fake.store)
        self.fake = fake

    async def FindMissingBlobs(self, request, context):
        self.fake.note("FindMissingBlobs", context)
        return await super().FindMissingBlobs(request, context)

    async def BatchUpdateBlobs(self, request, context):
        self.fake.note("BatchUpdateBlobs", context)
        return await super().BatchUpdateBlobs(request, context)

    async def BatchReadBlobs(self, request, context):
        fake = self.fake
        fake.note("BatchReadBlobs", context)
        reply = re_pb2.BatchReadBlobsResponse()
        for pb in request.digests:
            k = key_of(pb)
            fake.read_keys.append(k)
            if k in fake.stall:
                await fake.hang()
            entry = reply.responses.add(digest=pb)
            data = fake.blob(k)
            if data is None:
                entry.status.code = code_pb2.NOT_FOUND
            else:
                entry.data = data
        return reply

    async def GetTree(self, request, context):
        fake = self.fake
        fake.note("GetTree", context)
        if fake.get_tree == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no GetTree here")
        if key_of(request.root_digest) in fake.stall:
            await fake.hang()
        if fake.get_tree == "endless":
            n = int(request.page_token or 0)
            if n >= 100_000:
                return
            junk = re_pb2.Directory(files=[re_pb2.FileNode(
                name=f"junk-{n}", digest=digest_of(b""))])
            yield re_pb2.GetTreeResponse(directories=[junk], next_page_token=str(n + 1))
            return
        # Breadth first from the root, each digest once, what cannot be read or parsed is
        # left out (as the spec allows); one page per call.
        start = int(request.page_token or 0)
        out: list[re_pb2.Directory] = []
        seen = {key_of(request.root_digest)}
        pending = [request.root_digest]
        while pending and len(out) < start + 1000:
            pb = pending.pop(0)
            data = fake.blob(key_of(pb))
            try:
                # Left out too: one larger than a page may be (the double's message limit).
                directory = re_pb2.Directory.FromString(data) \
                    if data is not None and len(data) < 4 * MiB else None
            except Exception:  # noqa: BLE001 - not a Directory: left out
                directory = None
            if directory is None:
                continue
            out.append(directory)
            for child in directory.directories:
                if key_of(child.digest) not in seen:
                    seen.add(key_of(child.digest))
                    pending.append(child.digest)
        page = out[start:start + 1000]
        token = str(start + len(page)) if pending else ""
        yield re_pb2.GetTreeResponse(directories=page, next_page_token=token)


class _FakeByteStream(ByteStreamService):
    def __init__(self, fake: FakeCas) -> None:
        super().__init__(fake.store, str(fake.root / "uploads"), client_max_bytes=1 << 30)
        self.fake = fake

    async def Read(self, request, context):
        fake = self.fake
        fake.note("Read", context)
        h, size = request.resource_name.split("/")[-2:]
        k = (h, int(size))
        fake.read_keys.append(k)
        if k in fake.endless:
            sent = 0
            while sent < ENDLESS_CAP:
                yield bs_pb2.ReadResponse(data=bytes(MiB))
                sent += MiB
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the endless blob gave out")
        data = fake.blob(k)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        for n, start in enumerate(range(0, max(len(data), 1), MiB)):
            if n == 1 and k in fake.stall:
                await fake.hang()
            yield bs_pb2.ReadResponse(data=data[start:start + MiB])
        if k in fake.stall and len(data) <= MiB:
            await fake.hang()


# ---- the scheduler doubles, with the fake as their CAS ---------------------------------------


class HostileBarn(BuildbarnSchedulerDouble):
    """The Buildbarn scheduler double with FakeCas as its CAS; `strip_action` names jobs it
    hands out without their Action."""

    def __init__(self, root: Path, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.cas.close()
        self.cas = FakeCas(self.root / "fake-cas")
        self.strip_action: set[str] = set()

    @property
    def fake(self) -> FakeCas:
        return self.cas  # type: ignore[return-value]

    def assign(self, w, job: Job):
        response = super().assign(w, job)
        if job.name in self.strip_action:
            response.desired_state.executing.ClearField("action")
        return response

    def sent_with_action(self, job: Job) -> bool:
        return job.name not in self.strip_action

    def enqueue_action(self, action: re_pb2.Action) -> Job:
        """An Action as it stands (its Command and inputs wherever the test put them)."""
        if not action.HasField("timeout"):
            action.timeout.FromTimedelta(timedelta(seconds=30))
        return self.queue_action(action, self.cas.put_message(action))

    def enqueue_root(self, cmd: re_pb2.Command, root: re_pb2.Digest) -> Job:
        """An action whose input root is `root`, served by the fake however it likes."""
        return self.enqueue_action(re_pb2.Action(command_digest=self.cas.put_message(cmd),
                                                 input_root_digest=root))


@pytest.fixture
def base() -> Path:
    # Under /tmp, not pytest's 0700 basetemp: action uids must reach their exec roots.
    path = Path(tempfile.mkdtemp(prefix="stoker-advj-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    remove_tree(path)


def executor_process(base: Path, server: str, protocol: str, *, concurrency: int = 2,
                     yaml_extra: str = "") -> ExecutorProcess:
    return ExecutorProcess(base / "data", base / "executor.log", server=server,
                           protocol=protocol, concurrency=concurrency,
                           yaml_extra="drain_grace: 3s\n" + yaml_extra)


@contextlib.asynccontextmanager
async def running(process: ExecutorProcess, *stoppers: Callable[[], None]
                  ) -> AsyncIterator[ExecutorProcess]:
    """The executor started (off the event loop: the doubles serve on it) and stopped after,
    whatever happened; its log is printed (pytest shows it when the test failed)."""
    try:
        await asyncio.to_thread(process.start)
        yield process
    finally:
        for stop in stoppers:
            stop()
        await asyncio.to_thread(process.stop, 20)
        print(process.log_tail(limit=12000))


@contextlib.asynccontextmanager
async def barn(base: Path, *, concurrency: int = 2, yaml_extra: str = ""
               ) -> AsyncIterator[tuple[HostileBarn, ExecutorProcess]]:
    """A Buildbarn double (FakeCas its CAS) and a real executor joined to it."""
    double = HostileBarn(base / "barn", busy_sync_s=0.5, idle_poll_s=1.0)
    await double.start()
    try:
        process = executor_process(base, double.target, "buildbarn", concurrency=concurrency,
                                   yaml_extra=yaml_extra)
        async with running(process, double.fake.release):
            yield double, process
    finally:
        await double.stop()
        double.close()
    assert not double.violations, double.violations


def echo(text: str) -> re_pb2.Command:
    return command(["/bin/sh", "-c", f"echo {text}"])


async def still_serving(double: HostileBarn, process: ExecutorProcess, inputs: dict | None = None,
                        expect: bytes | None = None) -> None:
    """The worker is alive, healthy and runs an ordinary action (cat of its input, if
    given) to the right result."""
    assert process.alive(), process.log_tail()
    nonce = uuid.uuid4().hex
    if inputs:
        name = next(iter(inputs))
        job = double.enqueue(command(["/bin/cat", name]), inputs)
        nonce_out = expect if expect is not None else inputs[name]
    else:
        job = double.enqueue(echo(nonce))
        nonce_out = f"{nonce}\n".encode()
    response = await double.result(job, timeout=60)
    assert response.status.code == code_pb2.OK, (response.status, process.log_tail())
    assert response.result.exit_code == 0, response.result
    assert double.cas.get(response.result.stdout_digest) == nonce_out
    code, body = await asyncio.to_thread(http_get, process.health_url + "/healthz")
    assert code == 200, body


def local_cas_problems(process: ExecutorProcess) -> list[str]:
    return cas_problems(process.data_dir)


async def outcome(double: HostileBarn, job: Job, within: float) -> tuple[re_pb2.ExecuteResponse,
                                                                            float]:
    start = time.monotonic()
    response = await double.result(job, timeout=within)
    return response, time.monotonic() - start


# ---- 1. a 10k-deep tree -----------------------------------------------------------------------


def deep_chain(fake: FakeCas, depth: int) -> re_pb2.Digest:
    """A chain of `depth` Directories below the root (d/d/d/.../bottom.txt), only served."""
    d = fake.serve_message(re_pb2.Directory(files=[re_pb2.FileNode(
        name="bottom.txt", digest=fake.put(b"bottom\n"))]))
    for _ in range(depth):
        d = fake.serve_message(re_pb2.Directory(directories=[re_pb2.DirectoryNode(
            name="d", digest=d)]))
    return d


@pytest.mark.parametrize("get_tree", ["pages", "unimplemented"])
def test_a_10k_deep_tree_is_refused_quickly(base, get_tree):
    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            fake.get_tree = get_tree
            root = deep_chain(fake, 10_000)
            job = double.enqueue_root(echo("never"), root)
            response, took = await outcome(double, job, 90)
            print(f"deep tree ({get_tree}): {took:.1f}s, {len(fake.calls)} CAS calls, "
                  f"{response.status}")
            assert response.status.code == code_pb2.INVALID_ARGUMENT, response.status
            assert "256" in response.status.message and "deep" in response.status.message
            assert took < 20, took
            reads = fake.methods().count("BatchReadBlobs") + fake.methods().count("Read")
            assert reads < 400, f"{reads} reads for a tree refused at depth 256"
            assert process.alive()
            # Exactly as deep as the limit allows: it runs.
            job = double.enqueue_root(command(["/bin/sh", "-c", (
                'p=""; i=0; while [ $i -lt 256 ]; do p="${p}d/"; i=$((i+1)); done; '
                'cat "${p}bottom.txt"')]), deep_chain(fake, 256))
            response, _ = await outcome(double, job, 60)
            assert response.status.code == code_pb2.OK, response.status
            assert double.cas.get(response.result.stdout_digest) == b"bottom\n"
            await still_serving(double, process)
            assert not local_cas_problems(process)
    asyncio.run(main())


def test_gettree_pages_without_end_are_cut_short(base):
    """A GetTree that answers every call with one more made-up directory and a fresh page
    token: the fetch stops asking (the walk reads what it lacks by digest), the action
    runs, in bounded time and calls."""
    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            fake.get_tree = "endless"
            job = double.enqueue(command(["/bin/cat", "a/b/in.txt"]),
                                 {"a": {"b": {"in.txt": b"through the endless tree\n"}}})
            response, took = await outcome(double, job, 120)
            calls = fake.methods().count("GetTree")
            print(f"endless GetTree: {took:.1f}s, {calls} GetTree calls, {response.status}")
            assert response.status.code == code_pb2.OK, response.status
            assert double.cas.get(response.result.stdout_digest) == \
                b"through the endless tree\n"
            assert took < 30 and calls <= 1100, (took, calls)
            await still_serving(double, process)
    asyncio.run(main())


# ---- 4. Directory blobs that lie about what they are ----------------------------------------


def bad_trees(fake: FakeCas) -> dict[str, tuple[re_pb2.Digest, int, str]]:
    """name -> (input root, status code, fragment of the message)."""
    file = fake.put(b"x")
    out: dict[str, tuple[re_pb2.Digest, int, str]] = {}
    not_a_dir = fake.serve(b"\xff\xff\xff\xff not a Directory")
    out["not a Directory"] = (fake.serve_message(re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="sub", digest=not_a_dir)])), code_pb2.INVALID_ARGUMENT,
        "not a")
    out["root not a Directory"] = (not_a_dir, code_pb2.INVALID_ARGUMENT, "not a")
    for label, name in (("dotdot", ".."), ("slash", "a/b"), ("nul", "a\0b"), ("dot", "."),
                        ("empty", "")):
        out[f"file named {label}"] = (fake.serve_message(re_pb2.Directory(files=[
            re_pb2.FileNode(name=name, digest=file)])), code_pb2.INVALID_ARGUMENT,
            "invalid entry name")
        out[f"dir named {label}"] = (fake.serve_message(re_pb2.Directory(directories=[
            re_pb2.DirectoryNode(name=name, digest=fake.serve(b""))])),
            code_pb2.INVALID_ARGUMENT, "invalid entry name")
    out["duplicate names"] = (fake.serve_message(re_pb2.Directory(
        files=[re_pb2.FileNode(name="x", digest=file)],
        directories=[re_pb2.DirectoryNode(name="x", digest=digest_of(b""))])),
        code_pb2.INVALID_ARGUMENT, "more than one entry")
    out["escaping symlink"] = (fake.serve_message(re_pb2.Directory(symlinks=[
        re_pb2.SymlinkNode(name="up", target="../../etc/passwd")])),
        code_pb2.INVALID_ARGUMENT, "outside the input root")
    # A cycle: the root claims to hold itself. Content addressing makes that impossible
    # unless the CAS serves bytes that are not the digest's: caught as such.
    cyclic = fake_digest("cycle", 80)
    fake.lies[key_of(cyclic)] = re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="loop", digest=cyclic)]).SerializeToString()
    out["cycle"] = (cyclic, code_pb2.UNAVAILABLE, "does not match")
    # 200,001 entries (the limit is 200,000 in one directory), each a distinct directory
    # that nobody serves: refused as too wide, never fetched (or reported missing).
    wide = re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name=f"d{i:06d}", digest=fake_digest(f"w{i}", 10))
        for i in range(200_001)])
    out["200k+1 subdirectories"] = (fake.serve_message(wide), code_pb2.INVALID_ARGUMENT,
                                    "200000")
    return out


@pytest.mark.parametrize("get_tree", ["pages", "unimplemented"])
def test_directory_blobs_that_lie_are_refused_by_name(base, get_tree):
    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            fake.get_tree = get_tree
            cases = bad_trees(fake)
            jobs = {name: double.enqueue_root(echo("never"), root)
                    for name, (root, _, _) in cases.items()}
            problems = []
            for name, job in jobs.items():
                response, took = await outcome(double, job, 60)
                _, code, fragment = cases[name]
                status = response.status
                print(f"{name}: {took:.1f}s {code_pb2.Code.Name(status.code)} "
                      f"{status.message[:200]!r}")
                if status.code != code or fragment not in status.message:
                    problems.append(f"{name}: {status.code} {status.message[:300]!r}")
            assert not problems, "\n".join(problems)
            wide = [k for k in fake.read_keys if k[0] == fake_digest("w0", 10).hash]
            assert not wide, "the children of a too-wide directory were fetched"
            await still_serving(double, process)
            assert not local_cas_problems(process)
    asyncio.run(main())


# ---- 2. wrong bytes for an input ------------------------------------------------------------


def in_local_cas(process: ExecutorProcess, d: re_pb2.Digest) -> bool:
    top = process.data_dir / "cache" / "cas"
    return any(name.startswith(f"{d.hash}-{d.size_bytes}")
               for _, _, names in os.walk(top) for name in names)


def test_wrong_bytes_from_the_remote_never_reach_the_local_cas(base):
    small = b"the true small input\n" + os.urandom(64)
    large = os.urandom(6 * MiB)  # past the batch limit: read through ByteStream
    short, long = os.urandom(3 * MiB), os.urandom(3 * MiB)
    cmd_text = echo("from the true command")

    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            cases = {
                "small, one bit flipped": ({"in.bin": small},
                                           small[:-1] + bytes([small[-1] ^ 1])),
                "large, other bytes": ({"in.bin": large}, large[:MiB] + os.urandom(5 * MiB)),
                "large, cut short": ({"in.bin": short}, short[:2 * MiB]),
                "large, too long": ({"in.bin": long}, long + b"more"),
            }
            for name, (inputs, lie) in cases.items():
                truth = inputs["in.bin"]
                d = digest_of(truth)
                fake.lies[key_of(d)] = lie
                job = double.enqueue(command(["/bin/cat", "in.bin"]), inputs)
                response, took = await outcome(double, job, 60)
                print(f"{name}: {took:.1f}s {response.status}")
                assert response.status.code == code_pb2.UNAVAILABLE, (name, response.status)
                assert "does not match" in response.status.message, response.status
                assert d.hash in response.status.message
                assert not in_local_cas(process, d), f"{name}: the lie is in the local CAS"
                del fake.lies[key_of(d)]
                # The true blob, asked for again: the true content, on this same worker.
                await still_serving(double, process, inputs)
                assert in_local_cas(process, d)
            # A lying Command: refused the same way; the true one runs after.
            cmd_digest = digest_of(cmd_text.SerializeToString())
            fake.lies[key_of(cmd_digest)] = echo("from a forged command").SerializeToString()
            job = double.enqueue(cmd_text)
            response, _ = await outcome(double, job, 60)
            assert response.status.code == code_pb2.UNAVAILABLE, response.status
            fake.lies.clear()
            job = double.enqueue(cmd_text)
            response, _ = await outcome(double, job, 60)
            assert response.status.code == code_pb2.OK, response.status
            assert double.cas.get(response.result.stdout_digest) == b"from the true command\n"
            assert not local_cas_problems(process)
            assert not os.listdir(process.data_dir / "cache" / "tmp")
    asyncio.run(main())


# ---- 5. inputs that claim to be huge ---------------------------------------------------------


def test_inputs_declared_huge_are_refused_before_any_byte(base):
    """A file of 1 TB, five of 1 GiB (more than the 2 GiB local CAS together), a Command and
    an input root of 1 TB: refused at once (RESOURCE_EXHAUSTED or INVALID_ARGUMENT), never
    read. (The fake would stream zeros for them, ENDLESS_CAP at most, then fail.)"""
    async def main():
        async with barn(base, yaml_extra="local_cache:\n  max_size_bytes: 2G\n") \
                as (double, process):
            fake = double.fake
            tb = fake_digest("terabyte", 1 << 40)
            gigs = [fake_digest(f"gig{i}", GiB) for i in range(5)]
            fake.endless.update(key_of(d) for d in [tb, *gigs])
            one = double.enqueue_root(echo("never"), fake.serve_message(re_pb2.Directory(
                files=[re_pb2.FileNode(name="huge.bin", digest=tb)])))
            five = double.enqueue_root(echo("never"), fake.serve_message(re_pb2.Directory(
                files=[re_pb2.FileNode(name=f"g{i}.bin", digest=d)
                       for i, d in enumerate(gigs)])))
            cmd_tb = fake_digest("command", 1 << 40)
            root_tb = fake_digest("root", 1 << 40)
            fake.endless.update({key_of(cmd_tb), key_of(root_tb)})
            huge_cmd = double.enqueue_action(re_pb2.Action(
                command_digest=cmd_tb, input_root_digest=fake.serve(b"")))
            huge_root = double.enqueue_root(echo("never"), root_tb)
            problems = []
            for name, job in (("1 TB file", one), ("5 x 1 GiB", five),
                              ("1 TB Command", huge_cmd), ("1 TB input root", huge_root)):
                response, took = await outcome(double, job, 60)
                status = response.status
                print(f"{name}: {took:.1f}s {code_pb2.Code.Name(status.code)} "
                      f"{status.message[:300]!r}")
                if status.code not in (code_pb2.RESOURCE_EXHAUSTED, code_pb2.INVALID_ARGUMENT):
                    problems.append(f"{name}: {status.code} {status.message[:300]!r}")
            read = [k for k in fake.read_keys if k in fake.endless]
            assert not problems, "\n".join(problems)
            assert not read, f"{len(read)} reads of blobs declared huge"
            assert not os.listdir(process.data_dir / "cache" / "tmp")
            await still_serving(double, process, {"in.txt": b"small is fine\n"})
            assert not local_cas_problems(process)
    asyncio.run(main())


# ---- 3. a remote CAS that stalls -------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(root: Path) -> AsyncIterator[tuple[FakeCas, str]]:
    """FakeCas alone on a loopback port, for a RemoteFetcher."""
    fake = FakeCas(root)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    fake.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        fake.release()
        await server.stop(0)
        fake.close()


@contextlib.asynccontextmanager
async def fetcher(address: str, store: LocalDiskStore, timeout: float
                  ) -> AsyncIterator[RemoteFetcher]:
    async with grpc.aio.insecure_channel(address) as channel:
        f = RemoteFetcher(channel, store, timeout=timeout)
        try:
            yield f
        finally:
            f.close()


def test_stalls_are_bounded_by_the_fetchers_timeout(tmp_path):
    """BatchReadBlobs, GetTree and a ByteStream Read that stall forever (the Read after its
    first MiB of a blob that claims 200 MiB): each fails as UNAVAILABLE (retryable) within
    a few timeouts, leaves nothing in the store, and the blob comes in whole once the
    remote behaves. A Read's deadline grows with the blob's size (1 s per MB), so the
    stalled Read must be cut by the time since its last message, not by that (and read on
    once only: the second stall ends it)."""
    timeout = 2.0
    small = b"small blob " + os.urandom(100)
    big = os.urandom(6 * MiB)  # past the batch limit: a ByteStream Read
    claimed = fake_digest("claims 200 MiB", 200 * MiB)

    async def main():
        async with fake_server(tmp_path / "fake") as (fake, address):
            small_d, big_d = fake.put(small), fake.put(big)
            tree = re_pb2.Directory(files=[re_pb2.FileNode(name="s", digest=small_d)])
            root = fake.put_message(tree)
            fake.lies[key_of(claimed)] = bytes(2 * MiB)
            fake.stall.update({key_of(small_d), key_of(big_d), key_of(claimed), key_of(root)})
            with LocalDiskStore(str(tmp_path / "local")) as store:
                async with fetcher(address, store, timeout) as f:
                    cases = {"BatchReadBlobs": f.fetch_blobs(dg.SHA256, [dg.from_proto(
                                 dg.SHA256, small_d)]),
                             "Read": f.fetch_blobs(dg.SHA256, [dg.from_proto(
                                 dg.SHA256, big_d)]),
                             "Read of a blob claiming 200 MiB": f.fetch_blobs(
                                 dg.SHA256, [dg.from_proto(dg.SHA256, claimed)]),
                             "GetTree": f.fetch_tree(dg.SHA256, dg.from_proto(dg.SHA256,
                                                                               root))}
                    for name, work in cases.items():
                        start = time.monotonic()
                        with pytest.raises(FetchUnavailable) as info:
                            await asyncio.wait_for(work, 30)
                        took = time.monotonic() - start
                        print(f"{name}: {took:.1f}s: {info.value}")
                        assert took < 4 * timeout, (name, took)
                        assert info.value.retryable
                    assert not os.listdir(os.path.join(store.root, "tmp"))
                    assert not any(store.has(dg.from_proto(dg.SHA256, d))
                                   for d in (small_d, big_d, claimed))
                    fake.stall.clear()
                    await asyncio.wait_for(f.fetch_tree(
                        dg.SHA256, dg.from_proto(dg.SHA256, root)), 10)
                    await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [
                        dg.from_proto(dg.SHA256, d) for d in (small_d, big_d)]), 10)
                    assert store.read_bytes(dg.from_proto(dg.SHA256, small_d)) == small
                    assert store.read_bytes(dg.from_proto(dg.SHA256, big_d)) == big
            bound = timeout + claimed.size_bytes / 1e6 + 1
            assert all(left is not None and left < bound for _, left in fake.calls), fake.calls
    uvloop.run(main())


def test_a_stalled_input_holds_one_slot_until_taken_back(base):
    """One action's input stalls forever: the other slot keeps running actions, every CAS
    call carries a deadline, and when the scheduler takes the stalled action back the
    worker lets go of it (the fetch lock with it: the next action needing that blob gets
    it once the CAS behaves)."""
    blob = os.urandom(6 * MiB)

    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            d = digest_of(blob)
            fake.stall.add(key_of(d))
            stuck = double.enqueue(command(["/bin/sh", "-c", "wc -c < in.bin"]),
                                   {"in.bin": blob})
            await double.until(lambda: fake.stalled > 0, timeout=30, what="the stall")
            for _ in range(3):
                await still_serving(double, process)
            assert stuck.state == "executing" and stuck.stages == ["fetching_inputs"], \
                stuck.stages
            double.revoke(stuck)
            await double.until(lambda: stuck.state == "revoked", timeout=30,
                               what="the stalled action taken back")
            fake.stall.clear()
            job = double.enqueue(command(["/bin/sh", "-c", "wc -c < in.bin"]),
                                 {"in.bin": blob})
            response, took = await outcome(double, job, 30)
            assert response.status.code == code_pb2.OK, response.status
            assert double.cas.get(response.result.stdout_digest).strip() == \
                str(len(blob)).encode()
            await still_serving(double, process)
            no_deadline = [m for m, left in fake.calls if left is None]
            assert not no_deadline, f"CAS calls without a deadline: {no_deadline}"
            assert not local_cas_problems(process)
    asyncio.run(main())


def test_a_terabyte_input_is_refused_by_the_disk_it_would_fill(tmp_path):
    """With no size limit on the local CAS, the disk's free space is the limit."""
    tb = fake_digest("terabyte", 1 << 40)

    async def main():
        async with fake_server(tmp_path / "fake") as (fake, address):
            fake.endless.add(key_of(tb))
            with LocalDiskStore(str(tmp_path / "local"), 0) as store:
                async with fetcher(address, store, 5) as f:
                    with pytest.raises(ResourceExhausted) as info:
                        await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [
                            dg.from_proto(dg.SHA256, tb)]), 30)
                assert "disk" in str(info.value), info.value
                assert not os.listdir(os.path.join(store.root, "tmp"))
            assert not fake.read_keys
    uvloop.run(main())


# ---- 6. garbage from the scheduler -----------------------------------------------------------


def test_garbage_actions_from_buildbarn_fail_alone(base):
    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            cases: dict[str, tuple[Job, int, str]] = {}
            job = double.enqueue(echo("never"))
            double.strip_action.add(job.name)
            cases["no Action"] = (job, code_pb2.INVALID_ARGUMENT, "no Action")
            job = double.enqueue(echo("never"))
            job.digest_function = 99
            cases["unknown digest function"] = (job, code_pb2.INVALID_ARGUMENT, "99")
            cases["malformed command digest"] = (double.enqueue_action(re_pb2.Action(
                command_digest=re_pb2.Digest(hash="zz", size_bytes=3),
                input_root_digest=fake.put(b""))), code_pb2.INVALID_ARGUMENT, "hash")
            cases["negative size"] = (double.enqueue_action(re_pb2.Action(
                command_digest=re_pb2.Digest(hash="ab" * 32, size_bytes=-5),
                input_root_digest=fake.put(b""))), code_pb2.INVALID_ARGUMENT, "size")
            cases["Command is garbage"] = (double.enqueue_action(re_pb2.Action(
                command_digest=fake.put(b"\xff\xff\xff\xff garbage"),
                input_root_digest=fake.put(b""))), code_pb2.INVALID_ARGUMENT, "not a Command")
            cases["Command without arguments"] = (double.enqueue_action(re_pb2.Action(
                command_digest=fake.put_message(re_pb2.Command()),
                input_root_digest=fake.put(b""))), code_pb2.INVALID_ARGUMENT, "arguments")
            cases["Command missing"] = (double.enqueue_action(re_pb2.Action(
                command_digest=fake_digest("nobody has it", 40),
                input_root_digest=fake.put(b""))), code_pb2.FAILED_PRECONDITION, "missing")
            problems = []
            for name, (job, code, fragment) in cases.items():
                response, took = await outcome(double, job, 60)
                status = response.status
                print(f"{name}: {took:.1f}s {code_pb2.Code.Name(status.code)} "
                      f"{status.message[:200]!r}")
                if status.code != code or fragment not in status.message or took > 10:
                    problems.append(f"{name}: {took:.1f}s {status.code} "
                                    f"{status.message[:300]!r}")
            assert not problems, "\n".join(problems)
            await still_serving(double, process)
    asyncio.run(main())


class _Garbled:
    """Stands in for a task's ExecutionTask in the BuildBuddy double: the lease carries
    `data` instead of the serialized task; everything else the double reads is the task's."""

    def __init__(self, execution: re_pb2.ExecutionTask, data: bytes) -> None:
        self._execution = execution
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        return self.data

    def __getattr__(self, name: str):
        return getattr(self._execution, name)


class _EchoingChecks(bb_double._Checks):
    """The double's API-key check, except that while `echo_refusals` is set it refuses every
    scheduler call UNAUTHENTICATED and quotes the key and JWT it was sent (as a careless
    or hostile scheduler may): what it quotes must not reach Stoker's log."""

    async def intercept_service(self, continuation, details):
        double = self._double
        if (getattr(double, "echo_refusals", False) and
                details.method.startswith(bb_double._SCHEDULER)) or \
                (getattr(double, "echo_cas", False) and
                 details.method.startswith((*bb_double._CAS_METHODS, "/build.bazel.remote."
                                            "execution.v2.Execution/"))):
            md = [(m[0], m[1]) for m in (details.invocation_metadata or ())]
            sent = {k: v for k, v in md if k in (bb_double.API_KEY_HEADER, JWT_HEADER)}
            message = f"credentials {sent} are not valid here"

            async def refuse_unary(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            async def refuse_stream(request_iterator, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            async def refuse_server_stream(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # an async generator, as grpc wants for a server stream

            method = details.method
            if method.endswith(("/RegisterAndStreamWork", "/LeaseTask")):
                return grpc.stream_stream_rpc_method_handler(refuse_stream)
            if method.endswith(("/Write", "/PublishOperation")):
                return grpc.stream_unary_rpc_method_handler(refuse_stream)
            if method.endswith(("/Read", "/GetTree")):
                return grpc.unary_stream_rpc_method_handler(refuse_server_stream)
            return grpc.unary_unary_rpc_method_handler(refuse_unary)
        return await super().intercept_service(continuation, details)


@contextlib.asynccontextmanager
async def buddy(base: Path, monkeypatch, *, concurrency: int = 2, yaml_extra: str = ""
                ) -> AsyncIterator[tuple[BuildBuddySchedulerDouble, ExecutorProcess]]:
    """The BuildBuddy double (API key required, a JWT per task) and a real executor joined
    to it, with debug logging on."""
    monkeypatch.setattr(bb_double, "_Checks", _EchoingChecks)
    double = BuildBuddySchedulerDouble(base / "buddy", api_key=API_KEY)
    await double.start()
    try:
        process = executor_process(
            base, double.target, "buildbuddy", concurrency=concurrency,
            yaml_extra=f"api_key: {API_KEY}\nenable_debug_logging: true\n" + yaml_extra)
        async with running(process):
            await double.until(lambda: len(double.executors) == 1, timeout=30,
                               what="the executor's registration")
            yield double, process
    finally:
        await double.stop()
        double.close()


def test_garbage_tasks_from_buildbuddy_fail_alone(base, monkeypatch):
    async def main():
        async with buddy(base, monkeypatch) as (double, process):
            cases: dict[str, tuple[str, int, str]] = {}

            def garble(task_id: str, data: bytes | None = None, **clear) -> str:
                task = double.tasks[task_id]
                execution = re_pb2.ExecutionTask()
                execution.CopyFrom(task.execution)
                for field, sub in clear.items():
                    if sub is None:
                        execution.ClearField(field)
                    else:
                        getattr(execution, field).digest_function = sub
                task.execution = _Garbled(execution, data if data is not None
                                          else execution.SerializeToString())
                return task_id

            cases["not an ExecutionTask"] = (garble(double.enqueue(echo("never")),
                                                    b"\xff\xff\xff\xff garbage"),
                                             code_pb2.INVALID_ARGUMENT, "not an ExecutionTask")
            cases["no Action"] = (garble(double.enqueue(echo("never")), action=None),
                                  code_pb2.INVALID_ARGUMENT, "no Action")
            cases["digest function 99"] = (garble(double.enqueue(echo("never")),
                                                  execute_request=99),
                                           code_pb2.INVALID_ARGUMENT, "99")
            cases["no arguments"] = (double.enqueue(re_pb2.Command()),
                                     code_pb2.INVALID_ARGUMENT, "arguments")
            problems = []
            for name, (task_id, code, fragment) in cases.items():
                start = time.monotonic()
                response = await double.result(task_id, timeout=60)
                took = time.monotonic() - start
                status = response.status
                print(f"{name}: {took:.1f}s {code_pb2.Code.Name(status.code)} "
                      f"{status.message[:200]!r}")
                if status.code != code or fragment not in status.message or took > 10:
                    problems.append(f"{name}: {took:.1f}s {status.code} "
                                    f"{status.message[:300]!r}")
            assert not problems, "\n".join(problems)
            # Stoker cannot know the action digest of a task it cannot read: the double
            # says so about the COMPLETED it published for it.
            double.take_violations("action_digest")
            task_id = double.enqueue(echo("still here"))
            response = await double.result(task_id, timeout=60)
            assert response.status.code == code_pb2.OK, response.status
            assert double.read_blob(response.result.stdout_digest) == b"still here\n"
            assert process.alive()
        assert not double.violations, double.violations
    asyncio.run(main())


# ---- 8. credentials stay out of logs and /statusz ---------------------------------------------


def test_credentials_never_reach_logs_or_statusz(base, monkeypatch):
    """The API key and every task's JWT, with debug logging on, through ordinary actions,
    failures, garbage, and a scheduler and CAS that answer UNAUTHENTICATED quoting the
    credentials they were sent: none of them in the executor's log, /statusz or /metrics."""
    async def main():
        async with buddy(base, monkeypatch) as (double, process):
            ok = double.enqueue(command(["/bin/cat", "in.txt"]), {"in.txt": b"hello\n"})
            fails = double.enqueue(command(["/bin/sh", "-c", "echo oops >&2; exit 3"]))
            assert (await double.result(ok, timeout=60)).status.code == code_pb2.OK
            assert (await double.result(fails, timeout=60)).result.exit_code == 3
            # The CAS (and the publish stream) refuse, quoting the JWT they were sent.
            double.echo_cas = True
            refused = double.enqueue(command(["/bin/cat", "other.txt"]),
                                     {"other.txt": b"never fetched\n"})
            await double.until(lambda: double.tasks[refused].attempts >= 2, timeout=60,
                               what="the refused task tried twice")
            double.echo_cas = False
            await double.result(refused, timeout=60)
            # The scheduler refuses, quoting the API key (and a lease's JWT).
            double.echo_refusals = True
            size = process.log_size()
            await double.stop()
            await double.start()  # the work stream breaks; reconnects are refused
            await double.until(lambda: process.log_size() > size + 200, timeout=30,
                               what="the refusals logged")
            await asyncio.sleep(2)
            double.echo_refusals = False
            again = double.enqueue(echo("after the refusals"))
            response = await double.result(again, timeout=60)
            assert response.status.code == code_pb2.OK, response.status
            secrets = {"the API key": API_KEY} | {
                f"the JWT of {t.task_id[-20:]}": t.jwt for t in double.tasks.values()}
            statusz = (await asyncio.to_thread(http_get, process.health_url + "/statusz"))[1]
            metrics = (await asyncio.to_thread(http_get, process.metrics_url + "/metrics"))[1]
            log = process.log_path.read_text(errors="replace")
            assert "UNAUTHENTICATED" in log  # the refusals were logged...
            leaks = [f"{what} in {where}" for what, secret in secrets.items()
                     for where, text in (("the log", log), ("/statusz", statusz.decode()),
                                         ("/metrics", metrics.decode())) if secret in text]
            assert not leaks, leaks  # ...without what they quoted
        double.take_violations("api key")
        double.take_violations("action_digest")
    asyncio.run(main())


# ---- 7 (and 6). a Remote Workers scheduler that offers too much, or garbage ----------------


class FakeBots(bots_grpc.BotsServicer):
    """A FAKE Remote Workers API scheduler (there is no double for one): every UpdateBotSession
    reply carries every lease in `offers` at once, however many the bot can run. A lease
    handed back (COMPLETED, UNAVAILABLE) is offered again under a new id, as a scheduler
    retries; every other outcome is kept in `results` by the lease's first id. A reply with
    nothing new waits up to 0.5 s for news."""

    def __init__(self) -> None:
        self.offers: list[bots_pb2.Lease] = []
        self.results: dict[str, tuple[re_pb2.ExecuteResponse, int]] = {}  # id -> (, offers)
        self.handed_back: list[tuple[str, str]] = []  # (id, message)
        self.offered: dict[str, int] = {}  # first id -> times offered
        self.leases: dict[str, bots_pb2.Lease] = {}  # first id -> as first offered
        self.peak_active = 0
        self._news: asyncio.Event | None = None
        self._retry = 0

    def offer(self, lease_id: str, payload: any_pb2.Any) -> None:
        self.offers.append(bots_pb2.Lease(id=lease_id, payload=payload,
                                          state=bots_pb2.LeaseState.PENDING))
        if self._news is not None:
            self._news.set()

    async def CreateBotSession(self, request, context):
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        session.name = f"sessions/{uuid.uuid4().hex}"
        return session

    async def UpdateBotSession(self, request, context):
        if self._news is None:
            self._news = asyncio.Event()
        reply = bots_pb2.BotSession()
        reply.CopyFrom(request.bot_session)
        del reply.leases[:]
        news = False
        active = 0
        for lease in request.bot_session.leases:
            first = lease.id.split("~")[0]
            if lease.state != bots_pb2.LeaseState.COMPLETED:
                active += 1
                reply.leases.append(lease)
                continue
            news = True
            result = re_pb2.ActionResult()
            lease.result.Unpack(result)
            if lease.status.code == code_pb2.UNAVAILABLE:
                self.handed_back.append((lease.id, lease.status.message))
                self._retry += 1
                again = bots_pb2.Lease(id=f"{first}~{self._retry}",
                                       state=bots_pb2.LeaseState.PENDING)
                again.CopyFrom(self.leases[first])
                again.id = f"{first}~{self._retry}"
                self.offers.append(again)
                continue
            self.results[first] = (re_pb2.ExecuteResponse(status=lease.status, result=result),
                                   self.offered.get(first, 0))
        self.peak_active = max(self.peak_active, active)
        if not news and not self.offers:
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), 0.5)
        for lease in self.offers:
            first = lease.id.split("~")[0]
            self.leases.setdefault(first, lease)
            self.offered[first] = self.offered.get(first, 0) + 1
            reply.leases.append(lease)
        self.offers = []
        return reply

    async def result(self, lease_id: str, timeout: float = 60) -> re_pb2.ExecuteResponse:
        deadline = time.monotonic() + timeout
        while lease_id not in self.results:
            assert time.monotonic() < deadline, f"lease {lease_id} not done in {timeout}s"
            await asyncio.sleep(0.02)
        return self.results[lease_id][0]


@contextlib.asynccontextmanager
async def rwapi(base: Path, *, concurrency: int
                ) -> AsyncIterator[tuple[FakeBots, CasDouble, ExecutorProcess]]:
    bots = FakeBots()
    cas = CasDouble(base / "rwapi-cas")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    bots_grpc.add_BotsServicer_to_server(bots, server)
    cas.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        process = executor_process(base, f"grpc://127.0.0.1:{port}", "rwapi",
                                   concurrency=concurrency)
        async with running(process):
            yield bots, cas, process
    finally:
        await server.stop(0)
        cas.close()


def packed(message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def test_a_scheduler_offering_more_than_the_free_slots_gets_the_extras_back(base):
    """Six leases at once to a worker that runs one command at a time: it runs one and
    hands the others back at once (UNAVAILABLE, retried by the scheduler), so that no two
    commands ever overlap; all six run in the end. A lease whose payload is no Action, and
    one naming an unknown digest function, fail alone with INVALID_ARGUMENT."""
    async def main():
        async with rwapi(base, concurrency=1) as (bots, cas, process):
            names = [f"lease-{i}" for i in range(6)]
            for name in names:
                action, _ = cas.action(command(["/bin/sh", "-c", f"sleep 0.2; echo {name}"]),
                                       timeout_s=30)
                bots.offer(name, packed(action))
            start = time.monotonic()
            responses = {name: await bots.result(name, timeout=90) for name in names}
            took = time.monotonic() - start
            for name, response in responses.items():
                assert response.status.code == code_pb2.OK, (name, response.status)
                assert cas.get(response.result.stdout_digest) == f"{name}\n".encode()
            spans = sorted(
                (r.result.execution_metadata.execution_start_timestamp.ToNanoseconds(),
                 r.result.execution_metadata.execution_completed_timestamp.ToNanoseconds())
                for r in responses.values())
            overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
            print(f"6 leases on 1 slot: {took:.1f}s, {len(bots.handed_back)} handed back, "
                  f"peak {bots.peak_active} active")
            assert not overlaps, f"commands overlapped: {overlaps}"
            assert bots.handed_back, "the extras were never handed back"
            assert all("full" in message for _, message in bots.handed_back), \
                bots.handed_back
            assert bots.peak_active <= 2, bots.peak_active  # one command, one upload
            # Garbage leases.
            bots.offer("not-an-action", packed(command(["/bin/echo", "I am a Command"])))
            bad_fn = bots_pb2.Lease(id="bad-function", state=bots_pb2.LeaseState.PENDING,
                                    payload=packed(cas.action(echo("never"))[0]))
            bad_fn.requirements.properties.add(key="digest-function", value="md5")
            bots.offers.append(bad_fn)
            for name, fragment in (("not-an-action", "not an Action"),
                                   ("bad-function", "md5")):
                response = await bots.result(name, timeout=30)
                assert response.status.code == code_pb2.INVALID_ARGUMENT, response.status
                assert fragment in response.status.message, response.status
            bots.offer("after", packed(cas.action(echo("after the garbage"))[0]))
            response = await bots.result("after", timeout=30)
            assert response.status.code == code_pb2.OK, response.status
            assert cas.get(response.result.stdout_digest) == b"after the garbage\n"
            assert process.alive()
    asyncio.run(main())


def test_a_wide_directory_of_small_inputs_is_fetched_in_linear_time(base):
    """40,000 distinct small files in one directory, none of them local yet: fetched in
    bounded time. (Each blob of a batch holds a fetch lock, and each lock taken costs the
    kernel a walk over every lock held on the file: one batch of 40k blobs took a minute.)"""
    count = 40_000

    async def main():
        async with barn(base) as (double, process):
            fake = double.fake
            files = [re_pb2.FileNode(name=f"f{i:06d}", digest=fake.serve(f"small {i}\n".encode()))
                     for i in range(count)]
            root = fake.serve_message(re_pb2.Directory(directories=[re_pb2.DirectoryNode(
                name="wide", digest=fake.serve_message(re_pb2.Directory(files=files)))]))
            job = double.enqueue_root(command(["/bin/sh", "-c", "ls wide | wc -l; "
                                               "cat wide/f012345"]), root)
            response, took = await outcome(double, job, 120)
            print(f"{count} small inputs: {took:.1f}s {response.status}")
            assert response.status.code == code_pb2.OK, response.status
            assert double.cas.get(response.result.stdout_digest).split() == \
                [str(count).encode(), b"small", b"12345"]
            assert took < 45, took
            await still_serving(double, process)
    asyncio.run(main())
