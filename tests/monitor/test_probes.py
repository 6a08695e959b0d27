"""The readiness and liveness rules over real status files (engine/status.py), without
starting Stoker: each case is a set of facts the processes would have written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import status
from engine.config import Config
from engine.monitor.probes import Probes, SystemCollector, memory_utilization


@pytest.fixture
def probes(tmp_path) -> Probes:
    config = Config(data_dir=str(tmp_path / "data")).validated()
    os.makedirs(config.run_dir)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    p = Probes(config, os.getpid(), str(metrics_dir))
    yield p
    p.close()


def _write(probes: Probes, state: str = "running", worker_pid: int = 101,
           connected: bool = True, serving: bool = True, mode: str = "up") -> None:
    run_dir = probes.config.run_dir
    status.write_status(run_dir, "supervisor", {
        "pid": os.getpid(), "mode": mode, "state": state, "children": {
            "server": {"pid": 100, "state": "running", "restarts": 0},
            "worker-0": {"pid": 101, "state": "running", "restarts": 0}}})
    status.write_status(run_dir, "server", {"pid": 100, "serving": serving})
    status.write_status(run_dir, "worker-0", {"pid": worker_pid, "connected": connected,
                                              "since": 1.0})


def test_ready_when_serving_with_a_connected_worker(probes: Probes):
    _write(probes)
    assert probes.readyz() == (200, {"ready": True})


@pytest.mark.parametrize("facts, reason", [
    ({"state": "draining"}, "stoker is draining"),
    ({"serving": False}, "the embedded server is not serving yet"),
    ({"connected": False}, "no worker is connected to the scheduler"),
    # A worker that died connected left its file behind; its pid is no longer the slot's.
    ({"worker_pid": 99}, "no worker is connected to the scheduler"),
])
def test_not_ready(probes: Probes, facts: dict, reason: str):
    _write(probes, **facts)
    assert probes.readyz() == (503, {"ready": False, "reason": reason})


def test_not_ready_before_the_supervisor_reports(probes: Probes):
    assert probes.readyz()[0] == 503


def test_joined_mode_needs_no_embedded_server(probes: Probes):
    _write(probes, mode="executor", serving=False)
    assert probes.readyz() == (200, {"ready": True})


def test_healthz_follows_the_supervisor(probes: Probes):
    _write(probes)
    assert probes.healthz() == (200, {"healthy": True})
    _write(probes, state="halted")
    assert probes.healthz()[0] == 503
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    probes.supervisor_pid = int(gone.stdout)
    _write(probes)
    assert probes.healthz() == (503, {"healthy": False, "reason": "the supervisor is gone"})


def test_status_files_are_replaced_whole_and_cleared(tmp_path):
    status.write_status(str(tmp_path), "worker-3", {"connected": True})
    status.write_status(str(tmp_path), "worker-3", {"connected": False})
    assert status.read_statuses(str(tmp_path)) == {"worker-3": {"connected": False}}
    assert os.listdir(tmp_path) == ["status-worker-3.json"]  # no temp file left
    status.remove_statuses(str(tmp_path))
    assert status.read_statuses(str(tmp_path)) == {}


def test_machine_figures_are_fractions():
    collector = SystemCollector()
    sum(i * i for i in range(200_000))  # some CPU time to measure
    assert 0.0 <= collector.cpu_utilization() <= 1.0
    assert 0.0 < memory_utilization() < 1.0
