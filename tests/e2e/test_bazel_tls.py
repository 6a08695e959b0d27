"""End to end over TLS: Bazel 4 builds tests/e2e/workspace through `stoker up --tls-cert
--tls-key --api-key-file` on 127.0.0.1, with grpcs://, --tls_certificate and the key in
--remote_header.

Debian's Bazel 4.2.3 cannot do TLS on its own: its netty has no JDK ALPN support (patched
out), so grpcs:// crashes it with "Failed to init TLS infrastructure: JDK provider does not
support ALPN protocol" (exit 37). It works with OpenSSL through netty-tcnative: Debian's
libnetty-tcnative-jni ships the library as libnetty-tcnative.so, but netty loads it only as
libnetty_tcnative.so, and only as a real file of that name (the library checks its own path),
so the test copies it into a directory of its own and points the JVM there with
--host_jvm_args=-Djava.library.path=. scripts/install-test-deps.sh installs the package.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from engine import transport
from tests.e2e.test_bazel import (  # noqa: F401 (root, workspace, local_reference: fixtures)
    BAZEL,
    GOOD_TARGETS,
    Bazel,
    LocalReference,
    Result,
    assert_same_outputs,
    collect_outputs,
    local_reference,
    root,
    run_hello,
    workspace,
)
from tests.integration.support import StokerProcess, start

TCNATIVE = Path("/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so")
INSTALL_BASE = "/usr/share/bazel/"  # Debian's; the JVM's default library path
KEY = "bazel-e2e-key-0c61f4a2"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(BAZEL),
                       reason=f"{BAZEL} is absent (install it with scripts/install-test-deps.sh)"),
    pytest.mark.skipif(not TCNATIVE.exists(),
                       reason=f"{TCNATIVE} is absent: Bazel 4's TLS needs Debian's "
                              "libnetty-tcnative-jni (scripts/install-test-deps.sh)"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def pki(root: Path) -> dict[str, Path]:  # noqa: F811
    d = root / "pki"
    d.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
             "keys": d / "api-keys", "jni": d / "jni"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    files["keys"].write_text(f"# Bazel's key\n{KEY}\n")
    files["key"].chmod(0o600)
    files["keys"].chmod(0o600)
    # A copy, not a symlink: tcnative refuses to load under a path other than its own name.
    files["jni"].mkdir()
    shutil.copyfile(TCNATIVE, files["jni"] / "libnetty_tcnative.so")
    return files


@pytest.fixture(scope="module")
def stoker(root: Path, pki: dict[str, Path]) -> Iterator[StokerProcess]:  # noqa: F811
    # Reachable by the action uids (pytest's own tmp dirs are 0700), as in test_bazel.py.
    data_dir = Path(tempfile.mkdtemp(prefix="stoker-e2e-tls-"))
    data_dir.chmod(0o711)
    process = StokerProcess(
        data_dir, root / "stoker-tls.log", workers=2, default_timeout="60s", monitor=False,
        extra_args=["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                    "--api-key-file", str(pki["keys"])],
        credentials=grpc.ssl_channel_credentials(pki["ca"].read_bytes()),
        metadata=((transport.API_KEY_HEADER, KEY),))
    try:
        start(process)
        yield process
    finally:
        code = process.stop()
        if code not in (None, 0, -signal.SIGTERM):
            print(f"stoker exited with code {code} on SIGTERM\n{process.log_tail()}")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def remote(workspace: Path, root: Path, stoker: StokerProcess,  # noqa: F811
           pki: dict[str, Path]) -> Iterator[Bazel]:
    bazel = Bazel(workspace, root, "remote-tls", stoker)  # type: ignore[arg-type]
    bazel.startup.append(f"--host_jvm_args=-Djava.library.path={INSTALL_BASE}:{pki['jni']}")
    yield bazel
    bazel.shutdown()


def tls_flags(stoker: StokerProcess, pki: dict[str, Path],
              header: str = f"{transport.API_KEY_HEADER}={KEY}") -> list[str]:
    return [
        f"--remote_executor=grpcs://{stoker.address}",
        f"--tls_certificate={pki['ca']}",
        f"--remote_header={header}",
        "--remote_timeout=60",
        "--spawn_strategy=remote",
        "--jobs=8",
    ]


@pytest.fixture(scope="module")
def remote_build(local_reference: LocalReference, remote: Bazel,  # noqa: F811
                 stoker: StokerProcess, pki: dict[str, Path]) -> Result:
    result = remote.run("build", *tls_flags(stoker, pki), *GOOD_TARGETS)
    assert result.returncode == 0, remote.explain(result)
    return result


def test_build_over_grpcs_with_an_api_key_matches_the_local_build(
    remote: Bazel, remote_build: Result, local_reference: LocalReference  # noqa: F811
) -> None:
    counts = remote_build.processes()
    assert counts.get("remote", 0) >= 10, remote.explain(remote_build)
    assert set(counts) <= {"remote", "internal"}, remote.explain(remote_build)
    bin_dir = remote.bin_dir()
    assert_same_outputs(local_reference.outputs, collect_outputs(bin_dir))
    assert run_hello(bin_dir) == local_reference.hello_stdout


def test_rebuild_with_a_bearer_token_is_served_from_the_remote_cache(
    remote: Bazel, remote_build: Result, stoker: StokerProcess, pki: dict[str, Path]
) -> None:
    cleaned = remote.run("clean")
    assert cleaned.returncode == 0, remote.explain(cleaned)
    result = remote.run("build", *tls_flags(stoker, pki, f"authorization=Bearer {KEY}"),
                        *GOOD_TARGETS)
    assert result.returncode == 0, remote.explain(result)
    counts = result.processes()
    assert counts.get("remote cache hit", 0) >= 10, remote.explain(result)


def test_a_wrong_key_fails_the_build_as_unauthenticated(
    remote: Bazel, remote_build: Result, stoker: StokerProcess, pki: dict[str, Path]
) -> None:
    result = remote.run("build", *tls_flags(stoker, pki, "x-buildbuddy-api-key=not-the-key"),
                        "//gen/...")
    assert result.returncode == 34, remote.explain(result)
    assert "UNAUTHENTICATED: missing or wrong API key" in result.output, remote.explain(result)
    assert KEY not in result.output and KEY not in stoker.log_tail(limit=1 << 20)
