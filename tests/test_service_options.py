"""The services' flags declared once (cascade/cliargs.py `Opt`): every service's --help names each
shared option's variable and default, the variable sets the default, and the flag beats it."""

from __future__ import annotations

import argparse
import re

import pytest

from cascade.cli.services import service_module
from cascade.cliargs import HEARTBEAT_S, HOST_ID, METRICS_S, Opt
from cascade.config import ConfigError
from services.gateway.main import settings_from_args as gateway_settings
from services.gateway.settings import GatewaySettings
from services.loader.settings import settings_from_args as loader_settings
from services.worker.settings import WorkerSettings

SERVICES = ("gateway", "scaler", "loader", "worker")
# Which shared options each service takes, under which flag.
SHARED: dict[str, dict[str, Opt]] = {
    "gateway": {"--metrics-interval-s": METRICS_S},
    "scaler": {"--heartbeat-s": HEARTBEAT_S},
    "loader": {"--heartbeat-s": HEARTBEAT_S, "--host-id": HOST_ID},
    "worker": {"--heartbeat-s": HEARTBEAT_S, "--metrics-s": METRICS_S, "--host-id": HOST_ID},
}


def parser(service: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=service)
    service_module(service).add_arguments(p)
    return p


def help_of(p: argparse.ArgumentParser, flag: str) -> str:
    """The help text of one flag, its wrapped lines joined."""
    action = next(a for a in p._actions if flag in a.option_strings)
    fmt = argparse.HelpFormatter(p.prog, width=10_000)
    fmt.add_argument(action)
    return " ".join(fmt.format_help().split())


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CASCADE_HEARTBEAT_S", "CASCADE_METRICS_S", "CASCADE_HOST_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("service", SERVICES)
def test_help_names_the_variable_and_default_of_each_shared_option(service: str) -> None:
    p = parser(service)
    for flag, opt in SHARED[service].items():
        text = help_of(p, flag)
        assert opt.env is not None
        shown = {HEARTBEAT_S: "1", METRICS_S: "1", HOST_ID: "the hostname"}[opt]
        assert re.search(rf"\(env {opt.env}, default {re.escape(shown)}\)$", text), (service, flag, text)


# Every variable a service's flags read, as its --help must name them (the common flags' included).
VARIABLES = {
    "gateway": "API_KEYS GATEWAY_HOST GATEWAY_PORT METRICS_S TOOL_CALL_PARSER",
    "scaler": "HEARTBEAT_S SCALER_ACK_TIMEOUT_S SCALER_ID SCALER_RATE_WINDOW_S SCALER_STALE_S SCALER_TICK_S "
    "SCALER_WINDOW_S",
    "loader": "HEARTBEAT_S HOST_ID LOADER_CONTROL_REPLICAS LOADER_HOST_CACHE LOADER_HOST_CACHE_KEEP_ALIVE_COLD_S "
    "LOADER_HOST_CACHE_KEEP_ALIVE_S LOADER_ID LOADER_IDLE_WAIT_S LOADER_LEASE LOADER_LEASE_S LOADER_LOAD_TIMEOUT_S "
    "LOADER_REQUEST_TIMEOUT_S LOADER_SEND_MB_S LOADER_SERVING_SEND_MB_S LOADER_TRANSFER_TIMEOUT_S "
    "LOADER_UNLOAD_TIMEOUT_S",
    "worker": "ADDRESS_CHECK_S ADVERTISE_HOST DATA_HOST DATA_PORT DEVICE DEVICE_PROFILE DRAIN_TIMEOUT_S FILES_DIR "
    "HEARTBEAT_S HOST_ID KV_BLOCK_SIZE KV_CACHE_MB KV_SLOTS LOAD_MB_S LOCAL_CACHE_MB LOCAL_CACHE_MB_S LOGPROBS_MODE "
    "MAX_BATCH MAX_MODEL_LEN MAX_PREFILL_TOKENS MAX_WAITING MEMORY_MB METRICS_S MODEL_SOURCE PREFIX_CACHING "
    "STAGE_HOST STAGE_PORT TORCH_THREADS WORKER_ID WORKER_SLOTS",
}


@pytest.mark.parametrize("service", SERVICES)
def test_help_names_every_variable_and_every_flag_a_default(service: str) -> None:
    p = parser(service)
    text = " ".join(p.format_help().split())
    named = set(re.findall(r"\$?CASCADE_([A-Z_]+)", text))
    assert named >= set(VARIABLES[service].split()) | {"NATS_URL", "PREFIX", "CONFIG", "LOG_LEVEL"}
    for action in p._actions:
        if action.dest not in ("help", "prefix_caching"):  # a switch: its variable is named above
            assert "default" in help_of(p, action.option_strings[0]), (service, action.option_strings)


def test_the_shared_variables_set_every_services_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HEARTBEAT_S", "0.25")
    monkeypatch.setenv("CASCADE_METRICS_S", "0.5")
    monkeypatch.setenv("CASCADE_HOST_ID", "rack-7")
    for service in ("scaler", "loader", "worker"):
        assert parser(service).parse_args([]).heartbeat_s == 0.25, service
    worker = WorkerSettings.from_args(parser("worker").parse_args(["--nats-url", "nats://x:1", "--worker-id", "w"]))
    assert (worker.heartbeat_s, worker.metrics_s, worker.host_id) == (0.25, 0.5, "rack-7")
    loader = loader_settings(parser("loader").parse_args([]))
    assert (loader.heartbeat_s, loader.host_id) == (0.25, "rack-7")
    gateway = gateway_settings(parser("gateway").parse_args(["--nats-url", "nats://x:1"]))
    assert (gateway.metrics_interval_s, gateway.heartbeat_s) == (0.5, 0.25)
    assert GatewaySettings(nats_url="").heartbeat_s == 0.25  # no flag: the variable alone


def test_a_flag_beats_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HEARTBEAT_S", "0.25")
    monkeypatch.setenv("CASCADE_METRICS_S", "0.5")
    args = parser("worker").parse_args(["--heartbeat-s", "2", "--metrics-s", "3", "--host-id", "h1"])
    assert (args.heartbeat_s, args.metrics_s, args.host_id) == (2.0, 3.0, "h1")
    args = parser("gateway").parse_args(["--metrics-interval-s", "4"])
    assert args.metrics_interval_s == 4.0


def test_without_variables_the_built_in_defaults_hold() -> None:
    worker = WorkerSettings.from_args(parser("worker").parse_args(["--nats-url", "nats://x:1", "--worker-id", "w"]))
    assert (worker.heartbeat_s, worker.metrics_s, worker.host_id) == (1.0, 1.0, "")
    loader = loader_settings(parser("loader").parse_args([]))
    assert (loader.heartbeat_s, loader.host_id) == (1.0, "")


@pytest.mark.parametrize("service", ("scaler", "loader", "worker"))
def test_a_bad_variable_fails_naming_it(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HEARTBEAT_S", "soon")
    with pytest.raises(ConfigError, match="CASCADE_HEARTBEAT_S='soon' is not a number"):
        parser(service)


def test_a_non_positive_interval_is_refused_by_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parser("loader").parse_args(["--heartbeat-s", "0"])
    assert e.value.code == 2 and "0.0 must be above 0" in capsys.readouterr().err


def test_help_text_with_a_percent_sign_survives_argparse() -> None:
    p = argparse.ArgumentParser()
    Opt("--x", 0.5, "share of the batch", env="X_SHARE", shown="50 % of it").add(p)
    assert help_of(p, "--x").endswith("(env X_SHARE, default 50 % of it)")
