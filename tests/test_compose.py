"""compose.yaml and the Dockerfile stay true to the code: every service's command is a real
`cascade` subcommand whose flags the CLI's own parser accepts, with the environment it would
run under, and the one-shot model matches what the services expect on the volume."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cascade import cli
from cascade.config import resolve_nats_url, resolve_prefix
from services.gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parent.parent
CASCADE_SERVICES = ["model-init", "gateway", "scaler", "loader", "worker"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def parse(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse a container's command line as the container would: its env decides the defaults."""
    for k in [k for k in os.environ if k.startswith("CASCADE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    assert command[0] == "cascade", f"{command} does not run the cascade command"
    try:
        return cli.parse_args(command[1:])
    except SystemExit as e:  # argparse's way of saying the flags are wrong
        raise AssertionError(f"{' '.join(command)} does not parse (exit {e.code})") from None


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = {n: s for n, s in compose["services"].items() if "profiles" not in s}
    assert set(services) == {"nats", *CASCADE_SERVICES}
    assert "models" in compose["volumes"]
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    assert "-js" in nats["command"]
    assert "8000:8000" in services["gateway"]["ports"]
    assert services["worker"]["deploy"]["replicas"] == 2


@pytest.mark.parametrize("name", CASCADE_SERVICES)
def test_every_command_is_a_real_cascade_subcommand(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose["services"][name]
    assert svc.get("build") == "." and "cascade-mesh" in svc["image"]
    env = svc["environment"]
    assert env["CASCADE_NATS_URL"] == "nats://nats:4222"
    assert env["CASCADE_HOME"] == "/models"
    # Every service but the (diskless) workers mounts the model store.
    assert ("models:/models" in svc["volumes"]) == (name != "worker")
    args = parse(svc["command"], env, monkeypatch)
    expected = "model" if name == "model-init" else name
    assert args.command == expected
    if name in ("gateway", "scaler", "loader", "worker"):
        # The service contract's flags resolve from the container's env (some services default
        # them at parse time, some at run time through the same resolvers).
        assert resolve_nats_url(args.nats_url) == "nats://nats:4222"
        assert resolve_prefix(args.prefix) == "cascade"
        deps = svc["depends_on"]
        assert deps["nats"]["condition"] == "service_healthy"
        assert deps["model-init"]["condition"] == "service_completed_successfully"


def test_gateway_listens_where_it_is_published_and_checked(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = compose["services"]["gateway"]
    args = parse(gw["command"], gw["environment"], monkeypatch)
    assert args.host == "0.0.0.0" and args.port == 8000
    assert "127.0.0.1:8000/health" in " ".join(gw["healthcheck"]["test"])


def test_model_init_writes_the_deployment_file_the_services_read(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model-init pulls the default model (SmolLM2, else cascade-tiny: tests/test_model_pull.py
    runs this very command) and writes the file every control-plane service is configured with."""
    services = compose["services"]
    init = services["model-init"]
    args = parse(init["command"], init["environment"], monkeypatch)
    assert args.model_command == "pull" and args.model is None  # the default model, as `cascade up`
    home = Path(init["environment"]["CASCADE_HOME"])
    written = Path(args.deployment)
    assert written.is_relative_to(home)  # on the shared volume
    for name in ("gateway", "scaler", "loader"):
        svc = services[name]
        assert Path(parse(svc["command"], svc["environment"], monkeypatch).config) == written, name
    # The hub cache is on the volume too: the loader (and the gateway) read a hub model's files from it.
    assert Path(init["environment"]["HF_HOME"]).is_relative_to(home)
    for name in ("gateway", "loader"):
        assert services[name]["environment"]["HF_HOME"] == init["environment"]["HF_HOME"]
        assert "models:/models" in services[name]["volumes"]


def test_dockerfile_installs_with_the_constraints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("FROM python:3.11-slim")
    assert "-c constraints.txt ." in text
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "cascade", "services"):
        assert needed in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "cascade" not in ignored and "services" not in ignored and "README.md" not in ignored


# --------------------------------------------------------------------------- observability profile

OBS = ROOT / "observability"


def test_observability_profile_scrapes_the_gateway_and_provisions_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom, graf = services["prometheus"], services["grafana"]
    assert prom["profiles"] == graf["profiles"] == ["observability"]
    # Every file a container mounts from the repository is there.
    for svc in (prom, graf):
        for vol in svc["volumes"]:
            src = vol.split(":")[0]
            assert (ROOT / src).exists(), f"{vol}: {src} is missing"
    cfg = yaml.safe_load((OBS / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    gw = services["gateway"]
    port = gw["ports"][0].split(":")[-1]
    assert job["static_configs"][0]["targets"] == [f"gateway:{port}"]
    ds = yaml.safe_load((OBS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    dashboard = json.loads((OBS / "grafana/dashboards/cascade.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}, "panels must name the provisioned datasource"
    provider = yaml.safe_load((OBS / "grafana/provisioning/dashboards/cascade.yml").read_text())
    mounted = {v.split(":")[1] for v in graf["volumes"]}
    assert provider["providers"][0]["options"]["path"] in mounted


_NAME = re.compile(r"\b(cascade[a-zA-Z0-9_:]*)")


def test_grafana_dashboard_uses_only_metrics_the_gateway_exports() -> None:
    """The dashboard and the code cannot drift: every metric a panel queries is registered,
    with the suffix its kind has (_bucket only on histograms), and every label it groups or
    filters by is one the metric carries."""
    cat = GatewayMetrics(queue_depth=dict, in_flight=dict, instances=dict).catalogue()
    dashboard = json.loads((OBS / "grafana/dashboards/cascade.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    used = set()
    for expr in exprs:
        for name in _NAME.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert cat.get(base, ("",))[0] == "histogram", f"{name}: {base} is not an exported histogram"
            else:
                assert name in cat, f"{name} (in {expr!r}) is not exported"
            used.add(base)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",")} - {"le"}
            for name in _NAME.findall(expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert labels <= set(cat[base][1]), f"{expr!r} groups by {labels - set(cat[base][1])}"
        for name, selector in re.findall(r"(cascade[a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            labels = set(re.findall(r"([a-zA-Z_]+)\s*!?=~?", selector))
            assert labels <= set(cat[base][1]), f"{name} has no label {labels - set(cat[base][1])}"
    # The panels cover what the issue asks to see.
    for needed in (
        "cascade:time_to_first_token_seconds",
        "cascade:inter_token_latency_seconds",
        "cascade:generation_tokens_total",
        "cascade:layers_ready",
        "cascade:transfer_bytes_total",
        "cascade:scale_decisions_total",
        "cascade:num_requests_waiting",
    ):
        assert needed in used, needed


def test_workers_are_diskless_on_the_loaders_host(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same diskless workers as deploy/k8s: no model store mounted, any read of one an error;
    the model comes from the loader's host copy or a peer, and both say they are on one host."""
    services = compose["services"]
    worker = services["worker"]
    assert not any(str(v).split(":")[0] == "models" for v in worker.get("volumes") or ())
    args = parse(worker["command"], worker["environment"], monkeypatch)
    assert args.model_source == "network"
    loader = services["loader"]
    largs = parse(loader["command"], loader["environment"], monkeypatch)
    assert args.host_id and args.host_id == largs.host_id
    assert largs.host_cache != "off"  # what a diskless worker's first copy comes from
