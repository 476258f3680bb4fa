"""cluster/: every YAML parses; the launcher configs pass Ray's own cluster-config validation; the KubeRay
manifests carry what KubeRay requires; every entry point they run exists."""
from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        assert all(isinstance(d, dict) for d in _docs(f)), f


@pytest.mark.parametrize("provider", sorted(LAUNCHERS))
def test_launcher_config_passes_ray_validation(provider):
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load(LAUNCHERS[provider].read_text())
    prepared = prepare_config(copy.deepcopy(raw))  # merges Ray's provider defaults, as `ray up` does
    validate_config(prepared)                      # Ray's JSON schema + node-type checks
    assert prepared["provider"]["type"] == provider
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert 0 < prepared["idle_timeout_minutes"] <= 60
    setup = " ".join(prepared["setup_commands"])
    assert f"ray[default,train,tune]=={ray.__version__}" in setup   # the cluster runs the Ray we test against
    assert "prunekit" in setup and "/mnt/prunekit" in setup           # installs prunekit, mounts shared storage
    assert "WANDB_API_KEY" in setup and "secret" in setup             # the key comes from a secret store
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start                      # job API only through an SSH tunnel


def _kinds() -> dict[str, dict]:
    return {d["kind"]: d for f in KUBERAY for d in _docs(f)}


def _check_cluster_spec(spec: dict, rayjob: bool = False):
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"         # nothing exposed outside the cluster
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        containers = g["template"]["spec"]["containers"]
        for c in containers:
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            env = {e["name"]: e for e in c.get("env", [])}
            assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"]  # never a literal key


def test_kuberay_raycluster_manifest():
    rc = _kinds()["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_kuberay_rayjob_manifest_runs_a_recipe_and_shuts_down():
    job = _kinds()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], rayjob=True)
    # the entrypoint runs a real ray_jobs/ script on a real recipe, with flags the pipeline accepts
    words = shlex.split(spec["entrypoint"])
    script = next(w for w in words if w.startswith("ray_jobs/"))
    recipe = words[words.index("--config") + 1]
    assert (ROOT / script).is_file() and (ROOT / recipe).is_file()
    pvc = _kinds()["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_and_readme_match_the_manifests():
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}" in docker
    readme = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray dashboard", "kubectl port-forward", "ray job submit",
                   "WANDB_API_KEY", "kubectl create secret"):
        assert needle in readme, needle
