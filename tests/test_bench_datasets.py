"""`cascade bench serve --dataset-name ...`: vLLM's datasets give requests of the shapes asked for,
and a run against a real mesh sends them (token-id prompts of exact length, each its own
output length)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
import pytest

from bench import datasets
from bench.datasets import DatasetError
from bench.serve import parse, rate_mode
from cascade.models.tokenizer import ByteTokenizer


def test_a_dataset_selects_the_vllm_run() -> None:
    assert rate_mode(parse(["--dataset-name", "random"]))
    with pytest.raises(SystemExit):
        parse(["--dataset-name", "nope"])


def test_random_prompts_have_the_asked_lengths_and_no_special_tokens() -> None:
    tok = ByteTokenizer()
    reqs = datasets.random_requests(50, tok, 258, 32, 8, 0.0, 4, random.Random(1))
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list)
        # BOS first (the byte tokenizer puts it before every text prompt), then 4 + 32 drawn tokens.
        assert r.prompt[0] == tok.bos_id and r.prompt_len == len(r.prompt) == 1 + 4 + 32
        assert not set(r.prompt[1:]) & tok.special_ids
        assert r.output_len == 8
    # The shared prefix is shared; the rest differs.
    assert len({tuple(r.prompt[:5]) for r in reqs}) == 1 and len({tuple(r.prompt) for r in reqs}) == 50
    again = datasets.random_requests(50, tok, 258, 32, 8, 0.0, 4, random.Random(1))
    assert again == reqs


def test_random_range_ratio_spreads_lengths_within_bounds() -> None:
    reqs = datasets.random_requests(400, ByteTokenizer(), 258, 100, 50, 0.5, 0, random.Random(2))
    ins = [r.prompt_len - 1 for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and max(ins) - min(ins) > 60
    assert min(outs) >= 25 and max(outs) <= 75
    for bad in ((0, 8, 0.0), (8, 8, 1.0), (8, 8, -0.1)):
        with pytest.raises(DatasetError):
            datasets.random_requests(1, ByteTokenizer(), 258, bad[0], bad[1], bad[2], 0, random.Random(0))


def test_sharegpt_takes_first_turns_and_filters_as_vllm_does(tmp_path: Path) -> None:
    convs = [
        {"conversations": [{"from": "human", "value": "tell me a story please"}, {"from": "gpt", "value": "x" * 40}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a long enough reply"}]},
        {"conversations": [{"from": "human", "value": "what is two plus two?"}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "no conversations"},
        {"conversations": [{"from": "human", "value": "y" * 1500}, {"from": "gpt", "value": "too long a prompt"}]},
        {"conversations": [{"from": "human", "value": "second good prompt"}, {"from": "gpt", "value": "z" * 12}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    tok = ByteTokenizer()
    reqs = datasets.sharegpt_requests(path, 2, tok, None, random.Random(0))
    got = {(r.prompt, r.output_len) for r in reqs}
    assert got == {("tell me a story please", 40), ("second good prompt", 12)}
    assert all(r.prompt_len == len(tok.encode(str(r.prompt))) for r in reqs)
    # A fixed output length keeps replies too short to measure ("ok").
    fixed = datasets.sharegpt_requests(path, 3, tok, 16, random.Random(0))
    assert {r.output_len for r in fixed} == {16} and "what is two plus two?" in {r.prompt for r in fixed}
    with pytest.raises(DatasetError, match="2 usable conversations, 5 asked"):
        datasets.sharegpt_requests(path, 5, tok, None, random.Random(0))
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not ShareGPT JSON"):
        datasets.sharegpt_requests(path, 1, tok, None, random.Random(0))


def test_custom_reads_json_lines_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n{"prompt": "three"}\n')
    reqs = datasets.custom_requests(path, 3, ByteTokenizer(), 20, random.Random(0))
    assert sorted(str(r.prompt) for r in reqs) == ["one", "three", "two"] and {r.output_len for r in reqs} == {20}
    path.write_text('{"prompt": "one"}\n{"text": "two"}\n')
    with pytest.raises(DatasetError, match=r"prompts.jsonl:2: each line is an object"):
        datasets.custom_requests(path, 1, ByteTokenizer(), 20, random.Random(0))


def test_a_dataset_without_its_file_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.serve import main

    assert main(["--dataset-name", "sharegpt", "--num-prompts", "2", "--no-write"]) == 2
    assert "needs --dataset-path" in capsys.readouterr().err
    assert main(["--dataset-name", "custom", "--dataset-path", "/nonexistent/p.jsonl", "--no-write"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_random_dataset_run_sends_exact_lengths_through_the_mesh(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench.serve import main

    argv = [
        "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "6",
        "--num-prompts", "5", "--request-rate", "20", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", "random-run.json",
    ]  # fmt: skip
    assert main(argv) == 0
    # vLLM's --result-dir and --result-filename: the result goes there, not into bench/results.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random-run.json", "random-run.md"]
    assert orjson.loads((tmp_path / "random-run.json").read_bytes())["metrics"]["completed"] == 5
    out = capsys.readouterr().out
    # vLLM's table: every request succeeded; 5 prompts of BOS + 24 tokens in, 6 tokens out each.
    assert "Successful requests:" in out
    lines = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
    assert lines["Successful requests"] == "5"
    assert lines["Total input tokens"] == str(5 * 25)
    assert lines["Total generated tokens"] == str(5 * 6)
