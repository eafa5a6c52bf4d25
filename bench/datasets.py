"""The prompts of a `cascade bench serve` run in `vllm bench serve`'s terms: `--dataset-name
random | sharegpt | custom` with vLLM's length options, so a command line written for vLLM runs
here and its requests have the same shape (input and output lengths).

- random: `--random-input-len` prompt tokens drawn at random from the vocabulary (special tokens
  left out), sent as token ids so the length is exact, and `--random-output-len` output tokens;
  `--random-range-ratio r` draws each length uniformly from [len·(1−r), len·(1+r)], as vLLM does;
  `--random-prefix-len` tokens shared by every prompt in front.
- sharegpt: ShareGPT's JSON (a list of {"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", ...}]}): the first human turn is the prompt and the reply's length in tokens
  the output length (or `--sharegpt-output-len`), with vLLM's filter (prompt or reply under 4
  tokens, prompt over 1024 or both over 2048 are skipped).
- custom: JSON Lines, one {"prompt": ...} per line, `--custom-output-len` tokens each.

Requests that ask for their output length run with `ignore_eos`, as vLLM's benchmark does, so
the output lengths are the ones asked for.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.models.tokenizer import Tokenizer

DATASETS = ("random", "sharegpt", "custom")


class DatasetError(ValueError):
    """The dataset options or file cannot give the requests asked for."""


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (an OpenAI completion prompt may be either)
    prompt_len: int
    output_len: int


def add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--dataset-name",
        choices=DATASETS,
        default=None,
        help="where the prompts come from (default: the built-in prompt, --max-tokens each)",
    )
    group.add_argument("--dataset-path", default=None, help="the sharegpt JSON or custom JSON Lines file")
    group.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens (default 1024)")
    group.add_argument("--random-output-len", type=int, default=128, help="random: output tokens (default 128)")
    group.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random: each length drawn uniformly from [len*(1-r), len*(1+r)] (default 0: exact)",
    )
    group.add_argument(
        "--random-prefix-len", type=int, default=0, help="random: tokens shared by every prompt in front (default 0)"
    )
    group.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="sharegpt: output tokens of every request (default: the length of the conversation's reply)",
    )
    group.add_argument("--custom-output-len", type=int, default=256, help="custom: output tokens (default 256)")
    group.add_argument(
        "--tokenizer",
        default=None,
        help="folder with the model's tokenizer files, for the dataset's lengths (default: the --model's own; "
        "needed with --base-url and a dataset)",
    )


def load(a: argparse.Namespace, n: int, tok: Tokenizer, vocab_size: int) -> list[BenchRequest]:
    """`n` requests of the dataset `a.dataset_name`, reproducible from `a.seed`."""
    rng = random.Random(a.seed)
    if a.dataset_name == "random":
        return random_requests(
            n, tok, vocab_size, a.random_input_len, a.random_output_len, a.random_range_ratio, a.random_prefix_len, rng
        )
    if not a.dataset_path:
        raise DatasetError(f"--dataset-name {a.dataset_name} needs --dataset-path")
    path = Path(a.dataset_path)
    if not path.is_file():
        raise DatasetError(f"--dataset-path {path}: no such file")
    if a.dataset_name == "sharegpt":
        return sharegpt_requests(path, n, tok, a.sharegpt_output_len, rng)
    return custom_requests(path, n, tok, a.custom_output_len, rng)


def _bounds(length: int, ratio: float) -> tuple[int, int]:
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def random_requests(
    n: int,
    tok: Tokenizer,
    vocab_size: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    rng: random.Random,
) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1 or prefix_len < 0:
        raise DatasetError("--random-input-len and --random-output-len must be at least 1, --random-prefix-len 0+")
    if not 0 <= range_ratio < 1:
        raise DatasetError("--random-range-ratio must lie in [0, 1)")
    allowed = [i for i in range(vocab_size) if i not in tok.special_ids]
    if not allowed:
        raise DatasetError("the vocabulary has no ordinary tokens to draw prompts from")
    prefix = [rng.choice(allowed) for _ in range(prefix_len)]
    lo_in, hi_in = _bounds(input_len, range_ratio)
    lo_out, hi_out = _bounds(output_len, range_ratio)
    out = []
    for _ in range(n):
        body = [rng.choice(allowed) for _ in range(rng.randint(lo_in, hi_in))]
        # BOS as the model's own tokenizer puts it in front of a text prompt: a token-id prompt is
        # taken as given, so without it the model would see an input no user sends.
        bos = [tok.bos_id] if tok.bos_id is not None and tok.encode("a")[:1] == [tok.bos_id] else []
        ids = bos + prefix + body
        out.append(BenchRequest(ids, len(ids), rng.randint(lo_out, hi_out)))
    return out


def sharegpt_requests(
    path: Path, n: int, tok: Tokenizer, fixed_output: int | None, rng: random.Random
) -> list[BenchRequest]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not ShareGPT JSON ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: ShareGPT JSON is a list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict)):
            continue
        if isinstance(first.get("value"), str) and isinstance(reply.get("value"), str):
            pairs.append((first["value"], reply["value"]))
    rng.shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(out) == n:
            break
        p_len = len(tok.encode(prompt))
        o_len = fixed_output if fixed_output is not None else len(tok.encode(reply, add_special_tokens=False))
        # vLLM's filter: too short to measure, or too long for the models it benchmarks.
        if p_len < 4 or (fixed_output is None and o_len < 4) or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(BenchRequest(prompt, p_len, o_len))
    if len(out) < n:
        raise DatasetError(f"{path}: {len(out)} usable conversations, {n} asked for (--num-prompts)")
    return out


def custom_requests(path: Path, n: int, tok: Tokenizer, output_len: int, rng: random.Random) -> list[BenchRequest]:
    prompts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DatasetError(f'{path}:{number}: each line is an object with a "prompt" string')
        prompts.append(row["prompt"])
    if len(prompts) < n:
        raise DatasetError(f"{path}: {len(prompts)} prompts, {n} asked for (--num-prompts)")
    rng.shuffle(prompts)
    return [BenchRequest(p, len(tok.encode(p)), output_len) for p in prompts[:n]]


def vocab_size(folder: Path) -> int:
    """The model's vocabulary size from its config.json (the text model's, for a multimodal one)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DatasetError(f"{folder} has no config.json to read the vocabulary size from (give --tokenizer)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise DatasetError(f"{cfg_path} has no vocab_size")
    return size
