"""The observability profile's Prometheus, for real: `promtool` accepts the repo's
observability/prometheus.yml, a real Prometheus with that file (its target pointed at a running
mesh's gateway instead of compose's `gateway:8000`) scrapes the mesh, and every query of the
provisioned Grafana dashboard evaluates there without an error, the core ones with data.

Grafana itself is not run here (it is not packaged for Debian or PyPI); its dashboard's metric
names are checked against the exported registry in tests/test_compose.py. Needs Debian's
`prometheus` package (.ci/run installs it); skipped, saying so, without it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from cascade.cli.embedded_nats import free_port
from tests.meshproc import REPO, running_mesh

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if PROMETHEUS is None or PROMTOOL is None:
    pytest.skip("no prometheus/promtool executables (apt-get install prometheus)", allow_module_level=True)

OBS = REPO / "observability"
MODEL = "prom"
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 1
max_replicas = 1
policy = "manual"
[models.generate]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
vocab = 300
seed = 3
"""


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _poll(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)  # polling Prometheus with a deadline


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    with running_mesh(home, DEPLOYMENT, workers=1) as mesh:
        client = openai.OpenAI(base_url=mesh["url"], api_key="none")  # gateway_url ends in /v1
        _poll(lambda: MODEL in {m.id for m in client.models.list()}, 120, "the model to be served")
        for i in range(4):
            client.completions.create(model=MODEL, prompt=f"hello {i}", max_tokens=6)
        gateway = urllib.parse.urlsplit(mesh["url"]).netloc
        cfg = yaml.safe_load((OBS / "prometheus.yml").read_text())
        # Compose's file as it is, with the one thing compose gives it by name: where the gateway is.
        assert cfg["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway:8000"]
        cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [gateway]
        cfg["global"]["scrape_interval"] = "1s"
        work = tmp_path_factory.mktemp("prometheus")
        (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        proc = subprocess.Popen(
            [
                str(PROMETHEUS), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=(work / "log").open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            api = f"http://127.0.0.1:{port}/api/v1"

            def scraped() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited:\n{(work / 'log').read_text()[-3000:]}")
                try:
                    targets = _get(f"{api}/targets")["data"]["activeTargets"]
                    got = _get(f"{api}/query?query=" + urllib.parse.quote("cascade:generation_tokens_total"))
                except OSError:
                    return False
                return bool(targets and targets[0]["health"] == "up" and got["data"]["result"])

            _poll(scraped, 60, "prometheus to scrape the gateway")
            # One more request between scrapes, so rates over the window are not all zero.
            client.completions.create(model=MODEL, prompt="again", max_tokens=6)
            yield {"api": api, "work": work}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_promtool_accepts_the_observability_config() -> None:
    cmd = [str(PROMTOOL), "check", "config", str(OBS / "prometheus.yml")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads((OBS / "grafana/dashboards/cascade.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


def _as_prometheus(expr: str) -> str:
    # Grafana's variables as Grafana expands them here: "All" models, a rate window of 30 s.
    return expr.replace('"$model"', '".*"').replace("$__rate_interval", "30s")


def test_every_dashboard_query_runs_on_the_scraped_mesh(prometheus: dict[str, Any]) -> None:
    queries = _queries()
    assert len(queries) >= 10
    failed = []
    for title, expr in queries:
        got = _get(f"{prometheus['api']}/query?query=" + urllib.parse.quote(_as_prometheus(expr)))
        if got.get("status") != "success":
            failed.append((title, expr, got))
    assert not failed, failed


def test_the_core_panels_have_data_from_the_mesh(prometheus: dict[str, Any]) -> None:
    """Requests were served: token counts, outcomes and layer readiness are series with the
    model's label in Prometheus (metrics that only move on rare events may have none yet)."""
    must = (
        "cascade:generation_tokens_total",
        "cascade:prompt_tokens_total",
        "cascade:request_success_total",
        "cascade:time_to_first_token_seconds_bucket",
        "cascade:layers_ready",
        "cascade:layers_total",
    )
    dashboard_metrics = {m for _, e in _queries() for m in re.findall(r"cascade[:_][a-z_:]+", e)}
    for name in must:
        assert name in dashboard_metrics, name
        got = _get(f"{prometheus['api']}/query?query=" + urllib.parse.quote(f'{name}{{model="{MODEL}"}}'))
        assert got["status"] == "success" and got["data"]["result"], name
    ready = _get(f"{prometheus['api']}/query?query=" + urllib.parse.quote(_as_prometheus(_queries_by_title("Layers"))))
    assert [float(r["value"][1]) for r in ready["data"]["result"]] == [1.0]  # one instance, every layer ready


def _queries_by_title(prefix: str) -> str:
    return next(e for t, e in _queries() if t.startswith(prefix))
