"""deploy/kubernetes: every manifest passes kubernetes-validate's strict schemas (unknown
fields are errors), and the pieces agree with each other and with Stoker: the ConfigMap's
executor.yaml loads, the Deployment mounts it where the args point, takes the API key from
the Secret, probes the health port and leaves the drain its time."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from engine import config_file

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes still common, and the newest the validator ships schemas for.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
UID = 10001


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.name}: one object per file"
        found[docs[0]["kind"]] = docs[0]
    return found


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    found = manifests()
    assert set(found) == {"Deployment", "Secret", "ConfigMap", "HorizontalPodAutoscaler"}
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_strict_schemas(objects: dict[str, dict], version: str) -> None:
    for kind, obj in objects.items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind} against Kubernetes {version}: {e.message} at "
                        f"{'.'.join(str(p) for p in e.path)}")


def test_strict_validation_catches_a_misspelt_field(objects: dict[str, dict]) -> None:
    """The check above would notice a typo: a field the schema does not know fails."""
    broken = copy.deepcopy(objects["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_configmap_holds_a_valid_executor_yaml(objects: dict[str, dict], tmp_path: Path) -> None:
    path = tmp_path / "executor.yaml"
    path.write_text(objects["ConfigMap"]["data"]["executor.yaml"])
    config = config_file.load(str(path), env={"EXECUTOR_API_KEY": "from-the-secret"})
    assert config.api_key == "from-the-secret"
    assert config.server
    assert config.data_dir == "/var/lib/stoker"
    assert config.health_listen.endswith(":8080") and config.metrics_listen.endswith(":9090")


def test_deployment_wiring(objects: dict[str, dict], tmp_path: Path) -> None:
    deployment, secret, configmap = (objects[k] for k in ("Deployment", "Secret", "ConfigMap"))
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    # The config: the ConfigMap, mounted at the directory the args name.
    assert container["args"] == ["executor", "--config", "/etc/stoker/executor.yaml"]
    assert volumes[mounts["/etc/stoker"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert "executor.yaml" in configmap["data"]
    # The API key: env EXECUTOR_API_KEY from a key that the Secret has.
    env = {e["name"]: e for e in container["env"]}
    ref = env["EXECUTOR_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    # The cache volume at data_dir, bounded.
    path = tmp_path / "executor.yaml"
    path.write_text(configmap["data"]["executor.yaml"])
    config = config_file.load(str(path), env={})
    cache = volumes[mounts[config.data_dir]]
    assert cache["emptyDir"]["sizeLimit"] == "60Gi"
    assert config.cache_max_bytes < 60 * 1024**3
    # Probes on the health port, which the config serves.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(config.health_listen.rpartition(":")[2])
    for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                         ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path_, "port": "http"}, probe
    # Resources, and a grace period the drain fits in with room to exit.
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] >= config.drain_grace_s + 10
    # The image's user, and nothing more than it needs.
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_hpa_scales_the_deployment(objects: dict[str, dict]) -> None:
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "stoker_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
