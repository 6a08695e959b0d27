import os
import shutil
import tempfile

import pytest

from engine.cas.local_disk import LocalDiskStore


@pytest.fixture
def open_dir():
    """A directory every user can reach (pytest's own tmp dirs are private to root), for
    tests that run actions as another user."""
    path = tempfile.mkdtemp(prefix="stoker-worker-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def store(tmp_path):
    s = LocalDiskStore(str(tmp_path / "cas"))
    yield s
    s.close()
