"""The cost of milestone 6's containment: a no-op action (/bin/true as a slot uid) through the
bare runner as every worker runs it now (the spawn helper: pid, ipc, network and mount
namespaces, private /proc, /tmp, /var/tmp and /dev/shm, memory and pids cgroups, RLIMIT_NPROC,
oom_score_adj, fresh keyrings, no user namespaces) beside milestone 4's containment in the
same run (util-linux `unshare --pid --ipc --fork --kill-child --setuid --setgid`, the
Command's environment in that root process, as Stoker did until this milestone).

Both are started and awaited the same way (Popen with vfork, a pidfd on the event loop), so
the difference is what each exec does. Rows: throughput with 4 actions in flight (target
>= 0.85 of M4's), and the p50 of one action at a time (target: within +1.0 ms of M4's).

The note also says what each piece costs: the helper without it, beside M4 in the same repeat.

Needs root (slot uids, namespaces, cgroups); otherwise the benchmark says why and is skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from bench.common import Measured
from engine.benchmark.stats import percentile
from engine.config import Config
from engine.runners import containment, spawn
from engine.runners.bare import BareRunner
from engine.runners.cgroups import ActionCgroups
from engine.runners.protocol import Limits, RunRequest
from engine.runners.spawn import SlotNetworks

UID = 60991  # slot uids no test uses: UID .. UID + IN_FLIGHT - 1
IN_FLIGHT = 4
SERIAL = 300  # one-at-a-time actions per repeat, each side
BATCH = 400  # actions per throughput measurement, each side


class _M4:
    """Milestone 4's spawn, kept here as the reference."""

    def __init__(self) -> None:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("util-linux unshare is not installed")
        self.unshare = unshare

    async def run(self, req: RunRequest) -> None:
        assert req.run_as is not None
        uid, gid = req.run_as
        env = dict(req.env, TMPDIR=req.tmpdir)
        with open(req.stdout_path, "wb") as out, open(req.stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [self.unshare, "--pid", "--ipc", "--fork", "--kill-child", f"--setuid={uid}",
                 f"--setgid={gid}", "--", *req.argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, cwd=req.cwd, env=env, start_new_session=True, close_fds=True)
        await _exited(proc)


# What each piece of the containment costs: the helper started the plain way (as _M4 is),
# with all that a worker passes it but one piece, beside M4 in the same repeat. A piece is
# its flag and the values that go with it; the pid namespace takes its /proc with it.
PIECES = {
    "pid namespace and its /proc": {"--pidns": 0},
    "ipc namespace": {"--ipcns": 0},
    "network namespace (kept per slot)": {"--netns": 0, "--netns-file": 1},
    "mount namespace (read-only host, private tmpfs, hidden data, own directories)": {
        "--mountns": 0, "--hide": 1, "--tmpfs": 1, "--tmp-size": 1, "--keep": 1},
    "seccomp (no user namespaces, no keyrings)": {"--deny-userns": 0},
}


class _HelperWithout:
    """The spawn helper with the arguments a worker gives it, less one piece (or none)."""

    def __init__(self, runner: BareRunner, piece: dict[str, int]):
        self.runner, self.piece = runner, piece

    async def run(self, req: RunRequest) -> None:
        assert req.run_as is not None and self.runner.networks is not None
        options = spawn.helper_options(
            req, cgroup_procs=[], deny_userns=self.runner.deny_userns, namespaces=True,
            tmp_bytes=self.runner.tmp_bytes,
            netns_file=self.runner.networks.file_for(req.run_as[0]), hide=self.runner.hide)
        full = spawn.Launch(options, list(req.argv), {}).argv(env_fd=0, status_fd=2)
        args, i = [], 0
        while i < len(full):
            if full[i] == "--":
                args += full[i:]
                break
            if full[i] in ("--env-fd", "--status-fd"):  # stdin is empty; stderr takes errors
                i += 2
                continue
            values = self.piece.get(full[i])
            if values is None:
                args.append(full[i])
                i += 1
            else:
                i += 1 + values
        with open(req.stdout_path, "wb") as out, open(req.stderr_path, "wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env={}, start_new_session=True, close_fds=True)
        await _exited(proc)
        if proc.returncode:
            raise RuntimeError(f"the helper without {self.piece} exited {proc.returncode}")


async def _exited(proc: subprocess.Popen) -> None:
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    proc.wait()


def _requests(base: str, n: int, limits: Limits) -> list[RunRequest]:
    reqs = []
    for i in range(n):
        d = os.path.join(base, f"a{i}")
        root = os.path.join(d, "root")
        tmp = os.path.join(d, "tmp")
        for p in (d, root, tmp):
            os.makedirs(p, exist_ok=True)
        uid = UID + i  # concurrent actions never share a slot uid
        os.chown(root, uid, uid)
        os.chown(tmp, uid, uid)
        reqs.append(RunRequest(["/bin/true"], {"PATH": "/usr/bin:/bin"}, root, "",
                               os.path.join(d, "out"), os.path.join(d, "err"), tmp,
                               run_as=(uid, uid), limits=limits))
    return reqs


async def _serial(run, reqs: list[RunRequest]) -> list[float]:
    times = []
    for req in reqs:
        t0 = time.perf_counter()
        await run(req)
        times.append(time.perf_counter() - t0)
    return times


async def _batch(run, reqs: list[RunRequest], total: int) -> float:
    """Seconds for `total` actions, IN_FLIGHT at once (each slot its own request dirs)."""
    async def lane(req: RunRequest) -> None:
        for _ in range(total // IN_FLIGHT):
            await run(req)
    t0 = time.perf_counter()
    await asyncio.gather(*(lane(r) for r in reqs[:IN_FLIGHT]))
    return time.perf_counter() - t0


def run(repeats: int) -> list[Measured]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (slot uids, namespaces, cgroups)")
    mechanism = containment.detect(True)
    if mechanism != containment.PID_NAMESPACE:
        raise RuntimeError(f"no pid namespaces here (containment {mechanism})")
    base = tempfile.mkdtemp(prefix="stoker-bench-containment-", dir="/tmp")
    os.chmod(base, 0o755)
    cgroups = ActionCgroups(os.path.basename(base))
    networks = SlotNetworks(os.path.join(base, "netns"))
    # As a worker: the directory holding every action's is hidden, each action's own bound back.
    m6 = BareRunner(mechanism, cgroups, 64 << 20,
                    deny_userns=containment.denies_user_namespaces(), networks=networks,
                    hide=(base,))
    m4 = _M4()
    # What a worker runs with by default (memory: the machine's, so no cgroup is joined),
    # and with a memory limit configured (action_limits.memory_bytes: a cgroup per action).
    reqs = _requests(base, IN_FLIGHT, Config().action_limits())
    limited = _requests(os.path.join(base, "limited"), IN_FLIGHT, Limits(1 << 30, 4096))
    m6_rates, m4_rates, m6_p50, m4_p50, limited_rates = [], [], [], [], []
    helpers = {name: _HelperWithout(m6, piece) for name, piece in PIECES.items()}
    helpers[""] = _HelperWithout(m6, {})  # every piece
    without: dict[str, list[float]] = {name: [] for name in helpers}

    async def measure() -> None:
        await _serial(m6.run, reqs[:1] * 20)  # warm both
        await _serial(m4.run, reqs[:1] * 20)
        for _ in range(repeats):
            m4_rates.append(BATCH / await _batch(m4.run, reqs, BATCH))
            m6_rates.append(BATCH / await _batch(m6.run, reqs, BATCH))
            m4_p50.append(percentile(await _serial(m4.run, reqs[:1] * SERIAL), 50))
            m6_p50.append(percentile(await _serial(m6.run, reqs[:1] * SERIAL), 50))
            limited_rates.append(BATCH / await _batch(m6.run, limited, BATCH))
            for name, helper in helpers.items():
                m4_rate = BATCH / await _batch(m4.run, reqs, BATCH)
                without[name].append(BATCH / await _batch(helper.run, reqs, BATCH) / m4_rate)

    try:
        asyncio.run(measure())
    finally:
        networks.release()
        cgroups.remove()
        shutil.rmtree(base, ignore_errors=True)
    p50_m6, p50_m4 = statistics.median(m6_p50) * 1e3, statistics.median(m4_p50) * 1e3
    added = p50_m6 - p50_m4
    note = (f"one at a time: p50 {p50_m6:.2f} ms vs {p50_m4:.2f} ms (+{added:.2f} ms); "
            f"{IN_FLIGHT} in flight for throughput; with a 1 GiB memory limit (a memory cgroup "
            f"per action, {cgroups.mechanism}) {statistics.median(limited_rates):.0f}/s; "
            f"containment {mechanism}, user namespaces "
            f"{'denied' if m6.deny_userns else 'allowed'}; the helper alone as a share of "
            "M4's throughput: "
            + ", ".join(f"without {name} {statistics.median(r):.2f}" if name
                        else f"with every piece {statistics.median(r):.2f}"
                        for name, r in without.items()))
    return [Measured(
        "contained no-op action (M6: namespaces, private /proc /tmp /dev/shm, cgroups, "
        "limits, seccomp) vs M4's containment", "actions/s", m6_rates, m4_rates,
        "`unshare --pid --ipc --fork --kill-child --setuid` (M4)", 0.85, note,
        criterion=">= 0.85 and p50 within +1.0 ms",
        passed=statistics.median(m6_rates) / statistics.median(m4_rates) >= 0.85
        and added <= 1.0)]


if __name__ == "__main__":
    for m in run(3):
        print(m.name, f"{statistics.median(m.stoker):.0f} vs {statistics.median(m.reference):.0f}"
              f" {m.unit} = {m.ratio:.2f}; {m.note}; met: {m.met}")
