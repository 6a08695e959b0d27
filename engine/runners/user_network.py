"""A network for an action that asks for one (dockerNetwork: bridge, network: on) where the
operator allows it (actions_may_request_network): a network namespace of the action's own
with slirp4netns attached, a user-mode TCP/IP stack that makes the action's connections from
Stoker's side as ordinary sockets. It never reaches the host's loopback
(--disable-host-loopback), so Stoker's loopback listeners stay out of reach; what the host
reaches on its other addresses, the action reaches too (the README says so).

Made for one action and gone with it: slirp4netns exits when the worker closes its exit fd
(or dies), and the namespace goes with its last process once its file is unmounted.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from engine.runners import spawn

log = logging.getLogger(__name__)

SLIRP = "slirp4netns"
# Past this, a stack that never reported ready is Stoker's failure (retried elsewhere).
READY_TIMEOUT_S = 10.0
_MNT_DETACH = 2


def for_worker(allowed: bool, directory: str | None) -> UserNetworks | None:
    """The worker's user-mode networks: None where actions may not ask for one, where they
    have no network namespaces (directory None), or where slirp4netns is missing (said)."""
    if not allowed or directory is None:
        return None
    slirp = shutil.which(SLIRP)
    if slirp is None:
        log.warning("actions_may_request_network: %s is not installed; actions that ask for "
                    "network are refused", SLIRP)
        return None
    return UserNetworks(directory, slirp)


def _nameservers(resolv_conf: str) -> list[str]:
    servers = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append(parts[1].partition("%")[0])
    except OSError:
        pass
    return servers


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True  # not an address: nothing an action could use


def resolvers(resolv_conf: str = "/etc/resolv.conf",
              upstream: str = "/run/systemd/resolve/resolv.conf") -> tuple[list[str], bool]:
    """(the name servers an action's user-mode network may use, whether the host's
    resolv.conf names any it may not). Never one on the host's loopback: slirp4netns's own
    forwarder (10.0.2.3) would carry the action's connections to any port there, so it is
    off, and the action asks the host's non-loopback servers itself (systemd-resolved's
    upstreams where the host only names its stub)."""
    host = _nameservers(resolv_conf)
    usable = [a for a in host if not _is_loopback(a)]
    if not usable and any(_is_loopback(a) for a in host):
        usable = [a for a in _nameservers(upstream) if not _is_loopback(a)]
    return usable, any(_is_loopback(a) for a in host)


@dataclass
class Attached:
    """One action's network: join netns_file; resolv_conf (or None) replaces the host's."""
    netns_file: str
    resolv_conf: str | None
    proc: subprocess.Popen
    exit_w: int


class UserNetworks:
    """Makes and removes per-action user-mode networks; files live in directory (the
    worker's netns directory, so a killed worker's are released with its kept ones)."""

    def __init__(self, directory: str, slirp: str):
        self.directory = directory
        self.slirp = slirp
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.resolv_conf: str | None = None
        self.nameservers, replace = resolvers()
        if replace:
            # The host's names a server on its loopback: the action gets only the others.
            self.resolv_conf = os.path.join(directory, "resolv.conf")
            with open(self.resolv_conf, "w") as f:
                f.write("".join(f"nameserver {a}\n" for a in self.nameservers))
            os.chmod(self.resolv_conf, 0o644)
            if not self.nameservers:
                log.warning("the host resolves names only on its loopback: actions with a "
                            "user-mode network get no name servers")

    async def attach(self, uid: int) -> Attached:
        path = os.path.join(self.directory, f"netns-user-{uid}")
        _unmount(path)  # a previous action's that was never released (worker killed)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        code, said = await spawn.run_tool([spawn.require_helper(), "--make-netns", path], {},
                                          READY_TIMEOUT_S)
        if code != 0:
            _remove(path)
            raise spawn.SpawnError(f"cannot make the action's network namespace: {said}")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        # Its messages to a file (a pipe nobody drains while the action runs could stall it).
        log_path = path + ".log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # vfork'd like every child of the worker; no part of the action's environment.
            proc = subprocess.Popen(
                [self.slirp, "--configure", "--mtu=65520", "--disable-host-loopback",
                 "--disable-dns",
                 "--enable-sandbox", "--enable-seccomp", "--netns-type=path",
                 f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", path, "tap0"],
                env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log_fd, pass_fds=(ready_w, exit_r), start_new_session=True)
        except OSError as e:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            _remove(path)
            raise spawn.SpawnError(f"cannot start {self.slirp}: {e}") from e
        finally:
            os.close(log_fd)
        os.close(ready_w)
        os.close(exit_r)
        attached = Attached(path, self.resolv_conf, proc, exit_w)
        try:
            ready = await _read_one(ready_r, READY_TIMEOUT_S)
        except BaseException:
            await asyncio.shield(self.release(attached))
            raise
        finally:
            os.close(ready_r)
        if not ready:
            said = await self.release(attached)
            raise spawn.SpawnError(f"{self.slirp} did not come up: {said}")
        return attached

    async def release(self, attached: Attached) -> str:
        """Stop the stack and drop the namespace; what slirp4netns said, for errors."""
        os.close(attached.exit_w)  # slirp4netns's cue to exit
        try:
            await asyncio.wait_for(asyncio.to_thread(attached.proc.wait), 5)
        except TimeoutError:
            attached.proc.kill()
            await asyncio.to_thread(attached.proc.wait)
        try:
            with open(attached.netns_file + ".log", "rb") as f:
                err = f.read()[-500:].decode(errors="replace")
            os.unlink(attached.netns_file + ".log")
        except OSError:
            err = ""
        _remove(attached.netns_file)
        return err.strip()


async def _read_one(fd: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()

    def readable() -> None:
        if not fut.done():
            try:
                fut.set_result(os.read(fd, 1) == b"1")
            except OSError:
                fut.set_result(False)

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _unmount(path: str) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(path.encode(), _MNT_DETACH)


def _remove(path: str) -> None:
    _unmount(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
