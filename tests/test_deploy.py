"""The Kubernetes manifests stay consistent with the daemon: their settings load, probes and ports line up."""

from __future__ import annotations

from pathlib import Path

import yaml

from accessd.settings import load_settings

DEPLOY = Path(__file__).parents[1] / "deploy" / "k8s"


def documents() -> list[dict]:
    return [
        doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def test_every_deployment_configures_a_daemon_that_loads() -> None:
    docs = documents()
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "accessd-config")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"accessd-edge", "accessd-internal"}
    for deployment in deployments:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        role = container["args"][container["args"].index("--role") + 1]
        environ = dict(config["data"])
        for item in container.get("env", []):
            environ[item["name"]] = item.get("value", "postgresql://user:secret@postgres:5432/accessd")
        settings = load_settings(environ=environ, flags={"role": role})  # raises ConfigError if not
        binds = {"edge": settings.server.edge_bind, "internal": settings.server.internal_bind}[
            "internal" if role == "internal" else "edge"
        ]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == binds.addresses[0][1]
        if role == "edge":
            assert ports["stream"] == settings.server.stream_bind.addresses[0][1]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > settings.server.drain_timeout_s + container["lifecycle"]["preStop"]["sleep"]["seconds"]


def test_services_and_budgets_select_their_deployments() -> None:
    docs = documents()
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    for doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"] == labels[doc["metadata"]["name"]]
        elif doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"] == labels[doc["metadata"]["name"]]
        elif doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] in labels
