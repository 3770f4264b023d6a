"""deploy/kubernetes, checked offline: every core manifest of each rendered overlay is valid
for Kubernetes (`kubernetes-validate --strict`), the kinds a deployment needs are there,
KEDA's ScaledObject (a CRD, not in Kubernetes' schemas) is well-formed and scales the
worker on the Celery queue, and the pods are what the README promises: non-root,
read-only, probed, bounded, configured from the ConfigMap and the Secret."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.cli import main as cli
from service.queue import QUEUES
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["production", "example"]
# The oldest Kubernetes still commonly run, and the newest the validator knows.
VERSIONS = ["1.31.0", "1.37.0"]
CRDS = {"keda.sh/v1alpha1"}


def rendered(overlay: str) -> list[dict[str, Any]]:
    text = (K8S / "rendered" / f"{overlay}.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_manifest_validates_strictly(overlay: str, version: str) -> None:
    core = [d for d in rendered(overlay) if d["apiVersion"] not in CRDS]
    assert core
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kinds_a_deployment_needs_are_there(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for needed in [
        ("Deployment", "dreamgate-gateway"),
        ("Deployment", "dreamgate-worker"),
        ("Deployment", "dreamgate-beat"),
        ("Job", "dreamgate-migrate"),
        ("Service", "dreamgate-gateway"),
        ("HorizontalPodAutoscaler", "dreamgate-gateway"),
        ("ScaledObject", "dreamgate-worker"),
        ("PodDisruptionBudget", "dreamgate-gateway"),
        ("PodDisruptionBudget", "dreamgate-worker"),
        ("ServiceAccount", "dreamgate"),
    ]:
        assert needed in kinds, needed
    assert any(k == "ConfigMap" and n.startswith("dreamgate-config") for k, n in kinds)
    assert by_kind(docs, "Deployment")["dreamgate-beat"]["spec"]["replicas"] == 1
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["dreamgate-gateway"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "dreamgate-gateway",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_on_the_celery_queue(overlay: str) -> None:
    docs = rendered(overlay)
    [scaled] = by_kind(docs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "advanced",
        "fallback",
        "triggers",
    }
    target = spec["scaleTargetRef"]
    assert target["name"] == "dreamgate-worker" and target.get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # One trigger per queue: a backlog in any of them brings workers.
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(QUEUES.values())
    for trigger in triggers:
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata: strings
        assert int(meta["listLength"]) > 0
    meta = triggers[0]["metadata"]
    # The address comes from the worker's environment: the ConfigMap must define it.
    worker = pod_specs(docs)["dreamgate-worker"]["containers"][0]
    [config_ref] = [e["configMapRef"]["name"] for e in worker["envFrom"] if "configMapRef" in e]
    config = by_kind(docs, "ConfigMap")[config_ref]["data"]
    assert ":" in config[meta["addressFromEnv"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_bounded_and_probed(overlay: str) -> None:
    docs = rendered(overlay)
    commands = set(cli.commands)
    for name, pod in pod_specs(docs).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert all("emptyDir" in v for v in volumes.values()), name
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
            if c["command"][0] == "dreamgate":
                assert c["command"][1] in commands, where
                refs = [next(iter(e)) for e in c.get("envFrom", [])]
                if name != "wirosim":
                    assert refs == ["configMapRef", "secretRef"], where
                    config = by_kind(docs, "ConfigMap")[c["envFrom"][0]["configMapRef"]["name"]]
                    assert config["data"]["PROMETHEUS_MULTIPROC_DIR"] in mounts, where
    pods = pod_specs(docs)
    gateway = pods["dreamgate-gateway"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for name in ("dreamgate-worker", "dreamgate-beat"):
        c = pods[name]["containers"][0]
        assert c["livenessProbe"]["exec"]["command"][:2] == ["dreamgate", "worker-probe"]
        heartbeat = {e["name"]: e["value"] for e in c["env"]}["HEARTBEAT_FILE"]
        assert Path(heartbeat).parent == Path("/tmp"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_cover_the_drain(overlay: str) -> None:
    docs = rendered(overlay)
    pods = pod_specs(docs)
    gateway = pods["dreamgate-gateway"]
    config_name = gateway["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    drain = float(by_kind(docs, "ConfigMap")[config_name]["data"]["SHUTDOWN_GRACE_S"])
    pre_stop = float(gateway["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    # preStop runs first, then SIGTERM starts the drain; both within the grace period.
    assert gateway["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert pods["dreamgate-worker"]["terminationGracePeriodSeconds"] >= 120


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_match_the_overlays(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    committed = (K8S / "rendered" / f"{overlay}.yaml").read_text()
    assert committed.split("\n", 1)[1] == out, "run `make k8s` and commit the result"
