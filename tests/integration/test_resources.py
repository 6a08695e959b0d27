"""Admission by estimated size through a real `stoker up`: actions that declare more CPU than
fits beside each other run one after the other; undeclared ones share the worker's slots."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.integration.support import Client, command, start

SLEEP = "sleep 0.8"


def _windows(client: Client, platform: list[tuple[str, str]], n: int) -> list[tuple[int, int]]:
    """Run n sleeping actions at once; their (execution start, end) in nanoseconds."""
    root = client.put_tree({}).root

    def one(_):
        cmd = command(["/bin/sh", "-c", SLEEP])
        for name, value in platform:
            cmd.platform.properties.add(name=name, value=value)
        ex = client.execute(client.action(cmd, root), skip_cache_lookup=True)
        assert ex.response.status.code == 0 and ex.result.exit_code == 0, ex.response
        m = ex.result.execution_metadata
        return (m.execution_start_timestamp.ToNanoseconds(),
                m.execution_completed_timestamp.ToNanoseconds())

    with ThreadPoolExecutor(n) as pool:
        return sorted(pool.map(one, range(n)))


def _overlap(windows: list[tuple[int, int]]) -> bool:
    return any(b[0] < a[1] for a, b in zip(windows, windows[1:], strict=False))


def test_declared_sizes_bound_what_runs_at_once(stoker_factory, tmp_path: Path):
    config = tmp_path / "executor.yaml"
    config.write_text("executor:\n  milli_cpu: 2000\n  memory_bytes: 8000000000\n")
    process = start(stoker_factory("sized", workers=1, concurrency=2,
                                   extra_args=["--config", str(config)]))
    client = Client(process.address)
    try:
        # 1.5 cores each on a 2-core budget: never two at once, though 2 slots are free.
        big = _windows(client, [("EstimatedCPU", "1500m")], 2)
        assert not _overlap(big), big
        # Memory bounds it the same way.
        fat = _windows(client, [("EstimatedMemory", "6GB")], 2)
        assert not _overlap(fat), fat
        # Undeclared: one slot's share each, so both slots run together.
        small = _windows(client, [], 2)
        assert _overlap(small), small
    finally:
        client.close()


def test_a_bad_estimate_is_an_invalid_argument_naming_the_property(client: Client):
    root = client.put_tree({}).root
    cmd = command(["/bin/true"])
    cmd.platform.properties.add(name="EstimatedMemory", value="plenty")
    with pytest.raises(grpc.RpcError) as e:
        client.execute(client.action(cmd, root))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EstimatedMemory: 'plenty' is not a memory amount" in e.value.details()
