import pytest

from engine.cas.local_disk import LocalDiskStore


@pytest.fixture
def store(tmp_path):
    s = LocalDiskStore(str(tmp_path / "cas"))
    yield s
    s.close()
