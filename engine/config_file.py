"""executor.yaml: the seed's executor keys plus Stoker's own, read into a Config.

Every key is checked against the table below: an unknown key, a wrong type or an impossible
value is a ConfigError that names the key and its line. Scalars may use ${VAR} (an unset
variable is an error, not an empty string: an empty api_key is a silent failure later).
EXECUTOR_API_KEY and EXECUTOR_SERVER, when set, win over the file.

The API key sent to a scheduler comes from, first to last: EXECUTOR_API_KEY, executor.api_key,
executor.api_key_file (engine/transport.py). It is never logged, and Config's repr omits it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from engine.config import Config, ConfigError, parse_duration, parse_size

ENV_OVERRIDES = {"EXECUTOR_API_KEY": "api_key", "EXECUTOR_SERVER": "server"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Key:
    field: str  # the Config field it sets
    kind: Callable[[Any, str], Any]  # (value, key name) -> checked value
    doc: str


# -- value checkers: each takes the YAML value and the key's dotted name ----------------------


def _str(v: Any, key: str) -> str:
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ConfigError(f"{key}: expected a string, got {_kind(v)}")
    return str(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _count(minimum: int) -> Callable[[Any, str], int]:
    def check(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected a whole number, got {_kind(v)} {v!r}")
        if v < minimum:
            raise ConfigError(f"{key}: must be at least {minimum}, got {v}")
        return v
    return check


def _bytes(v: Any, key: str) -> int:
    """A byte count: 16000000000 or '16G'."""
    if isinstance(v, str):
        return parse_size(v, key)
    return _count(0)(v, key)


def _duration(v: Any, key: str) -> float:
    """'600s', '10m', '1h', or a number of seconds; positive."""
    if isinstance(v, bool):
        raise ConfigError(f"{key}: expected a duration like 600s, got {v!r}")
    seconds = float(v) if isinstance(v, int | float) else parse_duration(_str(v, key), key)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be positive, got {v!r}")
    return seconds


def _one_of(*choices: str) -> Callable[[Any, str], str]:
    def check(v: Any, key: str) -> str:
        s = _str(v, key)
        if s not in choices:
            raise ConfigError(f"{key}: {s!r} is not one of {', '.join(choices)}")
        return s
    return check


def _address(v: Any, key: str) -> str:
    s = _str(v, key)
    if not re.fullmatch(r"[^\s:]*:\d{1,5}", s) or int(s.rpartition(":")[2]) > 65535:
        raise ConfigError(f"{key}: {s!r} must be HOST:PORT (e.g. 0.0.0.0:8080)")
    return s


def _optional_address(v: Any, key: str) -> str:
    """HOST:PORT, or empty / 'off' to turn the endpoint off."""
    if v is False:  # YAML 1.1 reads a bare `off` as false
        return ""
    s = _str(v, key)
    return "" if s in ("", "off") else _address(s, key)


def _target(v: Any, key: str) -> str:
    s = _str(v, key)
    if s and not re.fullmatch(r"(grpcs?://[^\s/]+(:\d{1,5})?/?|unix:/\S+)", s):
        raise ConfigError(f"{key}: {s!r} must be grpc://HOST[:PORT], grpcs://HOST[:PORT] "
                          "or unix:/PATH")
    return s


def _path(v: Any, key: str) -> str:
    s = _str(v, key)
    if not s:
        raise ConfigError(f"{key}: must not be empty")
    return s


def _platform(v: Any, key: str) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a mapping of property names to values, got "
                          f"{_kind(v)}")
    return {_str(k, f"{key} (a name)"): _str(val, f"{key}.{k}") for k, val in v.items()}


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(
        type(v), type(v).__name__)


ISOLATION_TYPES = ("none", "sandbox", "docker", "podman", "firecracker")
PROTOCOLS = ("buildbuddy", "rwapi", "buildbarn")

# The document's shape: nested sections are dicts, leaves are Keys. The seed's keys first.
SCHEMA: dict[str, Any] = {"executor": {
    "server": Key("server", _target, "the scheduler to join (stoker executor)"),
    "api_key": Key("api_key", _str, "sent to the scheduler; env EXECUTOR_API_KEY wins"),
    "pool_name": Key("pool_name", _str, "the pool this executor serves"),
    "instance_name": Key("instance_name", _str, "REAPI instance name"),
    "size_class": Key("size_class", _count(0), "Buildbarn: this worker's size class (as "
                      "bb_worker's size_class; 0 where the platform queue has none)"),
    "fetch_timeout": Key("fetch_timeout_s", _duration, "joined: each call to the remote CAS "
                         "(a stream also gets 1 s per MB, and is cut when it stalls this "
                         "long); 60s"),
    "executor_writes_action_cache": Key(
        "executor_writes_action_cache", _bool, "BuildBuddy: also write successful results "
        "to the ActionCache (apps before PR #8009, 2024-12-06, need it; default true)"),
    "num_concurrent_actions": Key("num_concurrent_actions", _count(1),
                                  "actions at once on this machine"),
    "memory_bytes": Key("memory_bytes", _bytes, "memory actions may use; 0: the machine's"),
    "milli_cpu": Key("milli_cpu", _count(0), "CPU actions may use, 1000 per core; 0: all"),
    "isolation": {
        "type": Key("isolation_type", _one_of(*ISOLATION_TYPES), "how actions are isolated"),
        "default_image": Key("default_image", _str, "image when an action names none"),
        "docker_socket": Key("docker_socket", _path, "the Docker Engine API socket"),
        "network_mode": Key("network_mode", _one_of("bridge", "none", "host"),
                            "container network for actions"),
        "kernel_image_path": Key("kernel_image_path", _path, "firecracker: the guest kernel"),
        "rootfs_image_path": Key("rootfs_image_path", _path, "firecracker: the root fs"),
    },
    "local_cache": {
        "enable": Key("cache_enable", _bool, "keep a local CAS (always on in embedded mode)"),
        "root_directory": Key("cache_dir_override", _path, "where the local CAS lives"),
        "max_size_bytes": Key("cache_max_bytes", _bytes, "local CAS size limit"),
    },
    "platform": Key("platform", _platform, "properties this executor offers"),
    "default_timeout": Key("default_timeout_s", _duration, "for actions that set none"),
    "max_timeout": Key("max_timeout_s", _duration, "largest timeout an action may ask"),
    "enable_debug_logging": Key("debug", _bool, "log every action and more"),
    # Stoker's own keys.
    "protocol": Key("protocol", _one_of(*PROTOCOLS), "the scheduler's protocol"),
    "workers": Key("workers", _count(0), "worker processes; 0: one per core"),
    "listen": Key("listen", _address, "the embedded REAPI endpoint (stoker up)"),
    "health_listen": Key("health_listen", _optional_address, "/healthz /readyz /statusz"),
    "metrics_listen": Key("metrics_listen", _optional_address, "Prometheus /metrics"),
    "data_dir": Key("data_dir", _path, "run files, build directories, action cache"),
    "drain_grace": Key("drain_grace_s", _duration, "on SIGTERM, time to finish actions"),
    "run_as": Key("run_as", _str, "auto: a uid of action_uids per slot when root; self; "
                  "or one user for every action"),
    "action_uids": Key("action_uids", _str, "FIRST-LAST uids for actions (two per slot)"),
    "log_format": Key("log_format", _one_of("text", "json"), "log line format"),
    "upload_idle_expiry": Key("upload_idle_expiry_s", _duration,
                              "a partial ByteStream upload idle this long is deleted (5m)"),
    "upload_client_max_bytes": Key("upload_client_max_bytes", _bytes,
                                   "bytes of partial uploads one client (its API key, else "
                                   "its address) may hold; "
                                   "0: a quarter of local_cache.max_size_bytes"),
    "orphan_grace": Key("orphan_grace_s", _duration,
                        "an execution with no Execute or WaitExecution stream watching it "
                        "this long is cancelled (1m); covers a client reconnecting"),
    "tls": {
        "ca_file": Key("tls_ca_file", _path, "CA bundle to verify the scheduler (and cache) "
                       "with, instead of the system trust store"),
        "cert_file": Key("tls_cert_file", _path, "client certificate (mutual TLS)"),
        "key_file": Key("tls_key_file", _path, "its private key"),
    },
    "api_key_file": Key("api_key_file", _path, "file holding the API key (one line; "
                        "# comments skipped), used when api_key and EXECUTOR_API_KEY are not"),
    "cache_server": Key("cache_server", _target, "the CAS and action cache to use when not "
                        "the scheduler's (stoker executor); same tls and API key"),
    "listen_tls": {
        "cert_file": Key("listen_tls_cert_file", _path,
                         "serve TLS on listen: certificate chain, PEM (stoker up --tls-cert)"),
        "key_file": Key("listen_tls_key_file", _path, "its private key, PEM (--tls-key)"),
    },
    "actions_share_network": Key("actions_share_network", _bool,
                                 "stoker up where actions cannot get network namespaces of "
                                 "their own and the endpoint takes no keys: start anyway, "
                                 "accepting that actions can call the endpoint"),
    "actions_may_request_network": Key("actions_may_request_network", _bool,
                                       "an action asking for network (dockerNetwork: bridge, "
                                       "network: on) gets a user-mode one (slirp4netns; never "
                                       "the host's loopback) instead of being refused"),
    "action_limits": {
        "memory_bytes": Key("action_memory_bytes", _bytes, "memory one action may use (its "
                            "processes and its /tmp); 0: memory_bytes, else the machine's"),
        "pids": Key("action_pids", _count(1), "processes and threads one action may have"),
        "tmp_bytes": Key("action_tmp_bytes", _bytes, "size of an action's private /tmp, "
                         "/var/tmp and /dev/shm together (also counted in memory_bytes)"),
        "output_bytes": Key("action_output_bytes", _bytes, "bytes one action's outputs, "
                            "stdout and stderr may hold together (sparse files at their "
                            "apparent size), checked before they are read; 0: half of "
                            "local_cache.max_size_bytes; never more than all of it, nor the "
                            "cache disk's free space"),
    },
    "listen_api_key_file": Key("listen_api_key_file", _path,
                               "API keys, one a line: every REAPI call to listen must carry "
                               "one (stoker up --api-key-file)"),
    "action_cache_writes": Key("action_cache_writes", _one_of("all", "keyed", "none"),
                               "who may write the action cache (UpdateActionResult): all "
                               "(default; with listen_api_key_file every caller has a key, "
                               "so this is keyed), keyed (callers with a key of "
                               "listen_api_key_file; nobody when it is unset), or none; "
                               "results of Stoker's own executions are always cached"),
}}


def check_private(path: str, key: str) -> None:
    """A file holding a secret must be readable by its owner alone: anyone else who can read
    it (an action among them) holds the secret."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise ConfigError(f"{key}: {path} holds a secret but is open to others (mode "
                          f"{stat.S_IMODE(mode):04o}); make it the owner's alone: chmod 600 "
                          f"{path}")


def load(path: str, base: Config | None = None, env: dict[str, str] | None = None) -> Config:
    """The Config that path describes, over base (defaults otherwise), checked."""
    env = dict(os.environ if env is None else env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    values: dict[str, Any] = {}
    if root is not None:
        _walk(path, root, SCHEMA, "", values, env)
    if values.get("api_key") and values["api_key"] in text:
        # The key itself is written in the file (not brought in from the environment).
        check_private(path, "executor.api_key")
    for var, name in ENV_OVERRIDES.items():
        if env.get(var):
            values[name] = env[var]
    if "server" in values:
        values["server"] = _target(values["server"], "executor.server")
    config = dataclasses.replace(base or Config(), **values)
    try:
        return config.validated()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _walk(path: str, node: yaml.Node, schema: dict[str, Any], prefix: str,
          values: dict[str, Any], env: dict[str, str]) -> None:
    where = f"{prefix or 'the document'}"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: {where}: expected a mapping "
                          f"of keys")
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        name = f"{prefix}.{key}" if prefix else key
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{path}:{line}: {name}: given twice")
        seen.add(key)
        spec = schema.get(key)
        if spec is None:
            known = ", ".join(schema)
            raise ConfigError(f"{path}:{line}: {name}: unknown key (known here: {known})")
        if isinstance(spec, dict):
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null"):
                continue  # an empty section
            _walk(path, value_node, spec, name, values, env)
            continue
        try:
            value = _expand(_plain(value_node), name, env)
            values[spec.field] = spec.kind(value, name)
        except ConfigError as e:
            raise ConfigError(f"{path}:{line}: {e}") from None
        except (yaml.YAMLError, ValueError) as e:  # an unknown tag, an impossible date...
            raise ConfigError(f"{path}:{line}: {name}: cannot read the value: "
                              f"{str(e).splitlines()[0]}") from None


def _plain(node: yaml.Node) -> Any:
    """A node as Python data (what the safe loader would give)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _expand(value: Any, key: str, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, key, env) for k, v in value.items()}
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) not in env:
            raise ConfigError(f"{key}: ${{{m.group(1)}}} is not set in the environment")
        return env[m.group(1)]

    expanded = _VAR.sub(sub, value)
    # A whole-value variable may stand for a number or a bool: read it as YAML would.
    if _VAR.fullmatch(value):
        try:
            parsed = yaml.safe_load(expanded) if expanded else ""
        except yaml.YAMLError:
            return expanded
        return parsed if isinstance(parsed, int | float | bool) else expanded
    return expanded


def describe() -> str:
    """Every key, for `stoker config keys` and the README."""
    lines: list[str] = []

    def walk(schema: dict[str, Any], prefix: str) -> None:
        for key, spec in schema.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(spec, dict):
                walk(spec, name)
            else:
                lines.append(f"{name}: {spec.doc}")
    walk(SCHEMA, "")
    return "\n".join(lines)
