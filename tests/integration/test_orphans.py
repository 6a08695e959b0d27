"""Executions whose clients are all gone are cancelled after orphan_grace (a job's action is
killed, its operation says CANCELLED), while a client reconnecting with WaitExecution within
the grace keeps it; and partial-upload quotas are per API key, not per address
(engine/server/scheduler.py, engine/server/bytestream_service.py)."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine import transport
from engine.proto import operations_pb2, re_pb2
from tests.integration.support import (
    CLIENT_OPTIONS,
    Client,
    StokerProcess,
    blob_resource,
    command,
    digest_of,
    metadata,
    response_of,
    start,
)

GRACE_S = 3.0
EXECUTING = re_pb2.ExecutionStage.EXECUTING
MiB = 1 << 20


@pytest.fixture(scope="module")
def graced(base_dir: Path) -> Iterator[StokerProcess]:
    config = base_dir / "orphans.yaml"
    config.write_text(f"executor:\n  orphan_grace: {GRACE_S:g}s\n")
    process = start(StokerProcess(base_dir / "orphans-data", base_dir / "orphans.log",
                                  default_timeout="60s", monitor=False,
                                  extra_args=["--config", str(config)]))
    yield process
    process.stop()


def _pids_running(marker: str) -> list[int]:
    """Processes (any namespace, any uid) whose command line holds marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def _wait_until(predicate, within: float) -> float:
    """Seconds it took predicate() to hold; fails after `within`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < within, f"not within {within:g}s"
        time.sleep(0.1)
    return time.monotonic() - t0


def _start_and_leave(client: Client, argv: list[str]) -> tuple[str, float]:
    """Execute, read until the action runs, then drop the stream: the operation's name and
    when the client left."""
    action = client.action(command(argv), client.put_tree({}).root, timeout=60)
    call = client.exe.Execute(re_pb2.ExecuteRequest(action_digest=action), timeout=60)
    name = ""
    for op in call:
        name = op.name
        if metadata(op).stage == EXECUTING:
            break
    call.cancel()  # the client goes away
    return name, time.monotonic()


def test_an_execution_nobody_watches_is_cancelled_and_its_action_killed(graced):
    marker = f"30.{random.randrange(10**8):08d}"  # `sleep 30.<nonce>`: findable in /proc
    client = Client(graced.address)
    try:
        name, left = _start_and_leave(client, ["/bin/sleep", marker])
        _wait_until(lambda: _pids_running(marker), GRACE_S / 2)
        time.sleep(max(0.0, left + GRACE_S / 2 - time.monotonic()))
        assert _pids_running(marker), "cancelled before the grace was over"
        _wait_until(lambda: not _pids_running(marker), GRACE_S + 8)
        assert time.monotonic() - left >= GRACE_S

        # Anyone asking later hears CANCELLED, and the same action runs again on request.
        op = client.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
        assert op.done
        status = response_of(op).status
        assert status.code == grpc.StatusCode.CANCELLED.value[0], status
        assert "orphan_grace" in status.message
        waited = list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name),
                                               timeout=10))
        assert response_of(waited[-1]).status.code == grpc.StatusCode.CANCELLED.value[0]
        assert "cancelling" in graced.log_path.read_text(errors="replace")
        again = client.run(["/bin/echo", "still serving"])
        assert again.response.status.code == 0
    finally:
        client.close()


def test_a_client_reconnecting_within_the_grace_gets_the_result(graced):
    client = Client(graced.address)
    try:
        # Runs for longer than the grace: only the reconnected watcher keeps it alive.
        name, _ = _start_and_leave(client, ["/bin/sh", "-c",
                                            f"sleep {GRACE_S * 2:g}; echo finished"])
        time.sleep(GRACE_S / 2)
        ops = list(client.exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name),
                                            timeout=60))
        assert ops[-1].done and ops[-1].name == name
        response = response_of(ops[-1])
        assert response.status.code == 0, response.status
        assert response.result.exit_code == 0
        assert client.read(response.result.stdout_digest) == b"finished\n"
    finally:
        client.close()


KEY_ONE = "orphans-it-key-one-1c9e"
KEY_TWO = "orphans-it-key-two-83af"


def test_each_api_key_has_its_own_upload_quota(base_dir):
    keys = base_dir / "quota-keys"
    keys.write_text(f"{KEY_ONE}\n{KEY_TWO}\n")
    keys.chmod(0o600)
    config = base_dir / "quota.yaml"
    config.write_text("executor:\n  upload_client_max_bytes: 4M\n  upload_idle_expiry: 5m\n")
    stoker = start(StokerProcess(
        base_dir / "quota-data", base_dir / "quota.log", monitor=False,
        extra_args=["--config", str(config), "--cache-size", "64M",
                    "--api-key-file", str(keys)],
        metadata=((transport.API_KEY_HEADER, KEY_ONE),)))
    clients = [Client(stoker.address, channel=transport.open_sync_channel(
        f"grpc://{stoker.address}", api_key=k, options=CLIENT_OPTIONS))
        for k in (KEY_ONE, KEY_TWO)]

    def abandon(client: Client) -> grpc.RpcError:
        """3 MiB of a 4 MiB blob, then the stream ends without finish_write."""
        data = os.urandom(4 * MiB)
        resource = blob_resource(digest_of(data), upload=str(uuid.uuid4()))
        with pytest.raises(grpc.RpcError) as info:
            client.bs_write(resource, [data[i:i + MiB] for i in range(0, 3 * MiB, MiB)],
                            finish=False)
        return info.value

    try:
        one, two = clients
        # Both come from 127.0.0.1; each key holds its own 4 MiB.
        assert abandon(one).code() == grpc.StatusCode.INVALID_ARGUMENT  # kept, resumable
        refused = abandon(one)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert "API key #1" in refused.details()
        assert "upload_client_max_bytes" in refused.details()
        kept = abandon(two)  # not counted against key one
        assert kept.code() == grpc.StatusCode.INVALID_ARGUMENT, kept.details()
        refused = abandon(two)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert "API key #2" in refused.details()
        log = stoker.log_path.read_text(errors="replace")
        for secret in (KEY_ONE, KEY_TWO):
            assert secret not in refused.details() and secret not in log
    finally:
        for c in clients:
            c.close()
        assert stoker.stop() == 0, stoker.log_tail()
