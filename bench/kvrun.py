"""One measurement of `cascade bench kv`, run as its own process against one source tree.

Run as a script (`python bench/kvrun.py JSON`) with PYTHONPATH set to the tree under test: the
paged cache (this checkout) or the contiguous cache it replaced (the commit before it, extracted
by bench/kv.py). It uses only what both trees' engines have (`Engine(model, tok, max_batch=...,
kv_slots=...)`, `submit`, `step`, `has_work`), plus the paged engine's budget and prefix-caching
arguments when it has them, and prints one JSON line.

Modes:
- `capacity`: submit every request at once and run them all to the end; report the most
  sequences held at once, the KV bytes at that peak, and each request's tokens.
- `decode`: the same, and time the steps that only decode (every request admitted, none
  finished): generated tokens/s at that batch size.
- `prefix`: requests that share a system prompt, each submitted once the one before has its first
  token; report the prompt tokens prefilled and each request's tokens.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    from cascade.messages import SamplingParams
    from cascade.models.checkpoint import Checkpoint
    from cascade.models.tokenizer import load_tokenizer
    from services.worker.engine import Engine
    from services.worker.model import LlamaModel

    path = Path(spec["checkpoint"])
    ck = Checkpoint(path)
    model = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        model.load_unit(u, ck.unit_tensors(u))
    tok = load_tokenizer(path)
    kwargs: dict[str, Any] = {"max_batch": spec["max_batch"], "max_prefill_tokens": spec["max_prefill_tokens"]}
    params = inspect.signature(Engine.__init__).parameters
    paged = "kv_cache_bytes" in params
    if spec.get("kv_slots"):
        kwargs["kv_slots"] = spec["kv_slots"]
    if paged:
        kwargs["kv_cache_bytes"] = int(spec.get("kv_cache_bytes", 0))
        kwargs["prefix_caching"] = bool(spec.get("prefix_caching", True))
    eng = Engine(model, tok, **kwargs)
    requests: list[dict[str, Any]] = spec["requests"]

    def kv_bytes() -> int:
        if paged:
            return int(eng.kv_bytes_held())
        # The contiguous cache: what it holds is all it allocated (the baseline tree's private field).
        cache = getattr(eng, "_cache", None)
        return int(cache.nbytes()) if cache is not None else 0

    def submit(i: int) -> None:
        r = requests[i]
        eng.submit(f"r{i}", "bench", r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True))

    out: dict[str, list[int]] = {}
    finished: set[str] = set()
    peak_seqs = peak_bytes = 0
    decode_s = 0.0
    decode_tokens = 0
    decode_steps = 0
    t0 = time.perf_counter()
    mode = spec["mode"]
    if mode != "prefix":
        for i in range(len(requests)):
            submit(i)
    nxt = 0
    while True:
        if mode == "prefix" and nxt < len(requests) and (nxt == 0 or f"r{nxt - 1}" in out):
            submit(nxt)
            nxt += 1
        if not eng.has_work():
            if mode == "prefix" and nxt < len(requests):
                continue
            break
        before = len(eng.running)
        waiting = len(eng.waiting) + len(eng.prefilling) + len(getattr(eng, "_inbox", ()))
        s0 = time.perf_counter()
        res = eng.step()
        dt = time.perf_counter() - s0
        # A pure decode step at full batch: every request admitted, no prompt computed, none ended.
        pure = res.prefill_tokens == 0 and not waiting and before == len(requests) and res.decoded == before
        pure = pure and not any(ev.finish_reason for _, ev in res.events)
        if pure:
            decode_s += dt
            decode_tokens += res.decoded
            decode_steps += 1
        for _, ev in res.events:
            out.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason is not None:
                finished.add(ev.request_id)
        held = len(eng.running) + len(getattr(eng, "prefilling", ()))
        peak_seqs = max(peak_seqs, held)
        peak_bytes = max(peak_bytes, kv_bytes())
    wall = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "paged": paged,
        "peak_sequences": peak_seqs,
        "peak_kv_bytes": peak_bytes,
        "finished": len(finished),
        "wall_s": round(wall, 3),
        "decode_steps": decode_steps,
        "decode_tokens": decode_tokens,
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s > 0 else 0.0,
        "tokens": out,
    }
    if paged:
        st = eng.stats
        doc.update(
            prefilled=st.prefilled,
            preemptions=st.preemptions,
            kv_budget_bytes=eng.blocks.total * eng.geometry.bytes_per_block,
            blocks=eng.blocks.total,
            prefix_cache_queries=eng.blocks.prefix_queries,
            prefix_cache_hits=eng.blocks.prefix_hits,
        )
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
