"""The TLS and API-key settings: executor.yaml's api_key_file, cache_server, listen_tls.* and
listen_api_key_file, and `stoker up`'s --tls-cert, --tls-key and --api-key-file. Every file is
read when the config loads, so a wrong one is an error naming its key (and never quoting a
key), not a crash-looping child later."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trustme

from engine import config_file, transport
from engine.config import Config, ConfigError

SECRET = "cfg-secret-9d2c7e"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    one, two = ca.issue_cert("127.0.0.1"), ca.issue_cert("localhost")
    files = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem",
             "other_key": d / "other.key", "keys": d / "keys", "empty": d / "empty",
             "key_file": d / "key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["cert"].write_bytes(b"".join(b.bytes() for b in one.cert_chain_pems))
    one.private_key_pem.write_to_path(str(files["key"]))
    two.private_key_pem.write_to_path(str(files["other_key"]))
    files["keys"].write_text(f"# comment\n\n{SECRET}\nsecond-key\n")
    files["empty"].write_text("# nothing but comments\n\n")
    files["key_file"].write_text(f"{SECRET}\n")
    for f in files.values():
        f.chmod(0o600)  # keys must be their owner's alone; the rest may as well be
    return {k: str(v) for k, v in files.items()}


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "executor.yaml"
    p.write_text(textwrap.dedent(text))
    p.chmod(0o600)  # some hold an api_key
    return str(p)


def test_the_new_keys_load(tmp_path, pki):
    c = config_file.load(write(tmp_path, f"""
        executor:
          server: grpcs://scheduler.example.com
          cache_server: grpcs://cache.example.com:8443
          api_key_file: {pki["key_file"]}
          tls:
            ca_file: {pki["ca"]}
          listen_tls:
            cert_file: {pki["cert"]}
            key_file: {pki["key"]}
          listen_api_key_file: {pki["keys"]}
    """), env={})
    assert c.cache_server == "grpcs://cache.example.com:8443"
    assert c.api_key_file == pki["key_file"] and c.api_key == ""
    assert (c.listen_tls_cert_file, c.listen_tls_key_file) == (pki["cert"], pki["key"])
    assert c.listen_api_key_file == pki["keys"]
    # The keys themselves are read where they are used, never carried in the Config.
    assert SECRET not in c.to_json()


@pytest.mark.parametrize(("body", "secret", "key"), [
    ("api_key_file: {key_file}\n", "key_file", "executor.api_key_file"),
    ("listen_api_key_file: {keys}\n", "keys", r"executor.listen_api_key_file \(--api-key-file\)"),
    ("listen_tls:\n    cert_file: {cert}\n    key_file: {key}\n", "key",
     r"executor.listen_tls.key_file \(--tls-key\)"),
    ("server: grpcs://s.example.com\n  tls:\n    cert_file: {cert}\n    key_file: {key}\n",
     "key", "executor.tls.key_file"),
])
@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_secret_file_open_to_others_is_refused(tmp_path, pki, body, secret, key, mode):
    """What `echo KEY > keys` makes (0644) would let every local user, and every action
    where actions share the host's files, read the key: Stoker refuses to start with it."""
    path = pki[secret]
    os.chmod(path, mode)
    try:
        with pytest.raises(ConfigError, match=rf"{key}: {path} holds a secret but is open to "
                           rf"others \(mode 0{mode:o}\); make it the owner's alone: chmod 600"):
            transport.check_config(config_file.load(
                write(tmp_path, "executor:\n  " + body.format(**pki)), env={}))
    finally:
        os.chmod(path, 0o600)


@pytest.mark.parametrize("body,message", [
    ("listen_tls:\n    cert_file: {cert}\n",
     "executor.listen_tls.key_file (--tls-key): must be set with "
     "executor.listen_tls.cert_file (--tls-cert)"),
    ("listen_tls:\n    cert_file: {cert}\n    key_file: {other_key}\n",
     "are not a matching PEM certificate and private key"),
    ("listen_tls:\n    cert_file: {ca}x\n    key_file: {key}\n",
     "executor.listen_tls.cert_file (--tls-cert): cannot read"),
    ("listen_api_key_file: {empty}\n",
     "executor.listen_api_key_file (--api-key-file): {empty} holds no API key"),
    ("api_key_file: {keys}\n", "executor.api_key_file: {keys} holds 2 keys"),
    ("tls:\n    ca_file: {key}\n", "executor.tls.ca_file: {key} holds no PEM certificate"),
    ("cache_server: cache.example.com:443\n", "executor.cache_server: 'cache.example.com:443' "
                                              "must be grpc://HOST[:PORT]"),
])
def test_a_wrong_file_or_target_is_an_error_naming_the_key(tmp_path, pki, body, message):
    path = write(tmp_path, "executor:\n  " + body.format(**pki))
    with pytest.raises(ConfigError) as e:
        config_file.load(path, env={})
    assert message.format(**pki) in str(e.value)
    assert str(e.value).startswith(path)
    assert SECRET not in str(e.value)


def test_config_repr_never_shows_the_api_key():
    assert SECRET not in repr(Config(api_key=SECRET))
    assert "api_key_file=''" in repr(Config())


def run_stoker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60)


def test_config_keys_lists_the_new_keys():
    r = run_stoker("config", "keys")
    for key in ("executor.api_key_file", "executor.cache_server",
                "executor.listen_tls.cert_file", "executor.listen_tls.key_file",
                "executor.listen_api_key_file"):
        assert key in r.stdout


@pytest.mark.parametrize("flags,message", [
    (["--api-key-file", "{empty}"],
     "executor.listen_api_key_file (--api-key-file): {empty} holds no API key"),
    (["--tls-cert", "{cert}"], "executor.listen_tls.key_file (--tls-key): must be set"),
    (["--tls-key", "{key}"], "executor.listen_tls.cert_file (--tls-cert): must be set"),
])
def test_up_refuses_bad_security_flags_before_starting(tmp_path, pki, flags, message):
    r = run_stoker("up", "--data-dir", str(tmp_path / "data"),
                   *[f.format(**pki) for f in flags])
    assert r.returncode == 2, r.stderr
    assert message.format(**pki) in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_executor_takes_no_listen_flags():
    r = run_stoker("executor", "--tls-cert", "x")
    assert r.returncode == 2 and "unrecognized arguments: --tls-cert" in r.stderr
