"""Starting with an HTTP address that is taken or malformed fails at once, naming the key;
'off' runs no monitor at all."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.support import REPO, StokerProcess, free_port, start

pytestmark = pytest.mark.slow  # starts Stoker


def _up(data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "up", "--data-dir", str(data_dir),
         "--listen", f"127.0.0.1:{free_port()}", "--workers", "1", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("key", ["health_listen", "metrics_listen"])
def test_an_address_in_use_fails_startup_naming_the_key(base_dir: Path, key: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        other = "health_listen" if key == "metrics_listen" else "metrics_listen"
        r = _up(base_dir / f"in-use-{key}",
                f"--{key.replace('_', '-')}", f"127.0.0.1:{port}",
                f"--{other.replace('_', '-')}", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2, r.stderr
    assert f"{key}: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "serving REAPI" not in r.stderr  # nothing was started


def test_a_malformed_address_is_a_configuration_error(base_dir: Path):
    r = _up(base_dir / "malformed", "--health-listen", "localhost", "--metrics-listen", "off")
    assert r.returncode == 2
    assert "health_listen: 'localhost' must be HOST:PORT" in r.stderr


def test_off_runs_no_monitor(base_dir: Path):
    process = start(StokerProcess(base_dir / "off", base_dir / "off.log", workers=1,
                                  monitor=False))
    try:
        pids = (base_dir / "off" / "run").glob("*.pid")
        assert sorted(p.name for p in pids) == ["server.pid", "worker-0.pid"]
    finally:
        assert process.stop() == 0
