"""/metrics of a running Stoker: every metric the issue names is there, summed over all
worker processes, and the counts match the actions run."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from google.rpc import code_pb2

from engine.proto import re_pb2
from tests.integration.support import Client, StokerProcess, command, digest_of
from tests.monitor.support import get_json, scrape, value, wait_for

pytestmark = pytest.mark.slow  # starts Stoker

SEED = [
    "buildbuddy_executor_tasks_started_total",
    "buildbuddy_executor_tasks_completed_total",
    "buildbuddy_executor_task_duration_seconds_count",
    "buildbuddy_executor_task_duration_seconds_sum",
    "buildbuddy_executor_task_duration_seconds_bucket",
    "buildbuddy_executor_cpu_utilization",
    "buildbuddy_executor_memory_utilization",
]
STOKER = [
    "stoker_stage_duration_seconds_count",
    "stoker_stage_duration_seconds_bucket",
    "stoker_bytes_total",
    "stoker_cas_hits_total",
    "stoker_cas_misses_total",
    "stoker_action_cache_hits_total",
    "stoker_action_cache_misses_total",
    "stoker_cache_evictions_total",
    "stoker_cache_size_bytes",
    "stoker_queue_depth",
    "stoker_actions_in_flight",
]
STAGES = ("fetch", "stage", "run", "upload")


def test_every_metric_is_exported_before_any_action(stoker: StokerProcess):
    samples = scrape(stoker)
    missing = [name for name in SEED + STOKER if name not in samples]
    assert not missing, f"not in the scrape: {missing}"
    for stage in STAGES:
        assert ("stage", stage) in {k for key in samples["stoker_stage_duration_seconds_count"]
                                    for k in key}
    assert {key for key in samples["stoker_bytes_total"]} == {
        (("direction", "staged"),), (("direction", "uploaded"),)}


def test_counts_match_the_actions_run(stoker: StokerProcess, client: Client):
    before = scrape(stoker)
    n = 4
    inputs = {"in.txt": b"x" * 1000, "d": {"more.txt": b"y" * 24}}
    for i in range(n):
        e = client.run(f"cat in.txt d/more.txt > out.txt; echo {i}", inputs,
                       output_files=["out.txt"])
        assert e.result.exit_code == 0, e.response
    # Served from the ActionCache: no task on a worker, one hit.
    assert client.execute(e.action_digest).response.cached_result
    after = scrape(stoker)

    def delta(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[name][key] - before.get(name, {}).get(key, 0.0)

    assert delta("buildbuddy_executor_tasks_started_total") == n
    assert delta("buildbuddy_executor_tasks_completed_total") == n
    assert delta("buildbuddy_executor_task_duration_seconds_count") == n
    assert delta("buildbuddy_executor_task_duration_seconds_sum") > 0
    for stage in STAGES:
        assert delta("stoker_stage_duration_seconds_count", stage=stage) == n, stage
        assert delta("stoker_stage_duration_seconds_bucket", stage=stage, le="+Inf") == n
    # Inputs: 1024 bytes per action; outputs: out.txt (1024) plus stdout ("i\n", 2).
    assert delta("stoker_bytes_total", direction="staged") == n * 1024
    assert delta("stoker_bytes_total", direction="uploaded") == n * (1024 + 2)
    assert delta("stoker_cas_hits_total") == n * 2  # two distinct input blobs each
    assert delta("stoker_cas_misses_total") == 0
    assert delta("stoker_action_cache_misses_total") == n
    assert delta("stoker_action_cache_hits_total") == 1
    assert value(after, "stoker_queue_depth") == 0
    assert value(after, "stoker_actions_in_flight") == 0
    assert value(after, "stoker_cache_size_bytes") >= 1024 + 24
    assert value(after, "stoker_cache_evictions_total") == 0
    assert 0.0 <= value(after, "buildbuddy_executor_cpu_utilization") <= 1.0
    assert 0.0 < value(after, "buildbuddy_executor_memory_utilization") < 1.0


def test_missing_inputs_count_as_cas_misses(stoker: StokerProcess, client: Client):
    before = scrape(stoker)
    # A root Directory naming a file the CAS lacks: fetch reports it missing.
    root = re_pb2.Directory()
    root.files.add(name="gone.txt", digest=digest_of(b"never uploaded\n"))
    action = client.action(command(["/bin/true"]), client.put_message(root))
    e = client.execute(action)
    assert e.response.status.code == code_pb2.FAILED_PRECONDITION
    after = scrape(stoker)
    assert value(after, "stoker_cas_misses_total") - value(before, "stoker_cas_misses_total") == 1
    assert value(after, "buildbuddy_executor_tasks_completed_total") - \
        value(before, "buildbuddy_executor_tasks_completed_total") == 1


def test_queue_depth_shows_actions_waiting_for_a_slot(stoker: StokerProcess, client: Client):
    # Six actions for four slots (two workers, two at once each): two wait in the queue.
    results: list = []
    runners = [threading.Thread(target=lambda i=i: results.append(
        client.run(f"sleep 2.5; echo {i}"))) for i in range(6)]
    for t in runners:
        t.start()

    def saturated() -> bool:
        # The server samples its queue every second: wait for a scrape after that.
        samples = scrape(stoker)
        return (value(samples, "stoker_queue_depth") == 2
                and value(samples, "stoker_actions_in_flight") == 4)

    try:
        assert wait_for(saturated, "2 queued and 4 in flight", within=5)
    finally:
        for t in runners:
            t.join(timeout=30)
    assert [r.result.exit_code for r in results] == [0] * 6
    assert wait_for(lambda: value(scrape(stoker), "stoker_queue_depth") == 0,
                    "the queue to empty", within=5)


def test_a_killed_worker_takes_its_live_gauge_but_not_its_counts(stoker: StokerProcess,
                                                                  client: Client):
    """Counters of a dead worker stay in the sums; its in-flight gauge goes with it."""
    before = scrape(stoker)
    done: list = []
    runner = threading.Thread(target=lambda: done.append(client.run("sleep 2; echo ok")))
    runner.start()

    def running() -> dict | None:
        doc = get_json(f"{stoker.health_url}/statusz")[1]
        return doc if doc["actions"]["in_flight"] == 1 else None

    status = wait_for(running, "the action to start")
    in_flight = scrape(stoker)
    assert value(in_flight, "stoker_actions_in_flight") == 1
    victims = [w for w in status["workers"] if w["state"] == "running"]
    assert victims
    started_before_kill = value(in_flight, "buildbuddy_executor_tasks_started_total")
    # Kill every worker: the one with the action is among them.
    for w in victims:
        os.kill(w["pid"], signal.SIGKILL)
    runner.join(timeout=60)
    assert done and done[0].result.exit_code == 0  # rerun on a restarted worker
    after = scrape(stoker)
    assert value(after, "stoker_actions_in_flight") == 0
    assert value(after, "buildbuddy_executor_tasks_started_total") >= started_before_kill + 1
    assert value(after, "buildbuddy_executor_tasks_started_total") - \
        value(before, "buildbuddy_executor_tasks_started_total") == 2  # killed run + rerun


def test_metric_files_are_backed_not_sparse(tmp_path):
    """A sparse mmap file on a full tmpfs kills its process with SIGBUS at the first write to
    a new page; actions can fill /dev/shm, so each process backs its files at start."""
    import subprocess
    import sys

    code = ("import os, engine.metrics\n"
            "d = os.environ['PROMETHEUS_MULTIPROC_DIR']\n"
            "for n in sorted(os.listdir(d)):\n"
            "    st = os.stat(os.path.join(d, n))\n"
            "    print(n, st.st_size, st.st_blocks * 512)\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    rows = [line.split() for line in out if line]
    assert len(rows) >= 3  # counters, gauges, histograms
    for name, size, allocated in rows:
        assert int(allocated) >= int(size) > 0, name


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_metrics_directory_leaves_the_process_running(tmp_path):
    """An action can fill /dev/shm: a process starting then keeps its metrics in memory
    (and says so) instead of dying of SIGBUS on its first write."""
    import subprocess
    import sys

    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        filler = subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/fill", "bs=64k"],
                                capture_output=True)
        assert filler.returncode != 0  # the disk is full now
        code = ("import engine.metrics as m\n"
                "m.TASKS_STARTED.inc(); m.STAGE_HISTOGRAMS['run'].observe(0.1)\n"
                "print('alive')\n")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mnt)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (done.returncode, done.stderr)
        assert done.stdout.strip() == "alive"
        assert "not exported" in done.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
