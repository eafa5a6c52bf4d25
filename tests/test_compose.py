"""compose.yaml and the Dockerfile stay true to the code: every service's command is a real
`cascade` subcommand whose flags the CLI's own parser accepts, with the environment it would
run under, and the one-shot model matches what the services expect on the volume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from cascade import cli
from cascade.config import resolve_nats_url, resolve_prefix

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
    services = compose["services"]
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
    assert "models:/models" in svc["volumes"]
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
    # The hub cache is on the volume too: workers read a hub model's files from it.
    assert Path(init["environment"]["HF_HOME"]).is_relative_to(home)
    assert services["worker"]["environment"]["HF_HOME"] == init["environment"]["HF_HOME"]


def test_dockerfile_installs_with_the_constraints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("FROM python:3.11-slim")
    assert "-c constraints.txt ." in text
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "cascade", "services"):
        assert needed in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "cascade" not in ignored and "services" not in ignored and "README.md" not in ignored
