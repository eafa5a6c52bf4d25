"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright): open
/dashboard on a running mesh, scale a model from one instance to three, and see the scale
decision appear and the new instances' layer bars fill unit by unit as the chain multicast
delivers them.

Needs `apt-get install chromium` and `pip install playwright` (.ci/run installs both); skipped
with the reason when either is missing. CASCADE_DASHBOARD_SCREENSHOT=docs/dashboard.png keeps
the screenshot taken mid scale-up (the one in docs/ comes from that)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.meshproc import REPO, cli, running_mesh

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CASCADE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is None:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if CHROMIUM is None:
    pytest.skip("no chromium executable (apt-get install chromium)", allow_module_level=True)

MODEL = "dash"
# Big enough (about 3 MB a layer) that a scale-up capped at 8 MB/s per send takes seconds: the
# browser sees the bars part-filled, as a real model's load looks.
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 1
max_replicas = 3
policy = "manual"
loading = "multicast"
[models.generate]
layers = 8
hidden = 384
heads = 6
kv_heads = 2
vocab = 320
seed = 5
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    old = os.environ.get("CASCADE_LOADER_SEND_MB_S")
    os.environ["CASCADE_LOADER_SEND_MB_S"] = "8"  # the services inherit it; a slow load is visible
    try:
        with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=3) as m:
            yield m
    finally:
        if old is None:
            os.environ.pop("CASCADE_LOADER_SEND_MB_S", None)
        else:
            os.environ["CASCADE_LOADER_SEND_MB_S"] = old


def _traffic(url: str, stop: threading.Event, errors: list[BaseException]) -> None:
    """A trickle of requests, so the charts have something to draw."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    try:
        while not stop.is_set():
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, extra_body={"ignore_eos": True})
    except BaseException as e:
        errors.append(e)
    finally:
        client.close()


def _rows(page: Page) -> dict[str, str]:
    """worker -> "ready/total" as the page shows it."""
    return dict(
        page.eval_on_selector_all("#instances tbody tr", "rows => rows.map(r => [r.dataset.worker, r.dataset.ready])")
    )


def test_scale_up_fills_layer_bars_and_shows_the_decision(mesh: dict[str, Any], tmp_path: Path) -> None:
    base = mesh["url"].removesuffix("/v1")
    stop, errors = threading.Event(), list[BaseException]()
    load = threading.Thread(target=_traffic, args=(mesh["url"], stop, errors), daemon=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/dashboard")
            page.wait_for_selector("#conn.up", timeout=30_000)
            # The first instance serves: its bar is full (8 layers + embedding + head).
            page.wait_for_selector('#instances tr[data-state="serving"][data-ready="10/10"]', timeout=60_000)
            assert page.locator('#instances tr[data-state="serving"] .unit.ready').count() == 10
            load.start()
            if os.environ.get("CASCADE_DASHBOARD_SCREENSHOT"):
                # For the picture only: let the charts draw half a minute of traffic first.
                page.wait_for_function(f"() => (state.series['{MODEL}'] || []).length >= 30", timeout=90_000)

            r = cli(mesh["home"], "scale", MODEL, "--replicas", "3")
            assert r.returncode == 0, r.stderr

            decision = page.wait_for_selector(f'#decisions li[data-model="{MODEL}"]', timeout=30_000)
            assert decision is not None
            assert "up" in decision.inner_text() and "target" in decision.inner_text()
            # A new instance part-way: some of its bars filled, not all (readiness arrives per unit).
            page.wait_for_function(
                """() => [...document.querySelectorAll('#instances tbody tr')].some(r => {
                       const [a, b] = r.dataset.ready.split('/').map(Number);
                       return a > 0 && a < b; })""",
                timeout=60_000,
            )
            page.wait_for_selector("#chains .chain .node.source", timeout=30_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            keep = os.environ.get("CASCADE_DASHBOARD_SCREENSHOT")
            if keep:
                shutil.copyfile(shot, REPO / keep)

            # Every bar of all three instances fills, and the decision is acknowledged.
            page.wait_for_function(
                "() => document.querySelectorAll("
                '\'#instances tr[data-state="serving"][data-ready="10/10"]\').length == 3',
                timeout=120_000,
            )
            page.wait_for_selector(f'#decisions li[data-model="{MODEL}"] .ack-ok', timeout=30_000)
            assert sorted(_rows(page).values()) == ["10/10"] * 3
            # The newest plan is one chain through both new instances (source → new → new): the
            # holder, or the host cache when the holder is busy serving the trickle of requests.
            assert page.locator("#chains .plan").first.locator(".node[data-target]").count() == 2
        finally:
            stop.set()
            if load.ident is not None:
                load.join(60)
            browser.close()
    assert not errors, errors
