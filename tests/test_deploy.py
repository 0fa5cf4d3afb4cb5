"""The deployment files stay consistent with the daemon and with a production deploy's needs.

deploy/k8s/: valid Kubernetes (kubernetes-validate, strict, the version scripts/deploy-check.sh pins), settings
that load, probes and ports that line up, locked-down pods, the internal role reachable only from the edges,
Prometheus and opted-in platform clients, secrets only from the Secret, HPA metrics the daemon exports.
deploy/services/: the seed §4 manifests valid against their committed JSON Schema and true to the repository.
checkov runs in scripts/deploy-check.sh (`just deploy-check`), not here: it needs a venv of its own.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from accessd.settings import load_settings
from accessd.stream._hub import HubStats
from accessd.stream._metrics import StreamMetrics

try:
    import kubernetes_validate
except ImportError as exc:
    raise ImportError(
        "kubernetes-validate is missing: pip install -e '.[dev]' (pyproject dev extra)"
    ) from exc

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
SERVICES = ROOT / "deploy" / "services"
# One pin for both: the version deploy-check validates against.
KUBERNETES_VERSION = re.search(
    r"KUBERNETES_VERSION:-([0-9.]+)", (ROOT / "scripts" / "deploy-check.sh").read_text()
).group(1)

# Settings whose value carries a password: they come from the accessd-secrets Secret, never the ConfigMap.
SECRET_SETTINGS = {"ACCESS_POSTGRES_DSN": "postgres-dsn", "ACCESS_REDIS_URL": "redis-url"}
SECRET_VALUES = {
    "postgres-dsn": "postgresql://accessd:secret@postgres:5432/accessd",
    "redis-url": "redis://:secret@redis:6379/0",
}


def documents() -> list[dict]:
    return [
        doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def of_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def config_map() -> dict[str, str]:
    (config,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "accessd-config"]
    return dict(config["data"])


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def role_of(deployment: dict) -> str:
    args = container_of(deployment)["args"]
    return args[args.index("--role") + 1]


def environ_of(deployment: dict) -> dict[str, str]:
    """The pod's ACCESS_* environment, Secret values replaced by stand-ins."""
    environ = config_map()
    for item in container_of(deployment).get("env", []):
        if "value" in item:
            environ[item["name"]] = item["value"]
        else:
            environ[item["name"]] = SECRET_VALUES[item["valueFrom"]["secretKeyRef"]["key"]]
    return environ


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- deploy/k8s ------------------------------------------------------------------------------------------


def test_every_manifest_is_valid_kubernetes() -> None:
    docs = documents()
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_refuses_a_broken_manifest() -> None:
    (edge,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "accessd-edge"]
    typo = copy.deepcopy(edge)
    container_of(typo)["securityContext"]["readOnlyRootFileSystem"] = True  # strict: unknown field
    wrong_type = copy.deepcopy(edge)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30s"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_deployment_configures_a_daemon_that_loads() -> None:
    deployments = of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"accessd-edge", "accessd-internal"}
    for deployment in deployments:
        container = container_of(deployment)
        role = role_of(deployment)
        # raises ConfigError if not
        settings = load_settings(environ=environ_of(deployment), flags={"role": role})
        binds = {"edge": settings.server.edge_bind, "internal": settings.server.internal_bind}[role]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == binds.addresses[0][1]
        if role == "edge":
            assert ports["stream"] == settings.server.stream_bind.addresses[0][1]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        # The drain (ACCESS_DRAIN_TIMEOUT_S) starts after the preStop sleep and must end before SIGKILL.
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > settings.server.drain_timeout_s + container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert any(m["mountPath"] == str(settings.server.state_dir) for m in container["volumeMounts"]), (
            "the state dir must be a mounted volume: the root filesystem is read-only"
        )


def test_services_budgets_policies_and_autoscalers_select_their_deployments() -> None:
    docs = documents()
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    for doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"] == labels[doc["metadata"]["name"]]
        elif doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            key = "selector" if doc["kind"] == "PodDisruptionBudget" else "podSelector"
            assert doc["spec"][key]["matchLabels"] == labels[doc["metadata"]["name"]]
        elif doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] == doc["metadata"]["name"]
            assert doc["spec"]["scaleTargetRef"]["name"] in labels
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    (namespace,) = of_kind("Namespace")
    assert {d["metadata"].get("namespace") for d in namespaced} == {namespace["metadata"]["name"]}
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_deployment_is_locked_down_sized_and_spread() -> None:
    for deployment in of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        container = container_of(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context.get("privileged", False) is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            assert "emptyDir" in volumes[mount["name"]], f"{name}: {mount['mountPath']} is not an emptyDir"
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, f"{name}: {kind}"
        spread = pod["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in spread:
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_internal_role_admits_only_edges_monitoring_and_opted_in_clients() -> None:
    (internal,) = [d for d in of_kind("Deployment") if role_of(d) == "internal"]
    (edge,) = [d for d in of_kind("Deployment") if role_of(d) == "edge"]
    internal_labels = internal["spec"]["template"]["metadata"]["labels"]
    edge_labels = edge["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], internal_labels)]
    assert policies, "no NetworkPolicy selects the internal pods: every source may reach them"
    allowed = [
        {"podSelector": {"matchLabels": edge_labels}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {
            "namespaceSelector": {"matchLabels": {"accessd.254carbon.io/internal-clients": "allowed"}},
            "podSelector": {"matchLabels": {"accessd.254carbon.io/internal-client": "true"}},
        },
    ]
    peers = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` admits every source"
            assert rule.get("ports") == [{"port": 8010, "protocol": "TCP"}]
            peers += rule["from"]
    assert all(peer in allowed for peer in peers), f"internal role reachable from {peers}"
    assert allowed[0] in peers, "the edges cannot reach the internal role"


def test_secret_settings_come_from_the_secret_only() -> None:
    assert not of_kind("Secret"), "a committed Secret would overwrite the real one on kubectl apply"
    config = config_map()
    assert not set(SECRET_SETTINGS) & set(config), "a password-bearing setting is in the ConfigMap"
    literals = list(config.items())
    for deployment in of_kind("Deployment"):
        env = container_of(deployment).get("env", [])
        literals += [(item["name"], item["value"]) for item in env if "value" in item]
        for item in env:
            if item["name"] in SECRET_SETTINGS:
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                expected = {"name": "accessd-secrets", "key": SECRET_SETTINGS[item["name"]]}
                assert ref == expected, f"{item['name']} must come from the Secret: valueFrom.secretKeyRef"
    for name, value in literals:
        for part in value.split(","):
            assert not urlsplit(part.strip()).password, f"{name} holds a password in plain text"


def test_autoscalers_scale_on_what_the_daemon_exports() -> None:
    registry = CollectorRegistry()
    StreamMetrics(registry, sessions=[], stats=HubStats())
    gauges = {m.name for m in registry.collect() if m.type == "gauge"}
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    max_connections = int(config_map()["ACCESS_MAX_CONNECTIONS"])
    for hpa in of_kind("HorizontalPodAutoscaler"):
        deployment = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        requests = container_of(deployment)["resources"]["requests"]
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        assert "Resource" in kinds
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                assert metric["resource"]["name"] in requests, "utilization needs a request"
            else:
                name = metric["pods"]["metric"]["name"]
                assert name in gauges, f"{name} is not a gauge the streaming listener exports"
                assert 0 < int(metric["pods"]["target"]["averageValue"]) < max_connections
        if role_of(deployment) == "edge":
            assert "Pods" in kinds, "the edge scales on open streams too"
            # While Redis is down each edge allows 1/N of a tier: N is the fewest edges there are.
            assert environ_of(deployment)["ACCESS_RATE_LIMIT_PROCESSES"] == str(hpa["spec"]["minReplicas"])
    for budget in of_kind("PodDisruptionBudget"):
        assert budget["spec"]["minAvailable"] < deployments[budget["metadata"]["name"]]["spec"]["replicas"]


# --- deploy/services -------------------------------------------------------------------------------------


def service_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SERVICES / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def service_manifests() -> dict[str, dict]:
    return {path.stem: yaml.safe_load(path.read_text()) for path in sorted(SERVICES.glob("*.yaml"))}


def test_service_manifests_match_their_schema() -> None:
    validator = service_validator()
    manifests = service_manifests()
    assert set(manifests) == {"edge", "internal"}
    for name, manifest in manifests.items():
        errors = [e.message for e in validator.iter_errors(manifest)]
        assert errors == [], f"deploy/services/{name}.yaml: {errors}"


@pytest.mark.parametrize(
    "break_it",
    [
        lambda m: m.pop("owner"),
        lambda m: m.update(colour="blue"),
        lambda m: m.update(maturity="shiny"),
        lambda m: m["api_contracts"].append("accessd-rest"),
        lambda m: m["sla"].update(p95_latency_ms="150"),
        lambda m: m["dependencies"].pop("external"),
        lambda m: m["events_in"].append("no spaces allowed"),
    ],
    ids=["missing", "unknown-key", "enum", "no-version", "type", "nested-missing", "topic"],
)
def test_the_schema_refuses_a_broken_service_manifest(break_it) -> None:
    manifest = copy.deepcopy(service_manifests()["edge"])
    break_it(manifest)
    assert list(service_validator().iter_errors(manifest))


def test_service_manifests_tell_the_truth() -> None:
    deployments = {role_of(d): d for d in of_kind("Deployment")}
    manifests = service_manifests()
    names = {m["service_name"] for m in manifests.values()}
    image_python = re.search(r"ARG PYTHON_VERSION=(\S+)", (ROOT / "Containerfile").read_text()).group(1)
    versions = {
        "accessd-rest": yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())["info"]["version"],
        "accessd-streaming": yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())["info"]["version"],
    }
    for role, manifest in manifests.items():
        deployment = deployments[role]
        assert manifest["service_name"] == deployment["metadata"]["name"]
        assert manifest["language_version"] == image_python
        contracts = dict(c.split("@") for c in manifest["api_contracts"])
        assert set(contracts) == (
            {"accessd-rest", "accessd-streaming"} if role == "edge" else {"accessd-rest"}
        )
        for contract, version in contracts.items():
            assert version == versions[contract], f"{role}: {contract} is {versions[contract]} in docs/"
        environ = environ_of(deployment)
        external = {
            dependency
            for setting, dependency in [
                ("ACCESS_JWKS_URL", "keycloak"),
                ("ACCESS_JWT_ISSUERS", "keycloak"),
                ("ACCESS_KAFKA_BOOTSTRAP", "kafka"),
                ("ACCESS_POSTGRES_DSN", "postgres"),
                ("ACCESS_REDIS_URL", "redis"),
            ]
            if setting in environ
        }
        assert set(manifest["dependencies"]["external"]) == external, role
        internal = {
            name
            for setting in ("ACCESS_AUTH_URL", "ACCESS_ENTITLEMENTS_URL", "ACCESS_METRICS_ENDPOINT")
            if setting in environ
            for name in names
            if urlsplit(environ[setting]).hostname == name
        }
        assert set(manifest["dependencies"]["internal"]) == internal, role
