"""For tests that need a real gateway: start one in-process on a free port, and check
its /metrics output strictly. (Like aiohttp.test_utils: shipped with the service so
end-to-end tests elsewhere start the gateway the same way its own tests do.)

    async with running_gateway(nats_url, prefix, deployment) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cascade.config import Deployment, ModelDeployment
from services.gateway.core import GatewayCore
from services.gateway.main import GatewayService, host
from services.gateway.settings import GatewaySettings


def one_model_deployment(name: str, path: Path, min_replicas: int = 1) -> Deployment:
    return Deployment(models=(ModelDeployment(name=name, path=path, min_replicas=min_replicas),))


@contextlib.asynccontextmanager
async def running_gateway(
    nats_url: str, prefix: str, deployment: Deployment, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    """A gateway on a free port under `prefix`, with any GatewaySettings field overridden;
    stopped on the way out, also on failure. A short shutdown grace keeps teardown quick."""
    overrides.setdefault("shutdown_grace_s", 1.0)
    settings = GatewaySettings(nats_url=nats_url, prefix=prefix, port=0, **overrides)
    running = RunningGateway(GatewayService(settings, deployment))
    async with running.host:
        yield running


class RunningGateway:
    """A gateway started in this process: its URL and engine, and `stop` (idempotent)."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service
        self.host = host(service)

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def id(self) -> str:
        return self.service.id

    @property
    def core(self) -> GatewayCore:
        return self.service.core

    async def stop(self) -> None:
        await self.host.stop()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse exposition format 0.0.4 strictly enough to catch a malformed line; returns
    samples by name. Checks TYPE comes before samples and histograms are cumulative."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"TYPE given twice for {name}"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        name, raw_labels, raw_value = m.groups()
        labels: dict[str, str] = {}
        if raw_labels:
            pos = 0
            for lm in _LABEL.finditer(raw_labels):
                assert lm.start() == pos, f"bad labels in {line!r}"
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
            assert pos == len(raw_labels), f"bad labels in {line!r}"
        value = float(raw_value)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"sample {name} before its TYPE"
        samples.setdefault(name, []).append((labels, value))
    for name, kind in types.items():
        if kind != "histogram":
            continue
        by_series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for labels, v in samples.get(name + "_bucket", []):
            key = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
            by_series.setdefault(key, []).append((float(labels["le"]), v))
        counts = {tuple(sorted(labels.items())): v for labels, v in samples.get(name + "_count", [])}
        for key, buckets in by_series.items():
            values = [v for _, v in buckets]
            assert values == sorted(values), f"{name} buckets are not cumulative"
            assert math.isinf(buckets[-1][0]), f"{name} lacks the +Inf bucket"
            assert counts[key] == buckets[-1][1], f"{name}_count differs from the +Inf bucket"
    return samples


def sample(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None
