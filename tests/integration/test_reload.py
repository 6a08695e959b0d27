"""SIGHUP re-reads executor.yaml: timeouts and debug logging change at once in the server and
the workers; other keys are named as needing a restart; a broken file changes nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from tests.integration.support import Client, StokerProcess, command, start


def _wait_for_log(process: StokerProcess, text: str, since: int, count: int = 1,
                  within: float = 15.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        tail = process.log_tail(since, limit=1 << 20)
        if tail.count(text) >= count:
            return tail
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged {count}x within {within}s:\n"
                         f"{process.log_tail(since)}")


def test_sighup_applies_timeouts_and_names_what_needs_a_restart(stoker_factory, tmp_path: Path):
    config = tmp_path / "executor.yaml"
    config.write_text("executor:\n  default_timeout: 30s\n  max_timeout: 60s\n")
    process = start(stoker_factory("reload", default_timeout=None,
                                   extra_args=["--config", str(config)]))
    client = Client(process.address)
    try:
        assert client.run("sleep 1.5", skip_cache_lookup=True).result.exit_code == 0

        mark = process.log_size()
        config.write_text("executor:\n  default_timeout: 1s\n  max_timeout: 2s\n"
                          "  enable_debug_logging: true\n  pool_name: gpu\n")
        process.proc.send_signal(signal.SIGHUP)
        # The server and the one worker each confirm.
        log = _wait_for_log(process, "configuration reloaded", mark, count=2)
        assert "only taken after a restart: pool_name" in log

        slow = client.run("sleep 1.5", skip_cache_lookup=True)  # now over the 1s default
        assert slow.response.status.code == code_pb2.DEADLINE_EXCEEDED
        root = client.put_tree({}).root
        with pytest.raises(grpc.RpcError) as e:  # the server's new max_timeout
            client.execute(client.action(command(["true"]), root, timeout=5.0))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        mark = process.log_size()
        config.write_text("executor:\n  default_timeout: never\n")
        process.proc.send_signal(signal.SIGHUP)
        log = _wait_for_log(process, "configuration not reloaded", mark)
        assert "executor.default_timeout" in log
        assert client.run("sleep 1.5", skip_cache_lookup=True).response.status.code == \
            code_pb2.DEADLINE_EXCEEDED  # still the 1s from the last good reload
    finally:
        client.close()
    assert process.stop() == 0
