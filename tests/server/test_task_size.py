"""Task size estimates from platform properties, and machine shares."""

from __future__ import annotations

import pytest

from engine import resources
from engine.errors import InvalidArgument
from engine.resources import TaskSize


@pytest.mark.parametrize("props,size", [
    ([("EstimatedCPU", "2"), ("EstimatedMemory", "4GB")], TaskSize(2000, 4_000_000_000)),
    ([("estimatedcpu", "1500m"), ("ESTIMATEDMEMORY", "512MiB")], TaskSize(1500, 512 << 20)),
    ([("EstimatedCPU", "0.1"), ("EstimatedMemory", "1e3")],
     TaskSize(resources.MIN_MILLI_CPU, resources.MIN_MEMORY_BYTES)),  # raised to minimums
    ([("EstimatedMemory", "2e9")], TaskSize(resources.MIN_MILLI_CPU, 2_000_000_000)),
    ([("OSFamily", "linux")], None),
    ([], None),
])
def test_estimates(props, size):
    assert resources.estimate(props, "platform") == size


@pytest.mark.parametrize("props,message", [
    ([("EstimatedCPU", "lots")], "platform.EstimatedCPU: 'lots' is not a CPU amount"),
    ([("EstimatedCPU", "-1")], "platform.EstimatedCPU: '-1' must be a non-negative"),
    ([("EstimatedMemory", "4 parsecs")], "platform.EstimatedMemory: '4 parsecs' is not a "
                                         "memory amount"),
    ([("EstimatedMemory", "1e999")], "platform.EstimatedMemory: '1e999' is too large"),
])
def test_bad_estimates_name_the_property(props, message):
    with pytest.raises(InvalidArgument, match=message):
        resources.estimate(props, "platform")


def test_shares_add_up():
    assert [resources.share(10, 3, i) for i in range(3)] == [4, 3, 3]
    assert resources.machine_milli_cpu() >= 1000
    assert resources.machine_memory_bytes() > 1 << 20
