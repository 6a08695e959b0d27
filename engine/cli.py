"""`stoker` (and `python -m engine`): parses the command line and hands off.

    stoker up        the embedded default: REAPI server + workers on this machine
    stoker executor  join a remote scheduler (executor.yaml's `server`)
    stoker config check FILE   validate an executor.yaml without starting
    stoker version   what is installed, and which digest implementation is loaded
    stoker bench     measure this machine and recommend a configuration
    stoker server / stoker worker --slot N / stoker monitor   the children `up` starts
                                                              (internal)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from engine import __version__, config_file, hashing, logs
from engine.config import CONFIG_ENV, Config, ConfigError, parse_duration, parse_size


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Each flag, when given, wins over the config file's key; defaults are Config's."""
    p.add_argument("--config", metavar="FILE", help="executor.yaml to read (see README)")
    p.add_argument("--data-dir", help="where the cache, action cache and run files live "
                                      "(default ./stoker-data)")
    p.add_argument("--listen", help="REAPI endpoint HOST:PORT (default 127.0.0.1:1985)")
    p.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    p.add_argument("--concurrency", type=int, help="actions at once per worker (default 2)")
    p.add_argument("--default-timeout", help="timeout for actions that set none (e.g. 600s)")
    p.add_argument("--max-timeout", help="largest timeout an action may ask for")
    p.add_argument("--cache-size", help="local CAS size limit (e.g. 50G; default 10G)")
    p.add_argument("--drain-grace",
                   help="on SIGTERM, how long running actions may take to finish (default 25s)")
    p.add_argument("--run-as", help="auto (default): a uid of --action-uids per action slot "
                                    "when root; self; or one user for every action")
    p.add_argument("--action-uids", help="FIRST-LAST uids for actions, two per slot "
                                         "(default 60000-60999)")
    p.add_argument("--health-listen", help="/healthz /readyz /statusz HOST:PORT, or off "
                                           "(default 0.0.0.0:8080)")
    p.add_argument("--metrics-listen", help="Prometheus /metrics HOST:PORT, or off "
                                            "(default 0.0.0.0:9090)")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--actions-share-network", action="store_true", default=None,
                   help="start even where actions cannot get network namespaces of their own "
                        "and the endpoint takes no keys (actions_share_network)")
    p.add_argument("--actions-may-request-network", action="store_true", default=None,
                   help="give actions that ask for network (dockerNetwork: bridge) a user-mode "
                        "one that cannot reach this machine's loopback "
                        "(actions_may_request_network)")
    p.add_argument("--debug", action="store_true", default=None,
                   help="log every action and more")


def _add_up_options(p: argparse.ArgumentParser) -> None:
    """The embedded endpoint's own security: `stoker up` only."""
    p.add_argument("--tls-cert", metavar="FILE",
                   help="serve TLS on --listen with this PEM certificate chain")
    p.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="API keys, one a line (# comments allowed): every REAPI call must "
                        "send one as x-buildbuddy-api-key or authorization: Bearer")


_FLAGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    # flag attribute: (Config field, converter)
    "data_dir": ("data_dir", str),
    "listen": ("listen", str),
    "workers": ("workers", int),
    "concurrency": ("concurrency", int),
    "default_timeout": ("default_timeout_s", lambda v: parse_duration(v, "--default-timeout")),
    "max_timeout": ("max_timeout_s", lambda v: parse_duration(v, "--max-timeout")),
    "cache_size": ("cache_max_bytes", lambda v: parse_size(v, "--cache-size")),
    "drain_grace": ("drain_grace_s", lambda v: parse_duration(v, "--drain-grace")),
    "run_as": ("run_as", str),
    "action_uids": ("action_uids", str),
    "health_listen": ("health_listen", lambda v: "" if v == "off" else v),
    "metrics_listen": ("metrics_listen", lambda v: "" if v == "off" else v),
    "log_format": ("log_format", str),
    "debug": ("debug", bool),
    "actions_share_network": ("actions_share_network", bool),
    "actions_may_request_network": ("actions_may_request_network", bool),
    "tls_cert": ("listen_tls_cert_file", str),  # `up` only (_add_up_options)
    "tls_key": ("listen_tls_key_file", str),
    "api_key_file": ("listen_api_key_file", str),
}


def _config_from_args(args: argparse.Namespace) -> Config:
    config = config_file.load(args.config) if args.config else Config()
    given = {field: convert(getattr(args, flag)) for flag, (field, convert) in _FLAGS.items()
             if getattr(args, flag, None) is not None}  # None too: a flag the command lacks
    return dataclasses.replace(config, **given).validated()


# Where exec roots go when the data directory is not reachable by the action uids (a checkout
# under root's 0700 home, say), when on the cache's filesystem (hardlinks). Under a parent
# only root may write to: a world-writable one (/var/tmp) would let a local user plant it.
_BUILD_DIR_FALLBACK = "/var/lib/stoker-builds"


def _prepare_build_dir(config: Config) -> Config:
    """Actions run as other uids when Stoker is root; their exec roots must be reachable by
    them. Keep them under the data directory when it is, else pick a place that is (and say
    where), so a checkout in a 0700 home works. Warn when actions share Stoker's own uid."""
    import hashlib
    import logging

    from engine.pipeline.build_dir import check_searchable
    from engine.pipeline.identities import sample

    log = logging.getLogger(__name__)
    ident = sample(config)
    if ident is None or ident[0] == os.geteuid():
        log.warning(
            "actions run as Stoker's own user (uid %d): they can reach the data directory "
            "(local cache, action cache) and each other. Run Stoker as root on shared machines: "
            "actions then run as uids of action_uids, one per slot", os.geteuid())
        return config
    os.makedirs(config.data_dir, exist_ok=True)
    if os.stat(config.data_dir).st_uid == os.geteuid():
        os.chmod(config.data_dir, 0o711)  # what datadir.secure() makes it anyway
    try:
        check_searchable(config.data_dir, *ident)
        return config
    except PermissionError as e:
        reason = str(e)
    os.makedirs(config.cache_dir, exist_ok=True)
    base = _BUILD_DIR_FALLBACK
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        try:
            os.mkdir(base, 0o711)
        except FileExistsError:
            pass
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ConfigError(f"{base} must be root's and writable by root alone (it holds "
                                  "exec roots); fix or remove it")
            os.fchmod(fd, 0o711)
        finally:
            os.close(fd)
        check_searchable(base, *ident)
        usable = os.stat(base).st_dev == os.stat(config.cache_dir).st_dev
    except OSError as e:
        usable, reason = False, f"{reason}; {base}: {e}"
    if usable:
        build = os.path.join(base, hashlib.sha256(config.data_dir.encode()).hexdigest()[:16])
        log.warning("exec roots live in %s: the data directory is not reachable by the action "
                    "uids (%s)", build, reason)
        return dataclasses.replace(config, build_dir_override=build)
    raise ConfigError(
        f"--data-dir {config.data_dir}: actions run as uid {ident[0]} and could not reach "
        f"their exec roots ({reason}), and {base} is not usable on the same filesystem. Use a "
        "data directory whose parents are searchable (e.g. /var/lib/stoker)")


def _check_action_uids(config: Config) -> None:
    """The slot uids must belong to nobody: an action would get that user's or group's files
    (and each sweep would kill that user's processes)."""
    import grp
    import pwd

    from engine.pipeline.identities import for_worker

    ids = for_worker(config, 0)
    if not ids.separate:
        return
    first, last = config.action_uid_range()
    for entry in pwd.getpwall():
        if first <= entry.pw_uid <= last:
            raise ConfigError(f"action_uids: {config.action_uids} holds uid {entry.pw_uid}, "
                              f"which is user {entry.pw_name!r}; choose a range no user has")
    for group in grp.getgrall():
        if first <= group.gr_gid <= last:
            raise ConfigError(f"action_uids: {config.action_uids} holds gid {group.gr_gid}, "
                              f"which is group {group.gr_name!r}; choose a range no group has")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or empty (every address)


def _check_action_network(config: Config) -> None:
    """Actions must not reach the REAPI endpoint (they could poison the action cache or
    submit work with no client). Each gets a network namespace of its own where the machine
    allows; where it does not (a container without CAP_SYS_ADMIN), the endpoint must demand
    a key no action can read, or the operator must say the risk is accepted."""
    from engine.errors import StokerError
    from engine.pipeline.identities import sample
    from engine.runners import containment, spawn

    ident = sample(config)
    if ident is None or ident[0] == os.geteuid():
        return  # actions run as Stoker itself: they hold its files anyway (warned at start)
    try:
        spawn.require_helper()  # the only way actions start as other uids
    except StokerError as e:
        raise ConfigError(e.message) from None
    if config.listen_api_key_file or config.actions_share_network:
        return
    if containment.detect(True) == containment.PID_NAMESPACE:
        host = config.listen.rpartition(":")[0].strip("[]")
        if config.actions_may_request_network and not _is_loopback(host):
            # Their user-mode network reaches every address of this machine but loopback.
            raise ConfigError(
                f"actions_may_request_network: actions that ask for network reach this "
                f"machine's addresses but loopback, and could call the endpoint on "
                f"{config.listen}. Listen on loopback, set listen_api_key_file "
                "(--api-key-file), or set actions_share_network: true to accept it")
        return
    raise ConfigError(
        "actions_share_network: actions would share this machine's network (no network "
        "namespaces here: Stoker lacks CAP_SYS_ADMIN, as in a container) and could call the "
        f"endpoint on {config.listen}. Set listen_api_key_file (--api-key-file) so only "
        "callers with a key get in (actions cannot read the 0600 key file), or set "
        "actions_share_network: true to accept it")


def _check_monitor_addresses(config: Config) -> None:
    """Fail now, naming the key, when an HTTP address is taken: later the monitor child
    would only crash-loop. (A bind-and-close: the monitor binds for real moments later.)"""
    from engine.monitor import http

    for key, address in http.listen_addresses(config):
        host, port = http.parse_address(address, key)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the monitor does
            try:
                s.bind((host, port))
                s.listen(1)
            except OSError as e:
                raise ConfigError(f"{key}: cannot listen on {address}: {e.strerror or e} "
                                  f"(set executor.{key} or --{key.replace('_', '-')} to another "
                                  "HOST:PORT, or off)") from None


def _config_command(args: argparse.Namespace) -> int:
    if args.config_command == "keys":
        print(config_file.describe())
        return 0
    try:
        config = config_file.load(args.file)
    except ConfigError as e:
        print(f"stoker: {e}", file=sys.stderr)
        return 2
    # What `up` (no server) or `executor` (a server to join) would check before starting,
    # but the data directory's lock (a running Stoker holds it).
    mode = "executor" if config.server else "up"
    checks = [_check_supported, _check_action_uids]
    checks += [_check_can_join] if mode == "executor" else [_check_action_network]
    checks.append(_check_monitor_addresses)
    problems = []
    for check in checks:
        try:
            check(config)
        except ConfigError as e:
            problems.append(str(e))
    print(f"{args.file}: {config.worker_count} worker(s), "
          f"{sum(config.slot_capacity(s) for s in range(config.worker_count))} action(s) at "
          f"once, isolation {config.isolation_type}; as `stoker {mode}`")
    from engine.sources.select import advertised_platform

    print("platform sent to the scheduler: " + ", ".join(
        f"{k}={v}" for k, v in sorted(advertised_platform(config).items())))
    if config.server and config.protocol == "buildbarn":
        print(f"Buildbarn: instance name prefix {config.instance_name!r}, size class "
              f"{config.size_class}; the worker writes the ActionCache")
    _print_isolation_types(config)
    if problems:
        print(f"`stoker {mode}` would refuse to start:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print("OK")
    return 0


def _print_isolation_types(config: Config) -> None:
    """Which isolation types the workers would offer here, and why not the others."""
    from engine.pipeline.identities import sample
    from engine.runners import docker, firecracker, podman, sandbox

    ident = sample(config)
    found = {
        "none": None,
        "sandbox": sandbox.probe(sandbox.find_bwrap(), *(ident or (None, None))),
        "podman": podman.probe(podman.find_podman()),
        "docker": docker.probe(config.docker_socket),
        "firecracker": firecracker.why_not(config),
    }
    for kind, why in found.items():
        print(f"isolation type {kind}: " + ("offered" if why is None else f"not offered: {why}"))


def _check_supported(config: Config) -> None:
    """Keys the config accepts (the seed's) but that this build cannot honour yet: refuse to
    start rather than run actions other than as asked."""
    if config.isolation_type == "sandbox":
        from engine.pipeline.identities import sample
        from engine.runners import sandbox

        why = sandbox.probe(sandbox.find_bwrap(), *(sample(config) or (None, None)))
        if why is not None:
            raise ConfigError(f"executor.isolation.type: sandbox cannot run here: {why}")
    elif config.isolation_type == "podman":
        from engine.pipeline.identities import sample
        from engine.runners import podman
        from engine.runners.select import unbindable_paths

        why = unbindable_paths(config) or podman.probe(podman.find_podman())
        if why is None and sample(config) is None:
            why = "actions would run as Stoker itself (run_as: self, or Stoker not root)"
        if why is not None:
            raise ConfigError(f"executor.isolation.type: podman cannot run here: {why}")
    elif config.isolation_type == "docker":
        from engine.pipeline.identities import sample
        from engine.runners import docker
        from engine.runners.select import unbindable_paths

        why = unbindable_paths(config) or docker.probe(config.docker_socket)
        if why is None and sample(config) is None:
            why = "actions would run as Stoker itself (run_as: self, or Stoker not root)"
        if why is not None:
            raise ConfigError(f"executor.isolation.type: docker cannot run here: {why}")
    elif config.isolation_type == "firecracker":
        from engine.runners import firecracker

        raise ConfigError("executor.isolation.type: firecracker cannot run here: "
                          f"{firecracker.why_not(config)}; use none (the bare runner), "
                          "sandbox (bubblewrap), podman or docker")
    if config.network_mode == "host":
        raise ConfigError("executor.isolation.network_mode: host is never given to actions "
                          "(it holds Stoker's loopback listeners); use none, or bridge with "
                          "actions_may_request_network: true")
    if config.network_mode == "bridge" and not config.actions_may_request_network:
        raise ConfigError("executor.isolation.network_mode: bridge gives every container "
                          "action a network; set actions_may_request_network: true to allow "
                          "it, or network_mode: none")
    if not config.cache_enable:
        raise ConfigError("executor.local_cache.enable: false is not supported: the local "
                          "CAS is where inputs are staged from")


def _check_can_join(config: Config) -> None:
    if not config.server:
        raise ConfigError("executor.server: `stoker executor` needs the scheduler to join "
                          "(or run `stoker up` for the embedded one)")
    from engine import transport

    transport.check_target(config.server, "executor.server")


def _child_config() -> Config:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise ConfigError(f"{CONFIG_ENV} is not set: this command is started by `stoker up`")
    return Config.from_json(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stoker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="serve REAPI and run workers on this machine")
    _add_run_options(up)
    _add_up_options(up)
    _add_run_options(sub.add_parser(
        "executor", help="run workers for a remote scheduler (executor.yaml's server)"))
    config_cmd = sub.add_parser("config", help="work with executor.yaml")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("check", help="validate FILE without starting").add_argument("file")
    config_sub.add_parser("keys", help="list every key executor.yaml takes")
    sub.add_parser("version", help="print the version and the digest implementation")
    from engine.benchmark import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser(
        "bench", help="measure this machine for capacity planning (digest, stage, upload, "
                      "spawn, no-op actions) and recommend a configuration"))
    sub.add_parser("server", help=argparse.SUPPRESS)
    sub.add_parser("monitor", help=argparse.SUPPRESS)
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--slot", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "version":
        print(f"stoker {__version__}")
        print(f"digest implementation: {hashing.IMPLEMENTATION}")
        return 0
    if args.command == "bench":
        logs.setup("text", False)
        return bench_cli.main(args)
    if args.command == "config":
        return _config_command(args)
    try:
        if args.command in ("up", "executor"):
            config = _config_from_args(args)
            if args.command == "executor":
                _check_can_join(config)
            _check_supported(config)
            logs.setup(config.log_format, config.debug)
            from engine import datadir

            # First: a second Stoker on this data directory refuses before touching anything.
            lock_fd = datadir.lock(config.data_dir)
            _check_action_uids(config)
            if args.command == "up":
                _check_action_network(config)
            config = _prepare_build_dir(config)
            _check_monitor_addresses(config)
            from engine.supervisor import Supervisor

            return Supervisor(config, embedded_server=args.command == "up", lock_fd=lock_fd,
                              reread=(lambda: dataclasses.replace(
                                  _config_from_args(args),
                                  build_dir_override=config.build_dir_override))
                              if args.config
                              else None).run()
        config = _child_config()
    except ConfigError as e:
        print(f"stoker: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_format, config.debug)
    from engine import datadir, lifeline

    datadir.keep_lock_from_children()

    lifeline.die_with_parent(int(os.environ.get("STOKER_SUPERVISOR_PID", os.getppid())))
    if args.command == "server":
        from engine.server import app

        return app.main(config)
    if args.command == "monitor":
        from engine.monitor import http

        return http.main(config)
    from engine.worker import process

    return process.main(config, args.slot)
