"""/healthz, /readyz and /statusz of a running Stoker, through a drain."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from engine import __version__, hashing
from tests.integration.support import Client, StokerProcess, start
from tests.monitor.support import get, get_json, wait_for

pytestmark = pytest.mark.slow  # starts Stoker


def _ready(process: StokerProcess):
    code, doc = get_json(f"{process.health_url}/readyz")
    return doc if code == 200 else None


def test_healthz_and_readyz_say_yes_once_serving(stoker: StokerProcess):
    code, doc = get_json(f"{stoker.health_url}/healthz")
    assert (code, doc) == (200, {"healthy": True})
    assert wait_for(lambda: _ready(stoker), "/readyz to say ready") == {"ready": True}


def test_statusz_describes_the_processes_the_scheduler_and_the_cache(stoker: StokerProcess,
                                                                       client: Client):
    assert client.run("cat a.txt", {"a.txt": b"x\n"}).result.exit_code == 0
    wait_for(lambda: get_json(f"{stoker.health_url}/statusz")[1]["scheduler"]
             ["workers_connected"] == 2, "both workers to connect")
    code, doc = get_json(f"{stoker.health_url}/statusz")
    assert code == 200
    assert doc["version"] == __version__
    assert doc["digest_implementation"] == hashing.IMPLEMENTATION
    assert doc["native"] == (hashing.IMPLEMENTATION == "native")
    assert (doc["mode"], doc["state"], doc["ready"]) == ("up", "running", True)
    assert doc["scheduler"]["embedded"] is True and doc["scheduler"]["serving"] is True
    assert [w["name"] for w in doc["workers"]] == ["worker-0", "worker-1"]
    for w in doc["workers"]:
        assert w["state"] == "running" and w["connected"] is True and w["pid"] > 0
        assert w["since"] <= time.time()
    assert doc["processes"]["server"]["state"] == "running"
    assert doc["processes"]["monitor"]["state"] == "running"
    assert doc["actions"]["in_flight"] == 0 and doc["actions"]["queued"] == 0
    assert doc["actions"]["started"] >= 1
    assert doc["actions"]["completed"] == doc["actions"]["started"]
    cache = doc["cache"]
    assert cache["size_bytes"] > 0 and cache["entries"] > 0 and cache["evictions"] == 0
    assert cache["max_size_bytes"] == 10 * 1024**3
    assert 0.0 <= cache["hit_rate"] <= 1.0
    assert cache["action_cache_misses"] >= 1
    # The seed also serves /statusz on its monitoring port.
    code, same = get_json(f"{stoker.metrics_url}/statusz")
    assert code == 200 and same["version"] == __version__


def test_unknown_paths_are_404(stoker: StokerProcess):
    assert get(f"{stoker.health_url}/metrics")[0] == 404
    assert get(f"{stoker.metrics_url}/nope")[0] == 404


def test_readyz_says_no_while_draining_and_healthz_stays_yes(stoker_factory):
    process = start(stoker_factory("draining", workers=1, concurrency=1,
                                   extra_args=["--drain-grace", "20s"]))
    wait_for(lambda: _ready(process), "/readyz to say ready")
    client = Client(process.address)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(client.run("sleep 3; echo done")))
    try:
        runner.start()
        wait_for(lambda: get_json(f"{process.health_url}/statusz")[1]["actions"]
                 ["in_flight"] == 1, "the action to start")
        process.proc.send_signal(signal.SIGTERM)

        def not_ready():
            code, doc = get_json(f"{process.health_url}/readyz")
            return doc if code == 503 else None

        doc = wait_for(not_ready, "/readyz to say 503", within=5)
        assert doc == {"ready": False, "reason": "stoker is draining"}
        assert get_json(f"{process.health_url}/healthz") == (200, {"healthy": True})
        assert get_json(f"{process.health_url}/statusz")[1]["state"] == "draining"
        runner.join(timeout=30)
        assert results and results[0].result.exit_code == 0  # drained, not cut short
        assert process.proc.wait(timeout=30) == 0
    finally:
        client.close()
        runner.join(timeout=30)
