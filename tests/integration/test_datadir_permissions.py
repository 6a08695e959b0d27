"""Nothing in the data directory is listable, readable, writable or lockable by an action's
uid (engine/datadir.py), also when an older version made the
directory with looser modes."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from tests.integration.support import Client, blob_resource, digest_of, start

ACTION_UID = 60000

# Run as ACTION_UID: for each path, what each attempt gave ("OK" or the errno's name).
PROBE = r"""
import errno, fcntl, json, os, sys

def attempt(fn):
    try:
        fn()
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def lock(path, how):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        how(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)

def write(path):
    if os.path.isdir(path):  # as root it is; as this uid, the stat may fail (EACCES)
        os.close(os.open(os.path.join(path, "probe"), os.O_WRONLY | os.O_CREAT, 0o644))
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

out = {}
for path, is_dir in json.load(sys.stdin):
    r = {"read": attempt(lambda: os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))),
         "write": attempt(lambda: write(path)),
         "flock": attempt(lambda: lock(path, fcntl.flock)),
         "lockf": attempt(lambda: lock(path, fcntl.lockf))}
    if is_dir:
        r["list"] = attempt(lambda: os.listdir(path))
        r["create"] = attempt(lambda: os.close(os.open(os.path.join(path, "probe"),
                                                       os.O_WRONLY | os.O_CREAT, 0o644)))
    out[path] = r
json.dump(out, sys.stdout)
"""


def _probe(paths: list[tuple[str, bool]]) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        ["setpriv", f"--reuid={ACTION_UID}", f"--regid={ACTION_UID}", "--clear-groups",
         "/usr/bin/python3", "-c", PROBE],
        input=json.dumps(paths), capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _everything_but_build(data: Path) -> list[tuple[str, bool]]:
    paths = [(str(data), True)]
    for dirpath, dirnames, filenames in os.walk(data):
        if Path(dirpath) == data:
            dirnames[:] = [d for d in dirnames if d != "build"]
        paths += [(os.path.join(dirpath, d), True) for d in dirnames]
        paths += [(os.path.join(dirpath, f), False) for f in filenames]
    return paths


def _loosen(data: Path) -> None:
    """The modes an earlier version left: 0755 directories, 0644 lock and index."""
    for dirpath, dirnames, filenames in os.walk(data):
        if Path(dirpath) == data:
            dirnames[:] = [d for d in dirnames if d != "build"]  # not this test's business
        os.chmod(dirpath, 0o755)
        for f in filenames:
            if f in ("lock", "index", "stoker.lock"):
                os.chmod(os.path.join(dirpath, f), 0o644)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.mark.skipif(os.geteuid() != 0, reason="actions run as other uids only under root")
def test_an_action_uid_can_neither_list_read_write_nor_lock_the_data_dir(stoker_factory):
    stoker = start(stoker_factory("perms"))
    stoker.stop()
    data = stoker.data_dir
    _loosen(data)
    start(stoker)
    client = Client(stoker.address)
    try:
        # Fill every kind of file: cache blobs, action cache entries, a partial upload.
        assert client.run(["/bin/sh", "-c", "echo out > o"], {"in": b"input"},
                          output_files=["o"]).result.exit_code == 0
        blob = os.urandom(3000)
        with pytest.raises(grpc.RpcError):
            client.bs_write(blob_resource(digest_of(blob), upload=str(uuid.uuid4())),
                            [blob[:1000]], finish=False)
        assert os.listdir(data / "uploads")
        assert os.listdir(data / "ac")

        assert _mode(data) == 0o711
        for d in ("cache", "cache/cas", "cache/tmp", "ac", "uploads", "run"):
            assert _mode(data / d) == 0o700, d
        for f in ("stoker.lock", "cache/lock", "cache/index"):
            assert _mode(data / f) == 0o600, f

        paths = _everything_but_build(data)
        assert len(paths) > 15
        control = str(data.parent)  # the probe itself works: it may list a 0755 directory
        results = _probe([*paths, (control, True)])
        assert results.pop(control)["list"] == "OK"
        allowed = {"EACCES", "EPERM"}
        bad = {p: r for p, r in results.items() if set(r.values()) - allowed}
        assert not bad, json.dumps(bad, indent=1)

        # Stoker itself is unhindered.
        assert client.run(["/bin/echo", "still fine"]).result.exit_code == 0
        again = os.urandom(5000)
        client.bs_write(blob_resource(digest_of(again), upload=str(uuid.uuid4())), [again])
        assert client.read(digest_of(again)) == again
    finally:
        client.close()
