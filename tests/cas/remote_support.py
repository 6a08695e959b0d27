"""One real `python -m engine up` shared by the tests that need a remote CAS (test_remote.py
and the BlobStore contract test), started on first use and stopped when pytest exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from engine.cas.remote import RemoteStore
from tests.integration.support import StokerProcess

_shared: StokerProcess | None = None


def new_server(name: str = "remote-cas") -> StokerProcess:
    """A started Stoker in its own data directory; the caller stops it (stop_server)."""
    # Searchable by 'nobody' (who would run actions), as `engine up` insists.
    base = Path(tempfile.mkdtemp(prefix=f"stoker-{name}-", dir="/tmp"))
    base.chmod(0o755)
    process = StokerProcess(base / "data", base / "stoker.log", workers=1, concurrency=1)
    process.start()
    return process


def stop_server(process: StokerProcess) -> None:
    process.stop()
    shutil.rmtree(process.data_dir.parent, ignore_errors=True)


def shared_server() -> StokerProcess:
    global _shared
    if _shared is None or not _shared.alive():
        _shared = new_server()
        atexit.register(stop_server, _shared)
    return _shared


def remote_store(tmp_path=None, **kwargs) -> RemoteStore:
    return RemoteStore.connect(shared_server().address, **kwargs)
