"""Compute quotas on a shared worker, measured in time: two instances on one engine thread
(`services/worker/runner.py`), each kept busy with decoding requests, on an emulated device whose
steps take what the profile says; for several quota pairs, the share of the device's time and of
the generated tokens each instance gets, against the share its quota asks for.

    python -m bench.quota [--profile llama2-7b-a100-80gb] [--steps 240] [--no-write]

Writes bench/results/quota.json and quota.md. What is emulated: the accelerator (each step is
padded to the profile's time for the real model's layer count and batch); the models are small
generated ones run for real on the CPU (their compute is far below the padded step time). Both
instances hold the same model shape, so a step costs about the same on either and a share of
steps is a share of time; the table reports both. A last row leaves one instance without work:
the other gets the whole device, whatever the quotas (a quota is a floor under contention).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import md_table, result_header, write_result
from cascade.config import GenerateSpec
from cascade.device_profile import StepPadder, load_profile
from cascade.messages import SamplingParams
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine, StepResult
from services.worker.model import LlamaModel
from services.worker.runner import EngineRunner, EngineThread

SPEC = GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7)
PAIRS: list[tuple[float, float, bool]] = [(1, 1, True), (2, 1, True), (3, 1, True), (1, 4, True), (3, 1, False)]


def load_model(path: Path) -> LlamaModel:
    ck = Checkpoint(path)
    m = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    return m


async def run_pair(
    model_dir: Path, profile: str, qa: float, qb: float, b_busy: bool, steps: int, batch: int
) -> dict[str, Any]:
    tok = ByteTokenizer()
    thread = EngineThread(threads=1)
    engines: dict[str, Engine] = {}
    for n in ("a", "b"):
        m = load_model(model_dir)
        engines[n] = Engine(
            m, tok, max_batch=batch, worker_id=n, padder=StepPadder(load_profile(profile), m.cfg.num_hidden_layers)
        )
    tokens = {"a": 0, "b": 0}
    total = asyncio.Event()

    def make(n: str) -> EngineRunner:
        async def deliver(r: StepResult) -> None:
            tokens[n] += sum(len(ev.token_ids) for _, ev in r.events)
            if lanes["a"].steps + lanes["b"].steps >= steps:
                total.set()

        return EngineRunner(
            lambda: engines[n], deliver, lambda _: None, shared=thread, name=n, quota={"a": qa, "b": qb}[n]
        )

    lanes = {n: make(n) for n in ("a", "b")}
    # Enough work that neither (busy) instance runs out within the measured steps.
    long = SamplingParams(max_tokens=steps + 64, ignore_eos=True)
    for n in ("a", "b") if b_busy else ("a",):
        for i in range(batch):
            engines[n].submit(f"{n}{i}", "g", tok.encode(f"quota {n} {i}"), long)
    tasks = []
    for lane in lanes.values():
        lane.start()
        tasks.append(asyncio.get_running_loop().create_task(lane.publish()))
    t0 = time.monotonic()
    lanes["a"].wake()
    await asyncio.wait_for(total.wait(), 600)
    wall = time.monotonic() - t0
    for lane in lanes.values():
        await lane.stop()
    for t in tasks:
        t.cancel()
    busy = {n: lanes[n].busy_s for n in lanes}
    all_steps = lanes["a"].steps + lanes["b"].steps
    want_a = qa / (qa + qb) if b_busy else 1.0
    return {
        "quota_a": qa,
        "quota_b": qb,
        "b_has_work": b_busy,
        "asked_share_a": round(want_a, 4),
        "step_share_a": round(lanes["a"].steps / all_steps, 4),
        "time_share_a": round(busy["a"] / max(busy["a"] + busy["b"], 1e-9), 4),
        "token_share_a": round(tokens["a"] / max(tokens["a"] + tokens["b"], 1), 4),
        "steps": {n: lanes[n].steps for n in lanes},
        "busy_s": {n: round(busy[n], 3) for n in busy},
        "tokens_per_s": {n: round(tokens[n] / wall, 1) for n in tokens},
        "overrun_steps": sum(lanes[n].overrun_steps for n in lanes),
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="emulated device profile (docs/device-profiles)")
    p.add_argument("--steps", type=int, default=240, help="engine steps measured per quota pair (both instances)")
    p.add_argument("--batch", type=int, default=8, help="decoding requests each busy instance holds")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        generate_model(Path(d), SPEC)
        rows = [asyncio.run(run_pair(Path(d), a.profile, qa, qb, busy, a.steps, a.batch)) for qa, qb, busy in PAIRS]
    headers = ["quota a:b", "b has work", "asked share a", "step share a", "time share a", "token share a"]
    headers += ["tok/s a", "tok/s b", "overruns"]
    table = md_table(
        headers,
        [
            [f"{r['quota_a']:g}:{r['quota_b']:g}", "yes" if r["b_has_work"] else "no", r["asked_share_a"],
             r["step_share_a"], r["time_share_a"], r["token_share_a"], r["tokens_per_s"]["a"],
             r["tokens_per_s"]["b"], r["overrun_steps"]]
            for r in rows
        ],
    )  # fmt: skip
    print(table)
    if not a.no_write:
        doc = {
            **result_header("quota"),
            "parameters": {"profile": a.profile, "steps": a.steps, "batch": a.batch, "model": SPEC.__repr__()},
            "emulated": "the accelerator: steps padded to the profile's time for the real model's layers and batch",
            "rows": rows,
        }
        md = (
            "# Compute quotas on a shared worker\n\n"
            f"`python -m bench.quota --profile {a.profile} --steps {a.steps} --batch {a.batch}` at commit "
            f"{doc['commit']}. Two instances on one engine thread, each holding {a.batch} decoding requests, "
            "on an emulated device (steps padded to the profile); share = instance a's part of the steps, "
            "of the device time (its steps, padding included) and of the generated tokens.\n\n" + table
        )
        for path in write_result("quota", doc, md):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
