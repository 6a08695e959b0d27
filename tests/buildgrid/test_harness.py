"""The BuildGrid harness itself: a real BuildGrid 0.9.1 runs an action through the instant
bot, and keeps serving (same CAS, same database) across a scheduler restart."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from engine.proto import re_grpc, re_pb2
from tests.buildgrid import harness
from tests.buildgrid.harness import BuildGridServer
from tests.buildgrid.instant_bot import InstantBotProcess

pytestmark = [
    pytest.mark.skipif(not harness.VENV_DIR.exists() and harness.find_python313() is None,
                       reason="no CPython 3.13 here, which BuildGrid 0.9.1 needs (pyenv "
                              "install 3.13, or set STOKER_PYTHON313)"),
    # The first run builds BuildGrid's venv from the package index.
    pytest.mark.timeout(600),
]


def _run_true(address: str) -> tuple[re_pb2.Digest, re_pb2.ExecuteResponse]:
    with grpc.insecure_channel(address) as channel:
        action = harness.upload_action(channel, ["/bin/true", uuid.uuid4().hex])
        return action, harness.execute(channel, action, timeout_s=60)


def _assert_ok(response: re_pb2.ExecuteResponse) -> None:
    assert response.status.code == 0, response.status
    assert response.result.exit_code == 0
    assert not response.cached_result
    # Set by BuildGrid when a bot, not the cache, produced the result.
    assert response.result.execution_metadata.HasField("worker_completed_timestamp")


def test_one_action_through_buildgrid(buildgrid: BuildGridServer,
                                      instant_bot: InstantBotProcess) -> None:
    _, response = _run_true(buildgrid.address)
    _assert_ok(response)


def test_restart_keeps_cas_and_serves(buildgrid_factory: Callable[..., BuildGridServer],
                                      tmp_path: Path) -> None:
    server = buildgrid_factory()
    with InstantBotProcess(server.address, tmp_path / "bot.log", bots=1, capacity=2,
                           lifetime_s=300) as bot:
        first, response = _run_true(server.address)
        _assert_ok(response)
        port = server.port
        server.restart()
        assert server.port == port and server.alive()
        with grpc.insecure_channel(server.address) as channel:
            missing = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[first]), timeout=30)
        assert list(missing.missing_blob_digests) == [], "the disk CAS did not survive"
        # The bot's session lives in PostgreSQL: the same bot process gets the next lease.
        _, response = _run_true(server.address)
        _assert_ok(response)
        assert bot.close() == 0
        assert bot.completed() == 2, bot.log_tail()
