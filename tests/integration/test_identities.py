"""Who actions run as under `stoker up` as root: a slot uid each (two running at once never
share one), exec roots only they can enter, and a data directory under a 0700 parent (a
checkout in root's home) still works, with the exec roots moved where the uids reach them."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from support import Client, StokerProcess, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="slot uids need root")

FIRST, LAST = 60000, 60999

# Prints its uid and gid, its exec root's owner and mode, whether it can list the worker's
# build directory, then when it starts and ends 2 s of sleep (the two actions cannot meet in
# a shared directory any more: each has a /tmp of its own).
PROBE = ("id -u; id -g; stat -c '%u %a' .; ls ../.. >/dev/null 2>&1 && echo listed || "
         "echo unlisted; date +%s.%N; sleep 2; date +%s.%N")


def stdout_of(client: Client, execution) -> str:
    return client.read(execution.result.stdout_digest).decode()


def test_concurrent_actions_run_as_distinct_slot_uids(client: Client, tmp_path: Path):
    outs: list[str] = []

    def one(i: int) -> None:
        ex = client.run(f"echo {i} >/dev/null; " + PROBE, skip_cache_lookup=True)
        assert ex.result.exit_code == 0, client.read(ex.result.stderr_digest)
        outs.append(stdout_of(client, ex))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outs) == 2
    uids = set()
    spans = []
    for out in outs:
        uid, gid, owner_mode, listed, began, ended = out.split("\n")[:6]
        assert FIRST <= int(uid) <= LAST and gid == uid
        assert owner_mode == f"{uid} 700"  # its exec root: its own, nobody else's
        assert listed == "unlisted"  # the worker's build dir cannot be listed
        uids.add(uid)
        spans.append((float(began), float(ended)))
    assert max(b for b, _ in spans) < min(e for _, e in spans)  # both ran at once
    assert len(uids) == 2


def test_data_dir_under_a_private_parent(tmp_path: Path):
    private = Path("/root") if os.stat("/root").st_mode & 0o777 == 0o700 else tmp_path
    parent = private / f"stoker-private-{os.getpid()}"
    parent.mkdir(mode=0o700)
    try:
        process = start(StokerProcess(parent / "data", parent / "stoker.log",
                                      default_timeout="30s"))
        try:
            c = Client(process.address)
            ex = c.run("id -u; pwd", skip_cache_lookup=True)
            assert ex.result.exit_code == 0, c.read(ex.result.stderr_digest)
            uid, cwd = stdout_of(c, ex).split()
            assert FIRST <= int(uid) <= LAST
            assert not cwd.startswith(str(parent))
            assert "exec roots live in" in process.log_tail()
            c.close()
        finally:
            assert process.stop() == 0
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_a_uid_range_holding_a_user_is_refused(tmp_path: Path):
    """Actions must never run as a real user: nobody's uid (65534) in the range is refused
    at start, naming the key and the user."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "engine", "up", "--data-dir", str(tmp_path / "data"),
         "--action-uids", "65000-65534", "--health-listen", "off", "--metrics-listen", "off"],
        capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[2]))
    assert done.returncode == 2, done.stderr
    assert "action_uids" in done.stderr and "nobody" in done.stderr


def test_two_stokers_on_one_machine_never_share_a_uid(client: Client, stoker_factory):
    """Each worker claims its uids machine-wide: two Stokers (other data directories) would
    otherwise run actions that reach each other, and one's start would sweep the other's."""
    other = start(stoker_factory("second-stoker"))
    c2 = Client(other.address)
    try:
        def uids(c: Client) -> set[str]:
            found = set()
            for i in range(4):
                ex = c.run(f"echo {i} >/dev/null; id -u", skip_cache_lookup=True)
                assert ex.result.exit_code == 0
                found.add(stdout_of(c, ex).strip())
            return found

        mine, theirs = uids(client), uids(c2)
        assert mine and theirs and not mine & theirs
    finally:
        c2.close()
