"""Who may call UpdateActionResult (executor.action_cache_writes), through the servicer and
its error edge, with a stand-in for grpc's context: fast, no Stoker started."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from engine import config_file, transport
from engine.cas.local_disk import LocalDiskStore
from engine.config import Config, ConfigError
from engine.proto import re_pb2
from engine.server.action_cache import ActionCache
from engine.server.action_cache_service import ActionCacheService
from engine.server.auth import ApiKeyAuth

KEYS = ApiKeyAuth(["key-one", "key-two"])
KEYED = ((transport.API_KEY_HEADER, "key-two"),)
BEARER = (("authorization", "Bearer key-one"),)
WRONG = ((transport.API_KEY_HEADER, "not-a-key"),)


class Aborted(Exception):
    pass


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.message = ""

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code, message, trailing_metadata=()):
        self.code, self.message = code, message
        raise Aborted


def update(tmp_path: Path, writes: str, keys: ApiKeyAuth | None,
           metadata: tuple[tuple[str, str], ...]) -> Context:
    """One UpdateActionResult of a valid, empty result; the context tells what happened."""
    with LocalDiskStore(str(tmp_path / "cas")) as cas:
        service = ActionCacheService(ActionCache(str(tmp_path / "ac"), cas), writes, keys)
        context = Context(metadata)
        action = re_pb2.Digest(hash="ab" * 32, size_bytes=3)
        request = re_pb2.UpdateActionResultRequest(action_digest=action,
                                                   action_result=re_pb2.ActionResult())
        try:
            asyncio.run(service.UpdateActionResult(request, context))
        except Aborted:
            pass
        return context


@pytest.mark.parametrize(("writes", "keys", "metadata"), [
    ("all", None, ()),
    ("all", KEYS, KEYED),  # the interceptor admitted it: it had a key
    ("keyed", KEYS, KEYED),
    ("keyed", KEYS, BEARER),
])
def test_allowed_writes(tmp_path, writes, keys, metadata):
    assert update(tmp_path, writes, keys, metadata).code is None


@pytest.mark.parametrize(("writes", "keys", "metadata", "why"), [
    ("keyed", KEYS, (), "carries no valid API key"),
    ("keyed", KEYS, WRONG, "carries no valid API key"),
    ("keyed", None, KEYED, "has no API keys (executor.listen_api_key_file)"),
    ("none", KEYS, KEYED, "action_cache_writes: none"),
    ("none", None, (), "action_cache_writes: none"),
])
def test_refused_writes_name_the_key_to_change(tmp_path, writes, keys, metadata, why):
    context = update(tmp_path, writes, keys, metadata)
    assert context.code == grpc.StatusCode.PERMISSION_DENIED
    assert "executor.action_cache_writes" in context.message and why in context.message
    assert "key-one" not in context.message and "not-a-key" not in context.message


def test_the_policy_is_a_config_key_defaulting_to_all(tmp_path):
    assert Config().action_cache_writes == "all"
    path = tmp_path / "executor.yaml"
    path.write_text("executor:\n  action_cache_writes: keyed\n")
    assert config_file.load(str(path), env={}).action_cache_writes == "keyed"
    path.write_text("executor:\n  workers: 1\n  action_cache_writes: some\n")
    with pytest.raises(ConfigError, match=r"executor.yaml:3: executor.action_cache_writes: "
                                          r"'some' is not one of all, keyed, none"):
        config_file.load(str(path), env={})
    with pytest.raises(ConfigError, match="action_cache_writes: 'some' is not one of"):
        Config(action_cache_writes="some").validated()
    assert "executor.action_cache_writes: who may write the action cache" in \
        config_file.describe()
