"""deploy/ecs/task-definition.json: valid input for ECS RegisterTaskDefinition according to
botocore's own model of the API (offline: no AWS call), and wired as Stoker needs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import botocore.session
import pytest
from botocore.exceptions import ParamValidationError
from botocore.validate import validate_parameters

from tests.deploy.privileges import CAPABILITIES, DOCKER_DEFAULT

PATH = Path(__file__).resolve().parents[2] / "deploy" / "ecs" / "task-definition.json"
DRAIN_GRACE_S = 25  # deploy/executor.yaml's drain_grace, which the image ships


@pytest.fixture(scope="module")
def shape():
    model = botocore.session.get_session().get_service_model("ecs")
    return model.operation_model("RegisterTaskDefinition").input_shape


@pytest.fixture(scope="module")
def task() -> dict:
    return json.loads(PATH.read_text())


def test_valid_register_task_definition_input(task: dict, shape) -> None:
    validate_parameters(task, shape)


def test_the_model_rejects_a_misspelt_field(task: dict, shape) -> None:
    broken = copy.deepcopy(task)
    broken["containerDefinitions"][0]["stopTimout"] = 40
    with pytest.raises(ParamValidationError, match="stopTimout"):
        validate_parameters(broken, shape)


def test_container_wiring(task: dict) -> None:
    [container] = task["containerDefinitions"]
    assert container["essential"] is True
    assert container["command"][1:] == ["--config", "/etc/stoker/executor.yaml"]
    assert {p["containerPort"] for p in container["portMappings"]} == {8080, 9090}
    check = container["healthCheck"]
    assert check["command"][0] == "CMD"
    assert "http://127.0.0.1:8080/healthz" in check["command"][-1]
    assert {s["name"] for s in container["secrets"]} == {"EXECUTOR_API_KEY"}
    assert all(s["valueFrom"].startswith("arn:aws:secretsmanager:")
               for s in container["secrets"])
    volumes = {v["name"] for v in task["volumes"]}
    mounts = {m["containerPath"]: m["sourceVolume"] for m in container["mountPoints"]}
    assert mounts["/var/lib/stoker"] in volumes
    assert DRAIN_GRACE_S + 10 <= container["stopTimeout"] <= 120  # 120: ECS's maximum


def test_runs_as_root_with_only_the_capabilities_it_needs(task: dict) -> None:
    [container] = task["containerDefinitions"]
    assert container["user"] == "0:0"
    assert container["readonlyRootFilesystem"] is True
    assert "privileged" not in container
    # Fargate lets a task add no capability but SYS_PTRACE, so the set is Docker's default
    # (Fargate's too) minus what the task drops, and that must be exactly Stoker's.
    capabilities = container["linuxParameters"]["capabilities"]
    assert "add" not in capabilities
    drop = set(capabilities["drop"])
    assert drop <= DOCKER_DEFAULT, drop - DOCKER_DEFAULT  # nothing dropped that is not there
    assert DOCKER_DEFAULT - drop == CAPABILITIES


# What Fargate refuses in a task definition (ECS's "task definition differences for
# Fargate"): the model above accepts all of them, RegisterTaskDefinition would not.
FARGATE_INVALID = {"disableNetworking", "dnsSearchDomains", "dnsServers",
                   "dockerSecurityOptions", "extraHosts", "ipcMode", "links", "privileged"}
FARGATE_INVALID_LINUX = {"devices", "sharedMemorySize", "tmpfs", "maxSwap", "swappiness"}


def test_fits_fargate(task: dict) -> None:
    assert task["requiresCompatibilities"] == ["FARGATE"]
    assert task["networkMode"] == "awsvpc"  # the only mode Fargate runs
    assert "placementConstraints" not in task and "ipcMode" not in task
    # Bind-mount volumes only: the cache lives on the task's ephemeral storage (21-200 GiB).
    assert all(set(v) == {"name"} for v in task["volumes"]), task["volumes"]
    assert 21 <= task["ephemeralStorage"]["sizeInGiB"] <= 200
    [container] = task["containerDefinitions"]
    assert not FARGATE_INVALID & set(container)
    linux = container.get("linuxParameters", {})
    assert not FARGATE_INVALID_LINUX & set(linux)
    assert set(linux.get("capabilities", {}).get("add", [])) <= {"SYS_PTRACE"}
    assert not any(r.get("type") == "GPU" for r in container.get("resourceRequirements", []))


def test_no_tmp_shared_by_the_action_uids(task: dict) -> None:
    """Nothing mounted on /tmp: with the read-only root it stays read-only. A writable /tmp
    without the sticky bit would let one action's slot uid remove another's files there, and
    Fargate offers no tmpfs to make a sticky one; actions get TMPDIR in their own action
    directory under /var/lib/stoker instead (the container test runs one without /tmp)."""
    [container] = task["containerDefinitions"]
    assert "/tmp" not in {m["containerPath"] for m in container["mountPoints"]}
