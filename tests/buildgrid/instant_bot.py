"""A Remote Workers API bot that runs nothing: every lease it gets is reported COMPLETED at
once with status OK and an empty ActionResult (exit code 0). Against BuildGrid it measures
the scheduler alone, the ceiling any real worker can approach.

    python -m tests.buildgrid.instant_bot --remote 127.0.0.1:PORT --bots 2 --capacity 8

All bots share one asyncio loop and one channel. It stops on SIGTERM/SIGINT or after
--lifetime seconds, reporting BOT_TERMINATING so BuildGrid stops assigning to it at once
(a bot that just vanishes keeps its leases until its session expires), and prints one line
"instant_bot: completed N leases in M UpdateBotSession calls".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2

from engine.proto import bots_grpc, bots_pb2, re_pb2, worker_pb2

REPO = Path(__file__).resolve().parents[2]
POLL_S = 10.0  # BuildGrid holds an idle poll for 80 % of this
# Under BuildGrid's 3 s NETWORK_TIMEOUT (80 % of it), CreateBotSession returns at once with
# no lease instead of long-polling: the session exists as soon as the call returns.
CREATE_TIMEOUT_S = 3.0
FINAL_TIMEOUT_S = 5.0
READY_LINE = "instant_bot: session"
_LOST = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_RESULT = any_pb2.Any()
_RESULT.Pack(re_pb2.ActionResult(exit_code=0))


def _worker(bot_id: str, capacity: int) -> worker_pb2.Worker:
    worker = worker_pb2.Worker()
    device = worker.devices.add(handle=bot_id)
    device.properties.add(key="OSFamily", value="linux")
    worker.configs.add(key="capacity", value=str(capacity))
    return worker


class InstantBot:
    def __init__(self, stub: bots_grpc.BotsStub, bot_id: str, capacity: int,
                 instance: str, stop: asyncio.Event) -> None:
        self.stub = stub
        self.bot_id = bot_id
        self.worker = _worker(bot_id, capacity)
        self.instance = instance
        self.stop = stop
        self.session: bots_pb2.BotSession | None = None
        self.completed = 0
        self.calls = 0  # UpdateBotSession calls answered: a hot loop would show here

    def _report(self, terminating: bool) -> tuple[bots_pb2.BotSession, int]:
        """The session to send: every live lease completed, our worker, our status."""
        session = bots_pb2.BotSession()
        session.CopyFrom(self.session)
        session.worker.CopyFrom(self.worker)
        session.status = (bots_pb2.BotStatus.BOT_TERMINATING if terminating
                          else bots_pb2.BotStatus.OK)
        done = 0
        for lease in session.leases:
            if lease.state in (bots_pb2.LeaseState.PENDING, bots_pb2.LeaseState.ACTIVE):
                lease.state = bots_pb2.LeaseState.COMPLETED
                lease.status.code = code_pb2.OK
                lease.result.CopyFrom(_RESULT)
                done += 1
        return session, done

    async def _until_stop(self, call) -> object | None:
        """The call's reply, or None (call cancelled) if stop came first."""
        stopper = asyncio.ensure_future(self.stop.wait())
        reply = asyncio.ensure_future(call)
        await asyncio.wait({stopper, reply}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if reply.done():
            return reply.result()
        call.cancel()
        try:
            await reply
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        return None

    async def run(self) -> None:
        backoff = 0.05
        while not self.stop.is_set():
            try:
                if self.session is None:
                    self.session = await self.stub.CreateBotSession(
                        bots_pb2.CreateBotSessionRequest(
                            parent=self.instance,
                            bot_session=bots_pb2.BotSession(
                                bot_id=self.bot_id, status=bots_pb2.BotStatus.OK,
                                worker=self.worker)),
                        timeout=CREATE_TIMEOUT_S, wait_for_ready=True)
                    print(f"{READY_LINE} {self.session.name} for {self.bot_id}", flush=True)
                    continue
                session, done = self._report(False)
                reply = await self._until_stop(self.stub.UpdateBotSession(
                    bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                    timeout=POLL_S))
                if reply is None:
                    break
                self.session = reply
                self.completed += done
                self.calls += 1
                backoff = 0.05
            except grpc.RpcError as e:
                if e.code() in _LOST:  # the server forgot the session: start a new one
                    print(f"instant_bot: {self.bot_id} lost its session: {e.details()}",
                          flush=True)
                    self.session = None
                elif e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    # Server restarting or overloaded; the session lives on in its database.
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
        await self._terminate()

    async def _terminate(self) -> None:
        if self.session is None:
            return
        session, done = self._report(True)
        try:
            await self.stub.UpdateBotSession(
                bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                timeout=FINAL_TIMEOUT_S)
            self.completed += done
        except grpc.RpcError as e:
            print(f"instant_bot: {self.bot_id} could not say goodbye: {e.code()}", flush=True)


async def run_bots(remote: str, bots: int, capacity: int, lifetime_s: float,
                   instance: str = "", prefix: str | None = None) -> tuple[int, int]:
    """Run the bots until SIGTERM/SIGINT or lifetime_s; the leases they completed and the
    UpdateBotSession calls that took."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(lifetime_s, stop.set)
    prefix = prefix or f"instant-{os.getpid()}"
    async with grpc.aio.insecure_channel(remote, options=_CHANNEL_OPTIONS) as channel:
        stub = bots_grpc.BotsStub(channel)
        workers = [InstantBot(stub, f"{prefix}-{i}", capacity, instance, stop)
                   for i in range(bots)]
        await asyncio.gather(*(w.run() for w in workers))
    return sum(w.completed for w in workers), sum(w.calls for w in workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.buildgrid.instant_bot",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remote", required=True, help="host:port of the Bots service")
    p.add_argument("--bots", type=int, default=1, help="bot sessions (default 1)")
    p.add_argument("--capacity", type=int, default=1, help="leases per bot (default 1)")
    p.add_argument("--instance", default="", help="instance name (default '')")
    p.add_argument("--lifetime", type=float, default=3600.0,
                   help="stop after this many seconds (default 3600)")
    p.add_argument("--bot-id-prefix", default=None, help="default instant-<pid>")
    args = p.parse_args(argv)
    if args.bots < 1 or args.capacity < 1 or args.lifetime <= 0:
        p.error("--bots and --capacity must be >= 1, --lifetime > 0")
    completed, calls = asyncio.run(run_bots(args.remote, args.bots, args.capacity,
                                            args.lifetime, args.instance, args.bot_id_prefix))
    print(f"instant_bot: completed {completed} leases in {calls} UpdateBotSession calls",
          flush=True)
    return 0


class InstantBotProcess:
    """The bot as a child process (off the caller's GIL), logging to log_path; start()
    returns once every bot has its session. close() stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, remote: str, log_path: str | os.PathLike, *, bots: int = 2,
                 capacity: int = 4, lifetime_s: float = 3600.0) -> None:
        self.remote = remote
        self.log_path = Path(log_path)
        self.bots = bots
        self.capacity = capacity
        self.lifetime_s = lifetime_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_within_s: float = 60.0) -> InstantBotProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.buildgrid.instant_bot", "--remote", self.remote,
                 "--bots", str(self.bots), "--capacity", str(self.capacity),
                 "--lifetime", str(self.lifetime_s)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_within_s
        while self._sessions() < self.bots:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"instant bot not ready (exit {self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def _sessions(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(READY_LINE)
        except OSError:
            return 0

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def completed(self) -> int | None:
        """Leases completed, from the last line of a stopped bot."""
        for line in reversed(self.log_tail().splitlines()):
            if line.startswith("instant_bot: completed "):
                return int(line.split()[2])
        return None

    def close(self, grace_s: float = 15.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        return proc.returncode

    def __enter__(self) -> InstantBotProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
