"""engine/transport.py: outbound channels against in-process gRPC servers on 127.0.0.1 —
TLS with a CA file or the system trust store, mutual TLS, the API key on every call kind (by
call credentials over TLS, an interceptor over plaintext), the key never in a log line, an
error or a repr, and every bad target or file a ConfigError naming its key."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from engine import transport
from engine.config import Config, ConfigError
from engine.server import auth

KEY = "sk-outbound-3b8e1f0c9a"
METHODS = ("UU", "US", "SU", "SS")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("worker.stoker.test")
    files = {name: d / name for name in (
        "ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "encrypted.key", "not-pem.txt")}
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    other_ca.cert_pem.write_to_path(str(files["other-ca.pem"]))
    for name, leaf in (("server", server), ("client", client)):
        leaf.private_key_pem.write_to_path(str(files[f"{name}.key"]))
        files[f"{name}.pem"].write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    files["encrypted.key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    files["not-pem.txt"].write_text("hello\n")
    for f in files.values():
        f.chmod(0o600)  # keys must be their owner's alone
    return files


# ---- a test server that answers every call kind with the API key it saw ------------------


def _seen(context: grpc.aio.ServicerContext) -> bytes:
    md = dict(context.invocation_metadata() or ())
    return f"{md.get(transport.API_KEY_HEADER, '-')}|{md.get('x-extra', '-')}".encode()


async def _uu(request, context):
    return _seen(context)


async def _us(request, context):
    yield _seen(context)


async def _su(requests, context):
    async for _ in requests:
        pass
    return _seen(context)


async def _ss(requests, context):
    async for _ in requests:
        yield _seen(context)


@asynccontextmanager
async def serve(pki: dict[str, Path] | None = None, *, require_client_cert: bool = False,
                keys: tuple[str, ...] = ()) -> AsyncIterator[int]:
    server = grpc.aio.server(interceptors=[auth.ApiKeyAuth(keys)] if keys else None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {
        "UU": grpc.unary_unary_rpc_method_handler(_uu),
        "US": grpc.unary_stream_rpc_method_handler(_us),
        "SU": grpc.stream_unary_rpc_method_handler(_su),
        "SS": grpc.stream_stream_rpc_method_handler(_ss),
    })])
    if pki is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(pki["server.key"].read_bytes(), pki["server.pem"].read_bytes())],
            root_certificates=pki["ca.pem"].read_bytes() if require_client_cert else None,
            require_client_auth=require_client_cert)
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def call_all(channel: grpc.aio.Channel) -> dict[str, bytes]:
    """Each call kind once; what the server saw."""
    async def two():
        yield b"a"
        yield b"b"

    seen = {
        "UU": await channel.unary_unary("/t.Echo/UU")(b"x", timeout=10),
        "US": [r async for r in channel.unary_stream("/t.Echo/US")(b"x", timeout=10)][0],
        "SU": await channel.stream_unary("/t.Echo/SU")(two(), timeout=10),
        "SS": [r async for r in channel.stream_stream("/t.Echo/SS")(two(), timeout=10)][-1],
    }
    return {k: v.decode() for k, v in seen.items()}


def run(coro):
    return asyncio.run(coro)


# ---- channels -----------------------------------------------------------------------------


def test_tls_with_a_ca_file_carries_the_key_on_every_call_kind(pki):
    async def scenario():
        async with serve(pki) as port:
            async with transport.open_channel(
                    f"grpcs://127.0.0.1:{port}", ca_file=str(pki["ca.pem"]),
                    api_key=transport.ApiKey(KEY, "test"),
                    extra_metadata=[("X-Extra", "1")]) as channel:
                return await call_all(channel)
    assert run(scenario()) == {m: f"{KEY}|1" for m in METHODS}


def test_plaintext_carries_the_key_through_an_interceptor(pki):
    async def scenario():
        async with serve() as port:
            async with transport.open_channel(f"grpc://127.0.0.1:{port}",
                                              api_key=KEY) as channel:
                with_key = await call_all(channel)
            async with transport.open_channel(f"grpc://127.0.0.1:{port}") as channel:
                without = await call_all(channel)
        return with_key, without
    with_key, without = run(scenario())
    assert with_key == {m: f"{KEY}|-" for m in METHODS}
    assert without == {m: "-|-" for m in METHODS}


def test_the_key_passes_a_stoker_api_key_check(pki):
    # engine/server/auth.py on the other end: unary and streaming calls get through.
    async def scenario():
        async with serve(pki, keys=("other", KEY)) as port:
            async with transport.open_channel(f"grpcs://127.0.0.1:{port}",
                                              ca_file=str(pki["ca.pem"]),
                                              api_key=KEY) as channel:
                return await call_all(channel)
    assert set(run(scenario()).values()) == {f"{KEY}|-"}


def _fails(coro) -> grpc.StatusCode:
    try:
        run(coro)
    except grpc.aio.AioRpcError as e:
        return e.code()
    raise AssertionError("the call succeeded")


def test_tls_is_verified_against_the_system_store_by_default(pki, monkeypatch):
    async def call(**kwargs):
        async with serve(pki) as port:
            async with transport.open_channel(f"grpcs://127.0.0.1:{port}",
                                              **kwargs) as channel:
                return await channel.unary_unary("/t.Echo/UU")(b"x", timeout=5)

    transport.system_roots.cache_clear()
    try:
        # The test CA is in no trust store, nor is it the other CA.
        assert _fails(call()) == grpc.StatusCode.UNAVAILABLE
        assert _fails(call(ca_file=str(pki["other-ca.pem"]))) == grpc.StatusCode.UNAVAILABLE
        # Put into the system store (SSL_CERT_FILE), it is trusted with no ca_file.
        monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca.pem"]))
        transport.system_roots.cache_clear()
        assert run(call()) == b"-|-"
    finally:
        transport.system_roots.cache_clear()


def test_mutual_tls_sends_the_client_certificate(pki):
    async def call(**kwargs):
        async with serve(pki, require_client_cert=True) as port:
            async with transport.open_channel(f"grpcs://127.0.0.1:{port}",
                                              ca_file=str(pki["ca.pem"]), api_key=KEY,
                                              **kwargs) as channel:
                return await call_all(channel)

    assert _fails(call()) == grpc.StatusCode.UNAVAILABLE
    assert run(call(cert_file=str(pki["client.pem"]), key_file=str(pki["client.key"]))) == \
        {m: f"{KEY}|-" for m in METHODS}


def test_scheduler_and_cache_channels_follow_the_config(pki):
    async def scenario():
        async with serve(pki) as tls_port, serve() as plain_port:
            config = Config(server=f"grpcs://127.0.0.1:{tls_port}",
                            cache_server=f"grpc://127.0.0.1:{plain_port}",
                            tls_ca_file=str(pki["ca.pem"]),
                            tls_cert_file=str(pki["client.pem"]),
                            tls_key_file=str(pki["client.key"]), api_key=KEY)
            async with transport.scheduler_channel(config, env={}) as scheduler, \
                    transport.cache_channel(config, env={}) as cache:
                return await call_all(scheduler), await call_all(cache)
    scheduler, cache = run(scenario())
    assert scheduler == cache == {m: f"{KEY}|-" for m in METHODS}


def test_the_blocking_twin_works_the_same(pki):
    async def scenario():
        async with serve(pki) as tls_port, serve() as plain_port:
            def blocking() -> list[bytes]:
                out = []
                for target in (f"grpcs://127.0.0.1:{tls_port}",
                               f"grpc://127.0.0.1:{plain_port}"):
                    with transport.open_sync_channel(target, ca_file=str(pki["ca.pem"]),
                                                     api_key=KEY) as channel:
                        out.append(channel.unary_unary("/t.Echo/UU")(b"x", timeout=10))
                        out.append(list(channel.unary_stream("/t.Echo/US")(b"x",
                                                                           timeout=10))[0])
                return out
            return await asyncio.to_thread(blocking)
    assert set(run(scenario())) == {f"{KEY}|-".encode()}


# ---- the key stays secret -----------------------------------------------------------------


def test_the_key_is_never_logged_printed_or_in_an_error(pki, caplog):
    caplog.set_level(logging.DEBUG)
    key = transport.ApiKey(KEY, "executor.api_key")
    assert KEY not in repr(key) and KEY not in str(key) and KEY not in f"{key}"
    assert KEY not in repr(Config(api_key=KEY))
    with pytest.raises(TypeError):
        pickle.dumps(key)

    async def scenario():
        # Refused by the server: the error the client sees says nothing of the key.
        async with serve(pki, keys=("the-right-one",)) as port:
            async with transport.open_channel(f"grpcs://127.0.0.1:{port}",
                                              ca_file=str(pki["ca.pem"]),
                                              api_key=key) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await channel.unary_unary("/t.Echo/UU")(b"x", timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in str(e.value) and KEY not in repr(e.value)
        # Plaintext to a remote host warns, naming where the key came from, not the key
        # (no call is made: .invalid never resolves, and nothing dials it).
        channel = transport.open_channel("grpc://scheduler.invalid:1985", api_key=key)
        await channel.close()

    run(scenario())
    assert "crosses the network unencrypted" in caplog.text
    assert "executor.api_key" in caplog.text
    assert KEY not in caplog.text


@pytest.mark.parametrize("value", ["two words", "tab\there", "ключ", ""])
def test_a_malformed_key_is_refused_without_being_echoed(value):
    with pytest.raises(ConfigError) as e:
        transport.ApiKey(value, "EXECUTOR_API_KEY")
    assert "EXECUTOR_API_KEY: an API key must be printable ASCII" in str(e.value)
    assert not value or value not in str(e.value)


# ---- where the key comes from ---------------------------------------------------------------


def test_api_key_precedence_config_then_env_then_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("# the executor's key\n\nfrom-file\n")
    key_file.chmod(0o600)
    env = {"EXECUTOR_API_KEY": "from-env"}
    both = Config(api_key="from-config", api_key_file=str(key_file))
    assert transport.resolve_api_key(both, env).reveal() == "from-config"
    assert transport.resolve_api_key(Config(api_key_file=str(key_file)), env).reveal() == \
        "from-env"
    from_file = transport.resolve_api_key(Config(api_key_file=str(key_file)), {})
    assert from_file.reveal() == "from-file" and from_file.source == "executor.api_key_file"
    assert transport.resolve_api_key(Config(), {}) is None


@pytest.mark.parametrize("text,message", [
    ("", "holds no API key"),
    ("# only a comment\n\n", "holds no API key"),
    ("one\ntwo\n", "holds 2 keys; the scheduler takes one"),
    ("with space\n", "line 1: an API key must be printable ASCII"),
])
def test_a_bad_api_key_file_names_the_key(tmp_path, text, message):
    path = tmp_path / "key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"executor.api_key_file: .*{message}"):
        transport.resolve_api_key(Config(api_key_file=str(path)), {})
    with pytest.raises(ConfigError, match="executor.api_key_file: cannot read"):
        transport.resolve_api_key(Config(api_key_file=str(tmp_path / "absent")), {})


# ---- targets and files ------------------------------------------------------------------------


@pytest.mark.parametrize("target,message", [
    ("127.0.0.1:1985", "has no scheme, so plaintext or TLS would be a guess: write "
                       "grpc://127.0.0.1:1985 (plaintext) or grpcs://127.0.0.1:1985 (TLS)"),
    ("localhost:443", "has no scheme"),
    ("http://host:80", "must be grpc://HOST[:PORT] (plaintext), grpcs://HOST[:PORT] (TLS)"),
    ("grpcs://", "must be grpc://"),
    ("grpc://host:99999", "port 99999 is out of range"),
    ("grpc://host:1/path", "must be grpc://"),
    ("grpcs://user@host:1", "must be grpc://"),
    ("unix:", "must be unix:/PATH"),
])
def test_a_bad_target_is_a_config_error_naming_the_key(target, message):
    with pytest.raises(ConfigError) as e:
        transport.open_channel(target, key="executor.cache_server")
    assert str(e.value).startswith(f"executor.cache_server: {target!r}")
    assert message in str(e.value)


@pytest.mark.parametrize("target,address,tls", [
    ("grpcs://remote.example.com", "remote.example.com:443", True),
    ("grpc://10.0.0.1", "10.0.0.1:80", False),
    ("grpcs://[::1]:8443/", "[::1]:8443", True),
    ("unix:/run/stoker.sock", "unix:/run/stoker.sock", False),
])
def test_targets_parse(target, address, tls):
    assert transport.parse_target(target, "k") == transport.Target(address, tls)


def test_bad_tls_files_are_config_errors_naming_the_key(pki, tmp_path):
    target = "grpcs://127.0.0.1:1"
    cases = [
        (dict(ca_file=str(tmp_path / "absent.pem")),
         "executor.tls.ca_file: cannot read"),
        (dict(ca_file=str(pki["not-pem.txt"])),
         "executor.tls.ca_file: " + str(pki["not-pem.txt"]) + " holds no PEM certificate"),
        (dict(cert_file=str(pki["client.pem"])),
         "executor.tls.key_file: must be set with executor.tls.cert_file"),
        (dict(key_file=str(pki["client.key"])),
         "executor.tls.cert_file: must be set with executor.tls.key_file"),
        (dict(cert_file=str(pki["client.pem"]), key_file=str(pki["server.key"])),
         "executor.tls.cert_file, executor.tls.key_file: "),
        (dict(cert_file=str(pki["client.pem"]), key_file=str(pki["encrypted.key"])),
         "executor.tls.key_file: " + str(pki["encrypted.key"]) + " is encrypted"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            transport.open_channel(target, **kwargs)
        assert str(e.value).startswith(message), (kwargs, str(e.value))
