"""deploy/kubernetes: `kubectl kustomize` builds the manifests, and they agree with the broker's
CLI, config keys, port, probe paths and the worker's projected token."""

from __future__ import annotations

import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from broker.__main__ import build_parser as broker_parser

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)

    from luigi_creds.luigi import ClientSettings

from deploy_files import (
    BROKER_PORT,
    K8S,
    configmap_policy,
    grant,
    installed_tool,
    k8s_objects,
    luigi_creds_section,
    rel,
    secret_files,
)


def broker_container() -> dict[str, Any]:
    [container] = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def named_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [found] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


@pytest.mark.parametrize("directory", [K8S, K8S / "worker"], ids=rel)
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    """kustomization.yaml names every manifest beside it, and `kubectl kustomize` builds them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    manifests = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    kinds = sorted(
        yaml.safe_load((directory / name).read_text(encoding="utf-8"))["kind"] for name in manifests
    )
    for doc in (
        yaml.safe_load((directory / name).read_text(encoding="utf-8")) for name in manifests
    ):
        assert (
            doc["metadata"].get("namespace", kustomization["namespace"])
            == (kustomization["namespace"])
        )
    kubectl = installed_tool("kubectl", "kubernetes-client")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d) == kinds


def test_deployment_probes_port_and_replicas() -> None:
    """The Deployment runs 2+ replicas probing /healthz and /readyz on port 8480 over HTTPS."""
    deployment = k8s_objects()["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    container = broker_container()
    assert named_port(container, "https") == BROKER_PORT
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert named_port(container, probe["port"]) == BROKER_PORT
        assert probe["scheme"] == "HTTPS"
    assert broker_parser().parse_args(container["args"]).command == "serve"


def test_deployment_is_non_root_read_only_and_bounded() -> None:
    """Pod and container run non-root, read-only, with all capabilities dropped and limits."""
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    context = broker_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    resources = broker_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_configmap_policy_loads_and_every_file_it_names_is_mounted() -> None:
    """The ConfigMap's broker.toml loads, uses PostgreSQL, and each file it names is mounted."""
    config = configmap_policy()
    assert config.broker.audit_store.startswith("postgresql://")
    parts = urlsplit(config.broker.audit_store)
    assert parts.username and parts.password is None
    container = broker_container()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert config.vault is not None
    named = [*secret_files(config), config.vault.ca_cert]
    store_files = re.findall(r"(?:sslrootcert|sslcert|sslkey)=([^&]+)", config.broker.audit_store)
    assert len(store_files) == 3
    for path in [*named, *(Path(p) for p in store_files)]:
        assert path is not None
        mount = mounts.get(str(path.parent))
        assert mount is not None and mount["readOnly"] is True, f"{path} is not mounted"
        volume = volumes[mount["name"]]
        assert "secret" in volume or "configMap" in volume
    config_mount = mounts["/etc/luigi-creds/broker.toml"]
    assert (
        volumes[config_mount["name"]]["configMap"]["name"]
        == (k8s_objects()["ConfigMap"]["metadata"]["name"])
    )


def test_secrets_are_referenced_by_name_never_shipped() -> None:
    """No manifest is a Secret; secret volumes reference Secrets by name only."""
    assert "Secret" not in k8s_objects()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {
        "luigi-creds-tls",
        "luigi-creds-vault-approle",
        "luigi-creds-audit-keys",
        "luigi-creds-postgres-client",
    }


def test_service_and_pdb_select_the_broker_pods() -> None:
    """The Service targets port 8480 and the PDB keeps one of the Deployment's pods up."""
    objects = k8s_objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    [port] = service["ports"]
    assert port["port"] == BROKER_PORT
    assert named_port(broker_container(), port["targetPort"]) == BROKER_PORT
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < objects["Deployment"]["spec"]["replicas"]


def test_network_policy_allows_only_the_documented_flows() -> None:
    """Ingress is 8480 from the worker namespace; egress is DNS, PostgreSQL, Vault and 443."""
    policy = k8s_objects()["NetworkPolicy"]["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    labels = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": BROKER_PORT}]
    sources = [peer["namespaceSelector"]["matchLabels"] for peer in ingress["from"]]
    assert {"kubernetes.io/metadata.name": "luigi"} in sources
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 8200), ("TCP", 443)}
    [public] = [r for r in policy["egress"] if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    excepted = public["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in excepted and "10.0.0.0/8" in excepted


def test_in_cluster_worker_token_fits_the_broker_issuer_and_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker CronJob's projected token has the broker's audience and lifetime, its service
    account is the `sub` the grants bind, and its luigi.cfg reads that token and the Service."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((K8S / "worker").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        docs[doc["kind"]] = doc
    account = docs["ServiceAccount"]["metadata"]
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    [token_volume] = [v for v in pod["volumes"] if "projected" in v]
    [source] = token_volume["projected"]["sources"]
    projected = source["serviceAccountToken"]

    config = configmap_policy()
    issuer = config.issuer("kubernetes")
    assert issuer is not None
    assert projected["audience"] in issuer.audiences
    assert projected["expirationSeconds"] <= issuer.max_token_lifetime
    subject = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert grant(config, "etl-writer").match["sub"] == subject
    assert subject in grant(config, "etl-vault").match["sub"]

    [mount] = [m for m in container["volumeMounts"] if m["name"] == token_volume["name"]]
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    settings = ClientSettings.from_mapping(
        luigi_creds_section(docs["ConfigMap"]["data"]["luigi.cfg"])
    )
    assert settings.token_source == f"file:{mount['mountPath']}/{projected['path']}"
    service = k8s_objects()["Service"]["metadata"]
    assert settings.broker_url == (
        f"https://{service['name']}.{service['namespace']}.svc:{BROKER_PORT}"
    )
    ingress = k8s_objects()["NetworkPolicy"]["spec"]["ingress"][0]["from"]
    assert {"kubernetes.io/metadata.name": account["namespace"]} in [
        peer["namespaceSelector"]["matchLabels"] for peer in ingress
    ]
    assert container["command"][:2] == ["luigi", "--module"]
