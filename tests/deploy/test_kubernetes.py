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
from tests.deploy.privileges import BASELINE_ADDABLE, CAPABILITIES

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes still common, and the newest the validator ships schemas for.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


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
    # Root, for slot uids, with nothing more than it needs.
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is False
    assert "fsGroup" not in pod["securityContext"]  # root needs no group to write
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == CAPABILITIES
    assert "privileged" not in security
    # Nothing on /tmp: an emptyDir there would be 0777 without the sticky bit, and every
    # slot uid could remove the others' files (see the manifest).
    assert "/tmp" not in mounts


# The Pod Security Standards' baseline level, as the PodSecurity admission controller
# checks it (everything a pod template can set that baseline refuses).
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t",
                 "container_engine_t"}


def baseline_violations(template: dict) -> list[str]:
    found = []
    pod = template["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(key)
    found += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for name, value in template.get("metadata", {}).get("annotations", {}).items():
        if name.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            found.append(f"AppArmor {value}")
    contexts = [("pod", pod.get("securityContext", {}))]
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(key, []):
            contexts.append((c["name"], c.get("securityContext", {})))
            found += [f"{c['name']}: hostPort {p['hostPort']}" for p in c.get("ports", [])
                      if p.get("hostPort")]
    for who, sc in contexts:
        if sc.get("privileged"):
            found.append(f"{who}: privileged")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{who}: hostProcess")
        added = set(sc.get("capabilities", {}).get("add", [])) - BASELINE_ADDABLE
        found += [f"{who}: adds {c}" for c in sorted(added)]
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            found.append(f"{who}: seccomp Unconfined")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.append(f"{who}: AppArmor Unconfined")
        selinux = sc.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or "user" in selinux \
                or "role" in selinux:
            found.append(f"{who}: seLinuxOptions {selinux}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{who}: procMount {sc['procMount']}")
        found += [f"{who}: sysctl {s['name']}" for s in sc.get("sysctls", [])
                  if s["name"] not in SAFE_SYSCTLS]
    return found


def test_deployment_fits_the_baseline_pod_security_standard(objects: dict[str, dict]) -> None:
    """Root with six capabilities fits baseline, so a namespace that enforces it admits the
    pod: no label of privileged needed."""
    template = objects["Deployment"]["spec"]["template"]
    assert baseline_violations(template) == []
    # The check would notice: DAC_READ_SEARCH, which Stoker does not need, is refused.
    broken = copy.deepcopy(template)
    broken["spec"]["containers"][0]["securityContext"]["capabilities"]["add"].append(
        "DAC_READ_SEARCH")
    broken["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert baseline_violations(broken) == ["hostPath volume host", "executor: adds "
                                           "DAC_READ_SEARCH"]


def test_hpa_scales_the_deployment(objects: dict[str, dict]) -> None:
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "stoker_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
