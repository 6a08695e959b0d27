"""`stoker up --tls-cert --tls-key --api-key-file` on a real Stoker: TLS on the REAPI port,
an API key on every call of every service (x-buildbuddy-api-key or authorization: Bearer),
UNAUTHENTICATED otherwise without echoing what was sent, and actions still run end to end
(the workers' own link, the data directory's unix socket, needs neither)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from engine import transport
from engine.proto import bs_grpc, bs_pb2, operations_grpc, operations_pb2, re_grpc, re_pb2
from tests.integration.support import CLIENT_OPTIONS, Client, StokerProcess, digest_of, start

KEY_ONE = "stoker-it-key-one-7f3a9c"
KEY_TWO = "stoker-it-key-two-d41e08"
WRONG = "stoker-it-wrong-key-55c2b1"
MISSING = digest_of(b"no such blob, nowhere")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, plus the keys file."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
             "keys": d / "api-keys"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    files["keys"].write_text(f"# REAPI clients\n\n{KEY_ONE}\n  # rotated in:\n{KEY_TWO}\n")
    files["key"].chmod(0o600)  # Stoker refuses secrets open to others
    files["keys"].chmod(0o600)
    return files


@pytest.fixture(scope="module")
def secure(base_dir: Path, pki: dict[str, Path]) -> Iterator[StokerProcess]:
    process = StokerProcess(
        base_dir / "tls-data", base_dir / "tls.log", workers=1,
        extra_args=["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                    "--api-key-file", str(pki["keys"]), "--debug"],
        credentials=grpc.ssl_channel_credentials(pki["ca"].read_bytes()),
        metadata=((transport.API_KEY_HEADER, KEY_ONE),))
    start(process)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tls_channel(secure: StokerProcess, pki: dict[str, Path]) -> Iterator[grpc.Channel]:
    """TLS, no key of its own: each call passes its metadata."""
    channel = grpc.secure_channel(secure.address,
                                  grpc.ssl_channel_credentials(pki["ca"].read_bytes()))
    yield channel
    channel.close()


def _calls(ch: grpc.Channel) -> dict[str, Callable[[tuple], object]]:
    """One call of each method kind on every REAPI service, by name."""
    caps = re_grpc.CapabilitiesStub(ch)
    cas = re_grpc.ContentAddressableStorageStub(ch)
    ac = re_grpc.ActionCacheStub(ch)
    exe = re_grpc.ExecutionStub(ch)
    ops = operations_grpc.OperationsStub(ch)
    bs = bs_grpc.ByteStreamStub(ch)
    blob = f"blobs/{MISSING.hash}/{MISSING.size_bytes}"
    t = 10
    return {
        "Capabilities.GetCapabilities": lambda md: caps.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(), metadata=md, timeout=t),
        "CAS.FindMissingBlobs": lambda md: cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[MISSING]), metadata=md, timeout=t),
        "CAS.BatchUpdateBlobs": lambda md: cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(), metadata=md, timeout=t),
        "CAS.GetTree": lambda md: list(cas.GetTree(
            re_pb2.GetTreeRequest(root_digest=MISSING), metadata=md, timeout=t)),
        "ActionCache.GetActionResult": lambda md: ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=MISSING), metadata=md, timeout=t),
        "ActionCache.UpdateActionResult": lambda md: ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=MISSING), metadata=md, timeout=t),
        "Execution.Execute": lambda md: list(exe.Execute(
            re_pb2.ExecuteRequest(action_digest=MISSING), metadata=md, timeout=t)),
        "Execution.WaitExecution": lambda md: list(exe.WaitExecution(
            re_pb2.WaitExecutionRequest(name="no-such-operation"), metadata=md, timeout=t)),
        "Operations.GetOperation": lambda md: ops.GetOperation(
            operations_pb2.GetOperationRequest(name="no-such-operation"), metadata=md,
            timeout=t),
        "ByteStream.Read": lambda md: list(bs.Read(
            bs_pb2.ReadRequest(resource_name=blob), metadata=md, timeout=t)),
        "ByteStream.Write": lambda md: bs.Write(iter([bs_pb2.WriteRequest(
            resource_name=f"uploads/0b1c/{blob}", data=b"x", finish_write=True)]),
            metadata=md, timeout=t),
        "ByteStream.QueryWriteStatus": lambda md: bs.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=f"uploads/0b1c/{blob}"), metadata=md,
            timeout=t),
        "unknown method": lambda md: ch.unary_unary("/no.such.Service/Method")(
            b"", metadata=md, timeout=t),
    }


def _code(call: Callable[[tuple], object], metadata: tuple) -> grpc.StatusCode:
    try:
        call(metadata)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            for secret in (KEY_ONE, KEY_TWO, WRONG):
                assert secret not in (e.details() or ""), "the error echoes a key"
        return e.code()
    return grpc.StatusCode.OK


METHODS = ["Capabilities.GetCapabilities", "CAS.FindMissingBlobs", "CAS.BatchUpdateBlobs",
           "CAS.GetTree", "ActionCache.GetActionResult", "ActionCache.UpdateActionResult",
           "Execution.Execute", "Execution.WaitExecution", "Operations.GetOperation",
           "ByteStream.Read", "ByteStream.Write", "ByteStream.QueryWriteStatus",
           "unknown method"]


@pytest.mark.parametrize("method", METHODS)
def test_every_call_needs_one_of_the_keys(tls_channel, method):
    calls = _calls(tls_channel)
    assert sorted(calls) == sorted(METHODS)
    call = calls[method]
    refused = {
        "no key": (),
        "a wrong key": ((transport.API_KEY_HEADER, WRONG),),
        "a wrong bearer": (("authorization", f"Bearer {WRONG}"),),
        "a key under another scheme": (("authorization", f"Basic {KEY_ONE}"),),
        "an empty key": ((transport.API_KEY_HEADER, "   "),),
    }
    for what, metadata in refused.items():
        assert _code(call, metadata) == grpc.StatusCode.UNAUTHENTICATED, what
    accepted = {
        "the first key": ((transport.API_KEY_HEADER, KEY_ONE),),
        "the second key as a bearer token": (("authorization", f"Bearer {KEY_TWO}"),),
        "a lower-case bearer": (("authorization", f"bearer {KEY_ONE}"),),
        "a wrong key beside a right one": ((transport.API_KEY_HEADER, WRONG),
                                           ("authorization", f"Bearer {KEY_TWO}")),
    }
    for what, metadata in accepted.items():
        # Whatever the bogus request earns (NOT_FOUND...), it is past the key check.
        assert _code(call, metadata) != grpc.StatusCode.UNAUTHENTICATED, what


def test_a_plaintext_client_gets_nothing_from_the_tls_port(secure):
    with grpc.insecure_channel(secure.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), timeout=5,
                metadata=((transport.API_KEY_HEADER, KEY_ONE),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(secure):
    # The system trust store does not hold the test CA: TLS is really verified.
    with grpc.secure_channel(secure.address, grpc.ssl_channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as e:
            re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), timeout=5,
                metadata=((transport.API_KEY_HEADER, KEY_ONE),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_action_runs_end_to_end_over_tls_with_a_key(secure, pki):
    channel = transport.open_sync_channel(f"grpcs://{secure.address}", ca_file=str(pki["ca"]),
                                          api_key=KEY_TWO, options=CLIENT_OPTIONS)
    client = Client(secure.address, channel=channel)
    try:
        ex = client.run("echo over-tls > out.txt; cat in.txt >> out.txt",
                        {"in.txt": b"input bytes\n"}, output_paths=["out.txt"])
        response = ex.response
        assert response.status.code == 0, response.status
        assert response.result.exit_code == 0
        [out] = response.result.output_files
        assert client.read(out.digest) == b"over-tls\ninput bytes\n"
        # Again: now an action cache hit, still through the key check.
        again = client.execute(ex.action_digest)
        assert again.response.cached_result
    finally:
        client.close()


def test_no_key_reaches_the_log_or_statusz(secure, tls_channel):
    # Stoker runs with --debug: refused calls are logged, and must not say with what.
    calls = _calls(tls_channel)
    assert _code(calls["CAS.FindMissingBlobs"], ((transport.API_KEY_HEADER, WRONG),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    log = secure.log_path.read_text(errors="replace")
    assert "serving REAPI on grpcs://" in log and "API key required" in log
    with urllib.request.urlopen(f"{secure.health_url}/statusz", timeout=10) as reply:
        statusz = reply.read().decode()
    json.loads(statusz)
    for secret in (KEY_ONE, KEY_TWO, WRONG):
        assert secret not in log
        assert secret not in statusz
