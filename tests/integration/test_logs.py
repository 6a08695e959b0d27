"""Logs: with --log-format json every line Stoker writes is one JSON object; each action gets
one line with its digests, outcome and per-stage durations; lifecycle events get theirs."""

from __future__ import annotations

import orjson

from tests.integration.support import Client, start


def test_json_logs_have_one_line_per_action_and_per_lifecycle_event(stoker_factory):
    process = start(stoker_factory("json-logs", extra_args=["--log-format", "json"]))
    client = Client(process.address)
    try:
        ok = client.run("echo hi", skip_cache_lookup=True)
        failed = client.run("exit 3", skip_cache_lookup=True)
    finally:
        client.close()
    assert process.stop() == 0
    lines = process.log_path.read_text().splitlines()
    entries = [orjson.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert all({"ts", "level", "proc", "msg"} <= e.keys() for e in entries)

    actions = [e for e in entries if e["msg"] == "action done"]
    by_digest = {e["action"]: e for e in actions}
    assert len(actions) == 2 and len(by_digest) == 2
    for ex, exit_code in ((ok, 0), (failed, 3)):
        d = ex.action_digest
        entry = by_digest[f"{d.hash}/{d.size_bytes}"]
        assert entry["status"] == "OK" and entry["exit_code"] == exit_code
        assert entry["proc"].startswith("worker")
        for stage in ("fetch", "stage", "run", "upload", "total"):
            assert entry[f"{stage}_ms"] >= 0
        assert entry["total_ms"] >= entry["run_ms"]

    messages = " | ".join(e["msg"] for e in entries)
    for event in ("serving REAPI", "bot session", "draining", "server stopping"):
        assert event in messages, f"no lifecycle line for {event!r} in: {messages}"
