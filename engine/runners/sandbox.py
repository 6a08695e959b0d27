"""The sandbox runner (isolation type `sandbox`): the command runs under bubblewrap, in user,
pid, ipc, uts and mount namespaces of its own, on a root made of the host's top-level
directories bound read-only. Only its exec root (at EXEC_ROOT, whatever the real path) and
its TMPDIR (at /tmp and /var/tmp) are writable; /proc, /dev and /run are its own; the data
directory is hidden; it cannot make user namespaces of its own (--disable-userns).

bwrap runs unprivileged, as the slot uid: the spawn helper starts it with everything the
bare runner gives an action but the namespaces bwrap makes itself (the slot uid, cgroups,
RLIMIT_NPROC, oom_score_adj, cleared keyrings, the slot's loopback-only network or a
user-mode one), and with an EMPTY environment: the Command's environment reaches only the
command, through bwrap's --setenv, in an argument file (never a command line). The exec
root and TMPDIR are handed over as fds, so no parent of theirs needs to be reachable.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess

from engine.errors import FailedPrecondition
from engine.runners import containment, spawn
from engine.runners.bare import BareRunner
from engine.runners.protocol import RunRequest, RunResult
from engine.runners.user_network import Attached

BWRAP = "bwrap"
NEEDED_OPTIONS = ("--bind-fd", "--ro-bind-fd", "--disable-userns", "--json-status-fd",
                  "--as-pid-1", "--args")
EXEC_ROOT = "/execroot"  # where the action finds its exec root
# Host top-level entries the sandbox gets its own of, or none.
_OWN = {"proc", "dev", "tmp", "run", "lost+found"}


def _owned(path: str) -> bool:
    """Whether path lies in a place the sandbox has its own of (not the host's)."""
    return any(path == top or path.startswith(top + "/")
               for top in ("/proc", "/dev", "/tmp", "/var/tmp", "/run", EXEC_ROOT))


def find_bwrap() -> str | None:
    return shutil.which(BWRAP)


def _root_entries(skip: str) -> list[str]:
    """bwrap arguments that rebuild the host's / read-only, but for what the sandbox owns."""
    args: list[str] = []
    for entry in sorted(os.scandir("/"), key=lambda e: e.name):
        name = entry.name
        if name in _OWN or "/" + name == skip:
            continue
        path = "/" + name
        if entry.is_symlink():
            args += ["--symlink", os.readlink(path), path]
        elif entry.is_dir(follow_symlinks=False):
            args += ["--ro-bind", path, path]
    return args


class SandboxRunner(BareRunner):
    """bubblewrap around the command; the bare runner's spawning, limits and waiting."""

    name = "sandbox"

    def __init__(self, bwrap: str, bare: BareRunner):
        super().__init__(containment.PID_NAMESPACE, bare.cgroups, bare.tmp_bytes,
                         deny_userns=False, networks=bare.networks, hide=bare.hide,
                         allow_network=bare.allow_network, user_networks=bare.user_networks)
        self.bwrap = bwrap
        self.root_args = _root_entries(EXEC_ROOT)

    def launch(self, req: RunRequest, env: dict[str, str], mechanism: str,
               cgroup_procs: list[str], network: Attached | None) -> spawn.Launch:
        if req.run_as is None:
            raise FailedPrecondition("isolation type sandbox needs Stoker to run as root "
                                     "(actions as slot uids)")
        netns_file = self.netns_file(req, network)
        options = spawn.helper_options(req, cgroup_procs=cgroup_procs, deny_userns=False,
                                       netns=netns_file is not None, netns_file=netns_file)
        options[options.index("--cwd") + 1] = "/"  # bwrap finds the exec root by fd
        fds: list[int] = []
        status_r = -1
        try:
            # One fd a bind: bwrap closes each once it is bound.
            for path in (req.exec_root, req.tmpdir, req.tmpdir):
                fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            root_fd, tmp_fd, var_tmp_fd = fds
            # bwrap says on this pipe when the command started: an exit before that is
            # bwrap's own failure (Stoker's), not the action's. The command is pid 1 of its
            # namespace (as under the bare runner): a reaper of bwrap's could be left a
            # zombie for init, as bwrap's outer process may exit before reaping it.
            status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            fds.append(status_w)
            args = ["--die-with-parent", "--as-pid-1", "--unshare-user", "--disable-userns",
                    "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                    "--json-status-fd", str(status_w)]
            if netns_file is None:
                args.append("--unshare-net")
            args += self.root_args
            args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run",
                     "--bind-fd", str(tmp_fd), "/tmp", "--bind-fd", str(var_tmp_fd), "/var/tmp",
                     "--bind-fd", str(root_fd), EXEC_ROOT]
            hidden: list[str] = []
            for path in sorted(self.hide):
                # Only what the sandbox shows of the host (under /tmp, say, it is the
                # action's own TMPDIR there, and bwrap would make the path in it), and once
                # (what lies below a hidden directory is gone with it).
                if (os.path.isdir(path) and not _owned(path)
                        and not any(path.startswith(h + "/") for h in hidden)):
                    hidden.append(path)
                    args += ["--tmpfs", path]
            if network is not None and network.resolv_conf is not None:
                fds.append(os.open(network.resolv_conf, os.O_PATH | os.O_CLOEXEC))
                args += ["--ro-bind-fd", str(fds[-1]), "/etc/resolv.conf"]
            args += ["--chdir", os.path.normpath(os.path.join(EXEC_ROOT, req.working_directory))]
            command_env = dict(env)
            command_env["TMPDIR"] = req.env.get("TMPDIR", "/tmp")
            for name, value in command_env.items():
                args += ["--setenv", name, value]
            args_fd = spawn.memfd_of(spawn.nul_separated(args), "stoker-bwrap-args")
            fds.append(args_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            if status_r >= 0:
                os.close(status_r)
            raise
        # The options through a memfd (the environment is no command line's business); the
        # command after them, where bwrap looks for it.
        return spawn.Launch(options, [self.bwrap, "--args", str(args_fd), "--", *req.argv], {},
                            fds,
                            check=lambda result: _started(status_r, result, req.stderr_path),
                            kept=[status_r])


def _started(status_r: int, result: RunResult, stderr_path: str) -> None:
    """Raise SpawnError unless bwrap reported the command started (its JSON status)."""
    for line in spawn.read_available(status_r).splitlines():
        try:
            if "child-pid" in json.loads(line):
                return
        except ValueError:
            continue
    said = spawn.head_of(stderr_path)
    raise spawn.SpawnError(f"{BWRAP} could not set the sandbox up (exit {result.exit_code})"
                           + (f": {said}" if said else ""))


@functools.lru_cache(maxsize=64)  # a machine fact: asked once per process
def probe(bwrap: str | None, uid: int | None, gid: int | None) -> str | None:
    """Why no sandbox can be made here for actions of uid, or None when one can."""
    if bwrap is None:
        return f"{BWRAP} (bubblewrap) is not installed"
    helper = spawn.helper_path()
    if helper is None:
        return "the spawn helper (engine/_spawn) is not installed"
    if uid is None or gid is None:
        return "actions run as Stoker itself (run_as: self, or Stoker not root)"
    # Options the runner needs that older bubblewraps lack (--bind-fd: 0.10, or backports).
    usage = subprocess.run([bwrap, "--help"], env={}, capture_output=True, text=True,
                           timeout=30).stdout
    lacking = [o for o in NEEDED_OPTIONS if o not in usage]
    if lacking:
        return f"this {BWRAP} lacks {', '.join(lacking)}"
    try:
        r = subprocess.run(
            [helper, "--uid", str(uid), "--gid", str(gid), "--cwd", "/", "--", bwrap,
             "--as-pid-1", "--unshare-user", "--unshare-pid", "--disable-userns",
             "--ro-bind", "/", "/", "--proc", "/proc", "true"], env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    except subprocess.TimeoutExpired:
        return f"{BWRAP} did not make a sandbox within 30 s"
    if r.returncode == 0:
        return None
    return f"{BWRAP} cannot make a sandbox here: {r.stderr.decode(errors='replace').strip()}"
