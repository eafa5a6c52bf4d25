"""Load signals for the scaler: per model, what happened in each metrics interval
(`ModelMetrics`, cascade/messages.py), accumulated here without I/O or clocks
(every call carries what it needs) and taken once per interval by the core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cascade.messages import ModelMetrics, latency_bucket


@dataclass(slots=True)
class _Interval:
    arrivals: int = 0
    completions: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: dict[int, int] = field(default_factory=dict)  # bucket index → count
    itl: dict[int, int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.arrivals or self.completions or self.errors or self.generated_tokens)


def _hist(counts: dict[int, int]) -> list[int]:
    if not counts:
        return []
    out = [0] * (max(counts) + 1)  # trailing empty buckets are left out, as the message allows
    for i, n in counts.items():
        out[i] = n
    return out


class LoadReport:
    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self._seq: dict[str, int] = {}  # per model, so a receiver can spot a lost report
        self._now: dict[str, _Interval] = {}
        self._last_arrival: dict[str, float] = {}

    def _at(self, model: str) -> _Interval:
        iv = self._now.get(model)
        if iv is None:
            iv = self._now[model] = _Interval()
        return iv

    def arrival(self, model: str, prompt_tokens: int, wall_ts: float) -> None:
        iv = self._at(model)
        iv.arrivals += 1
        iv.prompt_tokens += prompt_tokens
        self._last_arrival[model] = wall_ts

    def first_token(self, model: str, seconds: float) -> None:
        b = latency_bucket(seconds * 1000.0)
        iv = self._at(model)
        iv.ttft[b] = iv.ttft.get(b, 0) + 1

    def token_gap(self, model: str, seconds: float) -> None:
        b = latency_bucket(seconds * 1000.0)
        iv = self._at(model)
        iv.itl[b] = iv.itl.get(b, 0) + 1

    def generated(self, model: str, tokens: int) -> None:
        self._at(model).generated_tokens += tokens

    def completed(self, model: str) -> None:
        self._at(model).completions += 1

    def failed(self, model: str) -> None:
        """Ended with an error, or refused (429 / 503)."""
        self._at(model).errors += 1

    def take(self, ts: float, interval_s: float, gauges: Mapping[str, tuple[int, int]]) -> list[ModelMetrics]:
        """Close the interval ending at `ts`: one report per model that had traffic in it or still
        holds requests. `gauges` maps model → (running, waiting) now."""
        out = []
        models = set(self._now) | {m for m, (r, w) in gauges.items() if r or w}
        for model in sorted(models):
            iv = self._now.get(model, _Interval())
            running, waiting = gauges.get(model, (0, 0))
            if iv.empty() and not (running or waiting):
                continue
            self._seq[model] = seq = self._seq.get(model, 0) + 1
            out.append(
                ModelMetrics(
                    gateway_id=self.gateway_id,
                    model=model,
                    seq=seq,
                    ts=ts,
                    interval_s=interval_s,
                    arrivals=iv.arrivals,
                    completions=iv.completions,
                    errors=iv.errors,
                    prompt_tokens=iv.prompt_tokens,
                    generated_tokens=iv.generated_tokens,
                    running=running,
                    waiting=waiting,
                    ttft_hist=_hist(iv.ttft),
                    itl_hist=_hist(iv.itl),
                    last_arrival_ts=self._last_arrival.get(model, 0.0),
                )
            )
        self._now = {}
        return out
