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
    assert container["user"] == "10001:10001"
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
