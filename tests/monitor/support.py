"""Reading the monitor's endpoints: plain urllib and prometheus_client's own parser."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.support import StokerProcess


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(HTTP status, body), errors included (503 is an answer, not a failure)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> tuple[int, dict]:
    code, body = get(url)
    return code, json.loads(body)


def scrape(process: StokerProcess) -> dict[str, dict[tuple, float]]:
    """Sample name → {sorted label items: value}, parsed by prometheus_client's own parser."""
    code, body = get(f"{process.metrics_url}/metrics")
    assert code == 200, body
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    assert name in samples, f"{name} is not in the scrape: {sorted(samples)}"
    return samples[name][tuple(sorted(labels.items()))]


def wait_for(probe: Callable[[], object], what: str, within: float = 15.0) -> object:
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
