"""executor.yaml: the seed's examples load unchanged; every bad key, type and value is an
error naming the key and the line; ${VAR} and the EXECUTOR_* overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import config_file
from engine.config import ConfigError

EXAMPLES = Path(__file__).parent / "examples"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "executor.yaml"
    p.write_text(textwrap.dedent(text))
    p.chmod(0o600)  # some hold an api_key
    return str(p)


def private_copy(tmp_path: Path, name: str) -> str:
    """The example as a user keeps it: it holds an api_key, so it must be 0600."""
    p = tmp_path / name
    p.write_bytes((EXAMPLES / name).read_bytes())
    p.chmod(0o600)
    return str(p)


@pytest.mark.parametrize("name", ["seed-docker.yaml", "seed-firecracker.yaml"])
def test_the_seed_examples_load_unchanged(name, tmp_path):
    c = config_file.load(private_copy(tmp_path, name), env={})
    assert c.server == "grpcs://remote.buildbuddy.io"
    assert c.api_key == "your_api_key_here"
    assert (c.pool_name, c.instance_name) == ("default", "executor-1")
    assert c.num_concurrent_actions == 10
    assert (c.memory_bytes, c.milli_cpu) == (16_000_000_000, 8000)
    assert c.cache_dir == "/data/cache" and c.cache_max_bytes == 50_000_000_000
    assert c.platform["OSFamily"] == "linux" and c.platform["Arch"] == "amd64"
    assert (c.default_timeout_s, c.max_timeout_s, c.debug) == (600.0, 3600.0, False)
    if name == "seed-docker.yaml":
        assert (c.isolation_type, c.default_image, c.network_mode) == (
            "docker", "ubuntu:20.04", "bridge")
        assert c.platform["container-image"] == "docker://my-build-image:v1"
    else:
        assert c.isolation_type == "firecracker"
        assert c.kernel_image_path == "/opt/firecracker/vmlinux"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_config_holding_an_api_key_must_be_private(tmp_path, mode):
    path = private_copy(tmp_path, "seed-docker.yaml")
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=rf"executor.api_key: {path} holds a secret but is "
                       rf"open to others \(mode 0{mode:o}\); make it the owner's alone: "
                       rf"chmod 600 {path}"):
        config_file.load(path, env={})


def test_a_config_that_takes_its_key_from_the_environment_may_be_shared(tmp_path):
    path = write(tmp_path, """\
        executor:
          api_key: ${MY_KEY}
        """)
    os.chmod(path, 0o644)
    assert config_file.load(path, env={"MY_KEY": "k-123"}).api_key == "k-123"


def test_concurrency_is_shared_out_over_the_workers(tmp_path):
    c = config_file.load(write(tmp_path, """
        executor:
          num_concurrent_actions: 5
          workers: 2
    """), env={})
    assert c.worker_count == 2 and [c.slot_capacity(s) for s in (0, 1)] == [3, 2]
    one = config_file.load(write(tmp_path, """
        executor:
          num_concurrent_actions: 1
          workers: 4
    """), env={})
    assert one.worker_count == 1 and one.slot_capacity(0) == 1


@pytest.mark.parametrize("text,message", [
    ("executor:\n  num_concurrent_action: 10\n",
     "executor.yaml:2: executor.num_concurrent_action: unknown key"),
    ("executor:\n  isolation:\n    typ: docker\n",
     "executor.yaml:3: executor.isolation.typ: unknown key"),
    ("executors:\n  server: grpc://x\n", "executor.yaml:1: executors: unknown key"),
    ("executor:\n  num_concurrent_actions: ten\n",
     "executor.yaml:2: executor.num_concurrent_actions: expected a whole number, got str"),
    ("executor:\n  num_concurrent_actions: 0\n",
     "executor.yaml:2: executor.num_concurrent_actions: must be at least 1, got 0"),
    ("executor:\n  memory_bytes: -5\n", "executor.yaml:2: executor.memory_bytes: must be at"),
    ("executor:\n\n  isolation:\n    type: dockr\n",
     "executor.yaml:4: executor.isolation.type: 'dockr' is not one of none, sandbox, docker"),
    ("executor:\n  default_timeout: soon\n",
     "executor.yaml:2: executor.default_timeout: 'soon' is not a duration"),
    ("executor:\n  default_timeout: 0s\n", "executor.default_timeout: must be positive"),
    ("executor:\n  enable_debug_logging: yes please\n",
     "executor.yaml:2: executor.enable_debug_logging: expected true or false"),
    ("executor:\n  local_cache:\n    enable: 1\n",
     "executor.yaml:3: executor.local_cache.enable: expected true or false, got 1"),
    ("executor:\n  platform: [linux]\n",
     "executor.yaml:2: executor.platform: expected a mapping"),
    ("executor:\n  server: remote.buildbuddy.io\n",
     "executor.yaml:2: executor.server: 'remote.buildbuddy.io' must be grpc://HOST"),
    ("executor:\n  server: grpc://a\n  server: grpc://b\n",
     "executor.yaml:3: executor.server: given twice"),
    ("executor: 3\n", "executor.yaml:1: executor: expected a mapping"),
    ("executor:\n  default_timeout: 2h\n  max_timeout: 1h\n",
     "default_timeout_s: must not exceed max_timeout_s"),
    ("executor:\n  health_listen: everywhere\n",
     "executor.yaml:2: executor.health_listen: 'everywhere' must be HOST:PORT"),
    ("executor: [\n", "not valid YAML"),
])
def test_bad_input_names_the_key_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        config_file.load(write(tmp_path, text), env={})
    assert message in str(e.value)


def test_variables_expand_and_unset_ones_are_errors(tmp_path):
    path = write(tmp_path, """
        executor:
          api_key: ${KEY}
          num_concurrent_actions: ${SLOTS}
          instance_name: main-${REGION}
    """)
    c = config_file.load(path, env={"KEY": "k3y", "SLOTS": "7", "REGION": "eu"})
    assert (c.api_key, c.num_concurrent_actions, c.instance_name) == ("k3y", 7, "main-eu")
    with pytest.raises(ConfigError, match=r"executor.yaml:5: executor.instance_name: "
                                          r"\$\{REGION\} is not set"):
        config_file.load(path, env={"KEY": "k", "SLOTS": "1"})


def test_environment_overrides_win_over_the_file(tmp_path):
    path = private_copy(tmp_path, "seed-docker.yaml")
    c = config_file.load(path, env={"EXECUTOR_API_KEY": "from-env",
                                    "EXECUTOR_SERVER": "grpc://10.0.0.1:1985"})
    assert (c.api_key, c.server) == ("from-env", "grpc://10.0.0.1:1985")
    with pytest.raises(ConfigError, match="executor.server: 'nope' must be"):
        config_file.load(path, env={"EXECUTOR_SERVER": "nope"})


def test_an_empty_file_gives_the_defaults(tmp_path):
    c = config_file.load(write(tmp_path, "# nothing yet\n"), env={})
    assert c.listen == "127.0.0.1:1985" and c.isolation_type == "none"


def run_stoker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("name", ["seed-docker.yaml", "seed-firecracker.yaml"])
def test_config_check_accepts_the_seed_examples(name, tmp_path):
    """The seed's files are read as they are; whether this machine can run their isolation
    type (a Docker engine at their socket, firecracker) is the only thing the check may
    refuse."""
    r = run_stoker("config", "check", private_copy(tmp_path, name))
    assert "10 action(s) at once" in r.stdout, r.stderr
    if r.returncode != 0:
        assert r.returncode == 2
        problems = r.stderr.splitlines()[1:]
        assert problems and all("executor.isolation.type:" in p or "cannot listen" in p
                                or "executor.isolation.network_mode: bridge" in p
                                for p in problems), r.stderr
    else:
        assert r.stdout.rstrip().endswith("OK")


def test_config_check_rejects_with_the_key_and_line(tmp_path):
    r = run_stoker("config", "check", write(tmp_path, "executor:\n  milli_cpu: lots\n"))
    assert r.returncode == 2
    assert "executor.yaml:2: executor.milli_cpu: expected a whole number" in r.stderr


def test_config_keys_lists_every_key():
    r = run_stoker("config", "keys")
    assert r.returncode == 0
    for key in ("executor.server", "executor.isolation.kernel_image_path",
                "executor.local_cache.max_size_bytes", "executor.tls.ca_file"):
        assert key in r.stdout


def test_up_rejects_a_bad_config_file_before_starting(tmp_path):
    r = run_stoker("up", "--config", write(tmp_path, "executor:\n  workers: -1\n"))
    assert r.returncode == 2 and "executor.workers: must be at least 0" in r.stderr


def test_executor_mode_needs_a_scheduler_with_a_scheme(tmp_path):
    r = run_stoker("executor", "--config", write(tmp_path, "executor:\n  workers: 1\n"))
    assert r.returncode == 2 and "executor.server" in r.stderr
    r = run_stoker("executor", "--config",
                   write(tmp_path, "executor:\n  server: 127.0.0.1:1985\n"))
    assert r.returncode == 2 and "executor.server" in r.stderr and "grpc://" in r.stderr


@pytest.mark.parametrize("text,message", [
    ("executor:\n  isolation:\n    type: firecracker\n",
     "executor.isolation.type: firecracker cannot run here: this machine lacks the "
     "firecracker binary (not on PATH); a guest kernel (isolation.kernel_image_path is not "
     "set)"),
    ("executor:\n  local_cache:\n    enable: false\n",
     "executor.local_cache.enable: false is not supported"),
])
def test_up_refuses_what_it_cannot_honour_yet(tmp_path, text, message):
    r = run_stoker("up", "--config", write(tmp_path, text))
    assert r.returncode == 2 and message in r.stderr


@pytest.mark.parametrize("text,message", [
    ("executor:\n  enable_debug_logging: 2024-13-01\n",
     "executor.yaml:2: executor.enable_debug_logging: cannot read the value"),
    ("executor:\n  api_key: !secret k\n", "executor.yaml:2: executor.api_key: cannot read"),
    ("executor:\n  max_timeout: .inf\n", "executor.max_timeout: must be positive"),
    ("executor:\n  default_timeout: .nan\n", "executor.default_timeout: must be positive"),
])
def test_values_yaml_cannot_build_are_errors_too(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config_file.load(write(tmp_path, text), env={})


def test_a_whole_value_variable_that_is_not_yaml_stays_text(tmp_path):
    c = config_file.load(write(tmp_path, "executor:\n  api_key: ${KEY}\n"),
                         env={"KEY": "{oops"})
    assert c.api_key == "{oops"


def test_a_bare_off_turns_an_endpoint_off(tmp_path):
    # YAML 1.1 reads `off` unquoted as false; the user meant the word.
    from engine import config_file

    config = config_file.load(write(tmp_path, "executor:\n  metrics_listen: off\n"
                                              "  health_listen: 'off'\n"))
    assert config.metrics_listen == "" and config.health_listen == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="actions run as other uids only under root")
def test_up_refuses_an_endpoint_actions_could_call(tmp_path):
    """Without network namespaces for actions (forced here as in a container without
    CAP_SYS_ADMIN), `stoker up` needs listen keys or the explicit override."""
    env = {**os.environ, "STOKER_CONTAINMENT": "uid-sweep"}
    text = f"executor:\n  data_dir: {tmp_path}/data\n  health_listen: 'off'\n" \
           "  metrics_listen: 'off'\n"
    r = subprocess.run([sys.executable, "-m", "engine", "up", "--config", write(tmp_path, text)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "actions_share_network: actions would share this machine's network" in r.stderr
    assert "listen_api_key_file" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="actions get namespaces only where Stoker is root")
def test_up_refuses_an_open_endpoint_when_actions_may_ask_for_network(tmp_path):
    """A user-mode network reaches every address of the machine but loopback: an endpoint
    listening on one, without keys, is refused under actions_may_request_network."""
    from engine.runners import containment

    if containment.detect(True) != containment.PID_NAMESPACE:
        pytest.skip("no network namespaces here")
    text = f"executor:\n  data_dir: {tmp_path}/data\n  health_listen: 'off'\n" \
           "  metrics_listen: 'off'\n  listen: 0.0.0.0:0\n  actions_may_request_network: true\n"
    r = subprocess.run([sys.executable, "-m", "engine", "up", "--config", write(tmp_path, text)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "actions_may_request_network: actions that ask for network reach this machine's " \
           "addresses but loopback, and could call the endpoint on 0.0.0.0:0" in r.stderr


def test_action_limits_output_bytes_and_the_output_limit_rule(tmp_path):
    from engine.config import Config, output_limit_bytes

    c = config_file.load(write(tmp_path, """\
        executor:
          local_cache: {max_size_bytes: 8G}
          action_limits: {output_bytes: 1G}
        """), env={})
    assert c.action_output_bytes == 1 << 30 and c.output_limit_bytes() == 1 << 30
    # Unset: half the cache, so that one action never evicts all of it.
    assert Config(cache_max_bytes=8 << 30).output_limit_bytes() == 4 << 30
    # Never more than the whole cache; an unlimited cache leaves the key alone.
    assert output_limit_bytes(16 << 30, 8 << 30) == 8 << 30
    assert output_limit_bytes(0, 0) == 0 and output_limit_bytes(5, 0) == 5
    assert "action_limits.output_bytes" in config_file.describe()
    with pytest.raises(ConfigError, match="action_limits.output_bytes"):
        config_file.load(write(tmp_path, "executor:\n  action_limits: {output_bytes: -1}\n"),
                         env={})


def test_a_network_mode_that_gives_actions_the_network_needs_the_operators_word(tmp_path):
    base = f"executor:\n  data_dir: {tmp_path}/data\n  health_listen: 'off'\n" \
           "  metrics_listen: 'off'\n"
    r = run_stoker("config", "check", write(tmp_path, base + "  isolation:\n"
                                                             "    network_mode: host\n"))
    assert r.returncode == 2 and "network_mode: host is never given to actions" in r.stderr
    r = run_stoker("config", "check", write(tmp_path, base + "  isolation:\n"
                                                             "    network_mode: bridge\n"))
    assert r.returncode == 2 and "set actions_may_request_network: true" in r.stderr
    r = run_stoker("config", "check", write(tmp_path, base + "  actions_may_request_network: "
                                                             "true\n  isolation:\n"
                                                             "    network_mode: bridge\n"))
    assert r.returncode == 0, r.stderr


def test_config_check_says_what_up_would_refuse(tmp_path):
    """`stoker config check` runs `up`'s own checks: an isolation type this machine cannot
    run and a busy port are named, with the exit status of a configuration error; it shows
    the platform the executor would advertise and which isolation types it would offer."""
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        text = (f"executor:\n  data_dir: {tmp_path}/data\n  health_listen: 127.0.0.1:{port}\n"
                f"  metrics_listen: 'off'\n  platform:\n    Pool: big\n  isolation:\n"
                f"    type: docker\n    docker_socket: {tmp_path}/no-docker.sock\n")
        r = run_stoker("config", "check", write(tmp_path, text))
    finally:
        busy.close()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "platform sent to the scheduler: ISA=" in r.stdout and "Pool=big" in r.stdout
    assert "isolation type none: offered" in r.stdout
    assert "`stoker up` would refuse to start:" in r.stderr
    assert f"docker cannot run here: no Docker Engine API at {tmp_path}/no-docker.sock" \
        in r.stderr
    assert f"health_listen: cannot listen on 127.0.0.1:{port}" in r.stderr
    fine = run_stoker("config", "check", write(tmp_path, f"executor:\n  data_dir: "
                                                         f"{tmp_path}/data\n  health_listen: "
                                                         "'off'\n  metrics_listen: 'off'\n"))
    assert fine.returncode == 0 and fine.stdout.rstrip().endswith("OK"), fine.stderr


def test_the_joined_executors_own_keys_load(tmp_path):
    """size_class (Buildbarn), executor_writes_action_cache (BuildBuddy) and fetch_timeout
    (the remote CAS), each with its default and bad values named."""
    config = config_file.load(write(tmp_path, "executor:\n  size_class: 2\n"
                                  "  executor_writes_action_cache: false\n"
                                  "  fetch_timeout: 90s\n"), env={})
    assert (config.size_class, config.executor_writes_action_cache,
            config.fetch_timeout_s) == (2, False, 90.0)
    default = config_file.load(write(tmp_path, ""), env={})
    assert (default.size_class, default.executor_writes_action_cache,
            default.fetch_timeout_s) == (0, True, 60.0)
    with pytest.raises(ConfigError, match="size_class"):
        config_file.load(write(tmp_path, "executor:\n  size_class: -1\n"), env={})
    with pytest.raises(ConfigError, match="fetch_timeout"):
        config_file.load(write(tmp_path, "executor:\n  fetch_timeout: 0s\n"), env={}).validated()
