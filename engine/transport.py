"""Outbound gRPC channels: how a joined Stoker (`stoker executor`) reaches its scheduler and
cache, with TLS and the API key.

Targets say how to connect: grpc://HOST[:PORT] is plaintext (port 80 when absent),
grpcs://HOST[:PORT] is TLS (port 443), unix:/PATH a local socket. A bare HOST:PORT is
refused: Bazel reads it as TLS and grpc as plaintext, so either guess would surprise someone.
TLS verifies the server against the system trust store (SSL_CERT_FILE, else OpenSSL's
default bundle), or against tls.ca_file alone when set; tls.cert_file and tls.key_file add a
client certificate (mutual TLS).

The API key goes on every call as `x-buildbuddy-api-key`: as call credentials over TLS (grpc
then refuses to send it on a connection without privacy), through a client interceptor over
plaintext. Where it comes from (engine/config_file.py applies EXECUTOR_API_KEY over the
file's api_key first): executor.api_key, else env EXECUTOR_API_KEY, else api_key_file. It is
held in an ApiKey, whose repr is redacted, and no message or log line here includes it.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import os
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import grpc

from engine import __version__, logs
from engine.config import Config, ConfigError
from engine.config_file import check_private

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-buildbuddy-api-key"
API_KEY_ENV = "EXECUTOR_API_KEY"
# The config keys TLS errors name: (CA bundle, certificate chain, private key).
TLS_KEYS = ("executor.tls.ca_file", "executor.tls.cert_file", "executor.tls.key_file")
# And those of the embedded endpoint's own TLS and keys (engine/server/auth.py), with the
# `stoker up` flags that set them.
LISTEN_TLS_KEYS = ("executor.listen_tls.cert_file (--tls-cert)",
                   "executor.listen_tls.key_file (--tls-key)")
LISTEN_KEYS_KEY = "executor.listen_api_key_file (--api-key-file)"
# What a metadata value may hold (grpc rejects the rest with the value in its message).
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
_MAX_KEY_FILE_BYTES = 1 << 20
_TARGET = re.compile(r"(grpcs?)://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]@]+)(?::(\d{1,5}))?/?")

# Lease streams stay open for minutes through NATs and load balancers that drop idle flows
# (some after 4-6 minutes): a ping a minute keeps them mapped, and a peer that vanished is
# noticed within 20 s. grpc sends at most two pings between data frames (its default), which
# stays inside the usual server policy (too_many_pings after a third).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_reconnect_backoff_ms", 10_000),  # back within seconds of a scheduler restart
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.primary_user_agent", f"stoker/{__version__}"),
]


class ApiKey:
    """An API key that never shows itself: repr and str name only where it came from."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        if not isinstance(value, str) or not _KEY_CHARS.fullmatch(value):
            # Never the value: a key with a typo is still mostly the key.
            raise ConfigError(f"{source}: an API key must be printable ASCII without spaces")
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey(<redacted>, from {self.source})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an ApiKey is not picklable")  # nor copied into a dump by accident


@dataclass(frozen=True)
class Target:
    address: str  # what grpc dials: HOST:PORT or unix:PATH
    tls: bool


def parse_target(target: str, key: str) -> Target:
    """grpc://, grpcs:// or unix: as a Target; anything else is a ConfigError naming key."""
    if target.startswith("unix:"):
        if len(target) == len("unix:") or any(c.isspace() for c in target):
            raise ConfigError(f"{key}: {target!r} must be unix:/PATH")
        return Target(target, False)
    m = _TARGET.fullmatch(target)
    if m is None:
        if re.fullmatch(r"[^\s/:]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", target):
            raise ConfigError(f"{key}: {target!r} has no scheme, so plaintext or TLS would be "
                              f"a guess: write grpc://{target} (plaintext) or "
                              f"grpcs://{target} (TLS)")
        raise ConfigError(f"{key}: {target!r} must be grpc://HOST[:PORT] (plaintext), "
                          "grpcs://HOST[:PORT] (TLS) or unix:/PATH")
    scheme, host, port = m.groups()
    number = int(port) if port else (443 if scheme == "grpcs" else 80)
    if not 0 < number < 65536:
        raise ConfigError(f"{key}: {target!r}: port {number} is out of range")
    return Target(f"{host}:{number}", scheme == "grpcs")


def check_target(target: str, key: str) -> None:
    """A ConfigError naming key unless target is one parse_target takes."""
    parse_target(target, key)


# ---- files --------------------------------------------------------------------------------


def _read(path: str, key: str, limit: int = _MAX_KEY_FILE_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{key}: {path} is larger than {limit} bytes")
    return data


def read_api_keys(path: str, key: str) -> list[str]:
    """The keys in path, one a line; blank lines and # comments are skipped. A file with
    none is an error: an empty list would lock every client out (or, read as 'no keys
    needed', let every one in)."""
    check_private(path, key)
    try:
        text = _read(path, key).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _KEY_CHARS.fullmatch(line):
            raise ConfigError(f"{key}: {path} line {number}: an API key must be printable "
                              "ASCII without spaces")
        keys.append(line)
    if not keys:
        raise ConfigError(f"{key}: {path} holds no API key (one a line; blank lines and "
                          "# comments are skipped)")
    return keys


def read_ca(path: str, key: str) -> bytes:
    """A PEM bundle of at least one certificate."""
    data = _read(path, key)
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise ConfigError(f"{key}: {path} holds no PEM certificate") from None
    return data


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    raise _Encrypted  # else OpenSSL would prompt on the terminal, or hang a daemon


def read_key_pair(cert_file: str, key_file: str, cert_key: str,
                  key_key: str) -> tuple[bytes, bytes]:
    """(certificate chain, private key), both PEM and matching each other."""
    if bool(cert_file) != bool(key_file):
        missing, given = (key_key, cert_key) if cert_file else (cert_key, key_key)
        raise ConfigError(f"{missing}: must be set with {given}")
    check_private(key_file, key_key)
    cert, private = _read(cert_file, cert_key), _read(key_file, key_key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file,
                                                                password=_no_password)
    except _Encrypted:
        raise ConfigError(f"{key_key}: {key_file} is encrypted; give an unencrypted PEM "
                          "key (readable by Stoker alone)") from None
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or e  # an SSLError's reason; a plain OSError has none
        raise ConfigError(f"{cert_key}, {key_key}: {cert_file} and {key_file} are not a "
                          f"matching PEM certificate and private key ({reason})") from None
    return cert, private


@functools.cache
def system_roots() -> bytes | None:
    """The system trust store (SSL_CERT_FILE, else OpenSSL's default bundle), so a
    company CA added there is trusted; None: grpc's own bundled roots."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                continue
    return None


def check_config(config: Config) -> None:
    """Reads every TLS and key file the config names, so a wrong one is a ConfigError at
    start (and in `stoker config check`), not a crash-looping child."""
    if config.listen_tls_cert_file or config.listen_tls_key_file:
        read_key_pair(config.listen_tls_cert_file, config.listen_tls_key_file,
                      *LISTEN_TLS_KEYS)
    if config.listen_api_key_file:
        read_api_keys(config.listen_api_key_file, LISTEN_KEYS_KEY)
    if config.tls_ca_file:
        read_ca(config.tls_ca_file, TLS_KEYS[0])
    if config.tls_cert_file or config.tls_key_file:
        read_key_pair(config.tls_cert_file, config.tls_key_file, *TLS_KEYS[1:])
    if config.api_key_file:
        _key_from_file(config.api_key_file)


def _key_from_file(path: str) -> ApiKey:
    keys = read_api_keys(path, "executor.api_key_file")
    if len(keys) > 1:
        raise ConfigError(f"executor.api_key_file: {path} holds {len(keys)} keys; the "
                          "scheduler takes one")
    return ApiKey(keys[0], "executor.api_key_file")


def resolve_api_key(config: Config, env: Mapping[str, str] | None = None) -> ApiKey | None:
    """executor.api_key, else env EXECUTOR_API_KEY, else executor.api_key_file; None: none."""
    env = os.environ if env is None else env
    if config.api_key:
        return ApiKey(config.api_key, "executor.api_key")
    if env.get(API_KEY_ENV):
        return ApiKey(env[API_KEY_ENV], API_KEY_ENV)
    if config.api_key_file:
        return _key_from_file(config.api_key_file)
    return None


# ---- metadata on every call ---------------------------------------------------------------

Metadata = tuple[tuple[str, str | bytes], ...]


class _KeyPlugin(grpc.AuthMetadataPlugin):
    """Call credentials: grpc adds the metadata to each call on a TLS connection only."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def __call__(self, context, callback) -> None:
        callback(self._metadata, None)

    def __repr__(self) -> str:
        return f"<call metadata: {', '.join(k for k, _ in self._metadata)}>"


# Headers of the task a call is made for (BuildBuddy's per-task JWT on its cache calls):
# set around the calls with task_metadata(); asyncio tasks started inside inherit it.
_TASK_METADATA: contextvars.ContextVar[Metadata] = contextvars.ContextVar("task_metadata",
                                                                          default=())


@contextlib.contextmanager
def task_metadata(metadata: Metadata) -> Iterator[None]:
    """Every call on an open_channel channel inside the block also carries metadata."""
    token = _TASK_METADATA.set(tuple(metadata))
    try:
        yield
    finally:
        _TASK_METADATA.reset(token)


class _AioMetadata:
    """Adds metadata to each call: the channel's own (plaintext channels, which take no call
    credentials) and the current task's. One instance per call kind: grpc.aio files an
    interceptor under its first kind only."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {', '.join(k for k, _ in self._metadata)}>"

    def _with(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        extra = self._metadata + _TASK_METADATA.get()
        if not extra:
            return details
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *extra))

    async def _call(self, continuation, details, request):
        return await continuation(self._with(details), request)


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await self._call(continuation, details, request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await self._call(continuation, details, request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await self._call(continuation, details, request_iterator)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await self._call(continuation, details, request_iterator)


class _SyncDetails(collections.namedtuple(
        "_SyncDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"<call metadata: {', '.join(k for k, _ in self._metadata)}>"

    def _call(self, continuation, details, request):
        new = _SyncDetails(details.method, details.timeout,
                           (*(details.metadata or ()), *self._metadata), details.credentials,
                           getattr(details, "wait_for_ready", None),
                           getattr(details, "compression", None))
        return continuation(new, request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


# ---- channels -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    address: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: Metadata
    options: list


def _plan(target: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
          api_key: ApiKey | str | None, extra_metadata: Iterable[tuple[str, str]], key: str,
          tls_keys: tuple[str, str, str], options: Iterable[tuple[str, object]]) -> _Plan:
    parsed = parse_target(target, key)
    if isinstance(api_key, str):
        api_key = ApiKey(api_key, "api_key")
    metadata: Metadata = tuple((k.lower(), v) for k, v in extra_metadata)
    if api_key is not None:
        metadata += ((API_KEY_HEADER, api_key.reveal()),)
        logs.redact(api_key.reveal(), lasting=True)  # a server may quote it in an error
    merged: dict[str, object] = dict(CHANNEL_OPTIONS)
    merged.update(options)
    credentials = None
    if parsed.tls:
        roots = read_ca(ca_file, tls_keys[0]) if ca_file else system_roots()
        cert = private = None
        if cert_file or key_file:
            cert, private = read_key_pair(cert_file or "", key_file or "", *tls_keys[1:])
        credentials = grpc.ssl_channel_credentials(root_certificates=roots,
                                                   private_key=private,
                                                   certificate_chain=cert)
        if metadata:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_KeyPlugin(metadata)))
    else:
        if ca_file or cert_file or key_file:
            log.warning("%s: %s is plaintext; the tls files are not used for it", key, target)
        if api_key is not None and not _is_local(parsed.address):
            log.warning("%s: %s is plaintext: the API key (%s) crosses the network "
                        "unencrypted; use grpcs://", key, target, api_key.source)
    return _Plan(parsed.address, credentials, metadata, list(merged.items()))


def _is_local(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return address.startswith("unix:") or host in ("localhost", "::1") or \
        host.startswith("127.")


def open_channel(target: str, *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, api_key: ApiKey | str | None = None,
                 extra_metadata: Iterable[tuple[str, str]] = (),
                 key: str = "executor.server", tls_keys: tuple[str, str, str] = TLS_KEYS,
                 options: Iterable[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to target with the API key (and extra_metadata) on every call.
    A bad target or file is a ConfigError naming `key` or the tls_keys."""
    plan = _plan(target, ca_file, cert_file, key_file, api_key, extra_metadata, key,
                 tls_keys, options)
    # Over TLS the channel's metadata rides on the call credentials; the task's always
    # comes through the interceptors.
    own = () if plan.credentials is not None else plan.metadata
    interceptors = [kind(own) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary,
                                           _AioStreamStream)]
    if plan.credentials is not None:
        return grpc.aio.secure_channel(plan.address, plan.credentials, options=plan.options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(plan.address, options=plan.options,
                                     interceptors=interceptors)


def open_sync_channel(target: str, *, ca_file: str | None = None,
                      cert_file: str | None = None, key_file: str | None = None,
                      api_key: ApiKey | str | None = None,
                      extra_metadata: Iterable[tuple[str, str]] = (),
                      key: str = "executor.server", tls_keys: tuple[str, str, str] = TLS_KEYS,
                      options: Iterable[tuple[str, object]] = ()) -> grpc.Channel:
    """open_channel's blocking twin (for tools outside an event loop)."""
    plan = _plan(target, ca_file, cert_file, key_file, api_key, extra_metadata, key,
                 tls_keys, options)
    if plan.credentials is not None:
        return grpc.secure_channel(plan.address, plan.credentials, options=plan.options)
    channel = grpc.insecure_channel(plan.address, options=plan.options)
    return grpc.intercept_channel(channel, _SyncMetadata(plan.metadata)) if plan.metadata \
        else channel


def _from_config(config: Config, target: str, key: str, env: Mapping[str, str] | None,
                 api_key_on_calls: bool) -> grpc.aio.Channel:
    return open_channel(target, ca_file=config.tls_ca_file or None,
                        cert_file=config.tls_cert_file or None,
                        key_file=config.tls_key_file or None,
                        api_key=resolve_api_key(config, env) if api_key_on_calls else None,
                        key=key)


def scheduler_channel(config: Config, env: Mapping[str, str] | None = None, *,
                      api_key_on_calls: bool = True) -> grpc.aio.Channel:
    """The channel to executor.server, with the config's TLS files and (api_key_on_calls)
    the API key on every call."""
    return _from_config(config, config.server, "executor.server", env, api_key_on_calls)


def cache_channel(config: Config, env: Mapping[str, str] | None = None, *,
                  api_key_on_calls: bool = True) -> grpc.aio.Channel:
    """The channel to executor.cache_server (the scheduler's when unset), with the same TLS
    files and API key."""
    if not config.cache_server:
        return scheduler_channel(config, env, api_key_on_calls=api_key_on_calls)
    return _from_config(config, config.cache_server, "executor.cache_server", env,
                        api_key_on_calls)


def api_key_metadata(config: Config, env: Mapping[str, str] | None = None) -> Metadata:
    """The API key as metadata for the calls that carry it (BuildBuddy: its scheduler's
    own), () without one."""
    key = resolve_api_key(config, env)
    if key is None:
        return ()
    logs.redact(key.reveal(), lasting=True)  # a server may quote it in an error
    return ((API_KEY_HEADER, key.reveal()),)
