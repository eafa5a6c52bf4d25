"""Workers that cannot see the model store reach serving from the data plane alone.

`cascade up --workers 1` and a scale to one: that worker reads the model from disk (nothing holds
it yet) and leaves the one host copy. Two more workers, on 127.0.0.2 and 127.0.0.3, each run in a
mount namespace where the model folder is an empty tmpfs (where the test can make one; else with
`--model-source network`): they get config, tokenizer and weights over the data plane, first from
the serving worker (a chain through both), then, after a scale to zero, from the host cache, then
one from the other; every instance answers the greedy tokens of the worker that read the disk.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cascade.config import GenerateSpec
from cascade.models.generate import generate_model
from cascade.natsauth import read_mesh_credentials
from services.gateway.testing import parse_prometheus
from tests import hf_fixtures
from tests.meshproc import cli, mesh_status, running_mesh
from tests.workerprocs import WorkerProcs

pytestmark = pytest.mark.e2e

MODEL = "diskless-e2e"
DISKLESS = {"d2": "127.0.0.2", "d3": "127.0.0.3"}


# Files a diskless worker must get over the network besides config.json: a real tokenizer as
# transformers saves one, with its chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _deployment(path: Path) -> str:
    return f"""
[[models]]
name = "{MODEL}"
path = "{path}"
min_replicas = 0
max_replicas = 3
policy = "manual"
loading = "multicast"
"""


def _model(root: Path) -> Path:
    """A small random model with a real byte-level BPE tokenizer (and chat template) beside it."""
    d = root / "models" / MODEL
    generate_model(d, GenerateSpec(layers=4, hidden=128, heads=4, kv_heads=2, vocab=704, seed=17))
    tok = hf_fixtures.build(hf_fixtures.SMOLLM2, root / "tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(tok / name, d / name)
    return d


def _namespaces_usable(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    script = 'mount -t tmpfs none "$0" && test -z "$(ls -A "$0")"'
    r = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, str(folder)],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def _wait(home: Path, what: str, ok: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = mesh_status(home)
        if ok(st):
            return st
        assert time.monotonic() < deadline, f"{what}: {st['instances']}\n{st.get('transfers')}"
        time.sleep(0.2)  # polling status with a deadline


def _done_loads(st: dict[str, Any], worker: str) -> int:
    """Finished transfers to `worker` in the status (the loader records one after the worker
    serves, so a status can show it serving before the record is there)."""
    return sum(1 for t in st["transfers"] if t["worker"] == worker and t["state"] == "done")


def _serving(st: dict[str, Any]) -> set[str]:
    return {
        i["worker_id"]
        for i in st["instances"]
        if i["model"] == MODEL and i["state"] == "serving" and i["units_ready"] == i["num_units"]
    }


def _complete(client: openai.OpenAI) -> str:
    r = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return r.choices[0].text


def _served_by(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        samples = parse_prometheus(r.read().decode())
    out: dict[str, float] = {}
    for lab, v in samples.get("cascade:request_success_total", []):
        out[lab["worker"]] = out.get(lab["worker"], 0.0) + v
    return out


def _answers_everywhere(client: openai.OpenAI, url: str, workers: set[str], reference: str) -> None:
    """Requests in parallel until every one of `workers` has answered some; every answer the same."""
    before = _served_by(url)
    deadline = time.monotonic() + 120
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while True:
            outs = set(pool.map(lambda _: _complete(client), range(12)))
            assert outs == {reference}, f"an instance answers differently: {outs} vs {reference!r}"
            now = _served_by(url)
            if all(now.get(w, 0) > before.get(w, 0) for w in workers):
                return
            assert time.monotonic() < deadline, f"not every instance served: {before} -> {now}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    model_dir = _model(home)
    with running_mesh(home, _deployment(model_dir), workers=1) as m:
        yield {**m, "model_dir": model_dir}


def test_diskless_workers_serve_from_a_peer_and_from_the_host_cache(mesh: dict[str, Any], tmp_path: Path) -> None:
    home, url, model_dir = mesh["home"], mesh["url"], mesh["model_dir"]
    r = cli(home, "scale", MODEL, "--replicas", "1")
    assert r.returncode == 0, r.stderr
    # Serving and its transfer's record come from different services' status: wait for both.
    st = _wait(
        home,
        "the first instance serves and its load is recorded",
        lambda s: len(_serving(s)) == 1 and any(t["worker"] in _serving(s) for t in s["transfers"]),
    )
    (w0,) = _serving(st)
    assert [t["source"] for t in st["transfers"] if t["worker"] == w0][-1] == "disk"
    assert (model_dir / "config.json").is_file()
    client = openai.OpenAI(base_url=url, api_key="unused")
    reference = _complete(client)
    _wait(home, "the host cache holds the model", lambda s: any(c["model"] == MODEL for c in s["host_cache"]))

    hidden = _namespaces_usable(model_dir)
    info = mesh["info"]
    procs = WorkerProcs(info["nats_url"], info.get("prefix") or "cascade", tmp_path)
    found = read_mesh_credentials(home)
    creds = found[1].env() if found else {}
    try:
        for wid, addr in DISKLESS.items():
            flags = ["--stage-host", addr, "--files-dir", str(tmp_path / f"files-{wid}"), "--heartbeat-s", "0.5"]
            wrap: list[str] = []
            if hidden:
                # The model folder is an empty tmpfs for this worker: it sees none of the loader's files.
                wrap = ["unshare", "--mount", "--map-root-user", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"']
                wrap.append(str(model_dir))
            if wid == "d3" or not hidden:
                flags += ["--model-source", "network"]
            procs.start(wid, *flags, wrap=wrap, env=creds)
        _wait(home, "the diskless workers join", lambda s: DISKLESS.keys() <= {i["worker_id"] for i in s["instances"]})

        # From a peer: the serving worker heads a chain w0 -> d -> d.
        r = cli(home, "scale", MODEL, "--replicas", "3")
        assert r.returncode == 0, r.stderr
        st = _wait(
            home,
            "three instances serve",
            lambda s: _serving(s) == {w0, *DISKLESS} and all(_done_loads(s, w) >= 1 for w in DISKLESS),
        )
        got = {t["worker"]: t for t in st["transfers"] if t["worker"] in DISKLESS}
        assert all(t["state"] == "done" for t in got.values()), got
        assert {t["source"] for t in got.values()} == {w0}, got
        _answers_everywhere(client, url, set(DISKLESS), reference)

        # From the host cache: nothing holds the model after a scale to zero.
        r = cli(home, "scale", MODEL, "--replicas", "0")
        assert r.returncode == 0, r.stderr
        _wait(home, "every instance unloads", lambda s: not _serving(s))
        r = cli(home, "scale", MODEL, "--replicas", "3")
        assert r.returncode == 0, r.stderr
        st = _wait(
            home,
            "three instances serve again",
            lambda s: _serving(s) == {w0, *DISKLESS} and all(_done_loads(s, w) >= 2 for w in DISKLESS),
        )
        (loader,) = [s for s in st["services"] if s["service"] == "loader"]
        assert loader["detail"]["replans"] == 0
        _answers_everywhere(client, url, set(DISKLESS), reference)
        last = {t["worker"]: t["source"] for t in st["transfers"]}
        assert "host-cache" in last.values() and "disk" not in [last[w] for w in DISKLESS], st["transfers"]

        # From a diskless peer: d2 alone serves (the loader takes idle workers by id), then d3 gets
        # the model from it, config and tokenizer being the files d2 itself received.
        r = cli(home, "scale", MODEL, "--replicas", "0")
        assert r.returncode == 0, r.stderr
        _wait(home, "every instance unloads again", lambda s: not _serving(s))
        for n, want in ((1, {"d2"}), (2, {"d2", "d3"})):
            r = cli(home, "scale", MODEL, "--replicas", str(n))
            assert r.returncode == 0, r.stderr
            st = _wait(
                home,
                f"{want} serve",
                lambda s, want=want: _serving(s) == want and all(_done_loads(s, w) >= 3 for w in want),
            )
        last = {t["worker"]: t["source"] for t in st["transfers"]}
        assert last["d3"] == "d2", st["transfers"]
        _answers_everywhere(client, url, {"d3"}, reference)
    finally:
        procs.stop_all()
    for wid in DISKLESS:
        log = procs.log(wid)
        # Three times each: the serving worker's chain, the host cache's, then d2 from the cache, d3 from d2.
        assert log.count("model_files_received") == 3, log[-3000:]
        assert "load_failed" not in log
        if hidden or wid == "d3":
            assert "model_files_expected" in log
        # What it built its tokenizer from: the store's own files, byte for byte.
        (received,) = (tmp_path / f"files-{wid}").iterdir()
        for name in ("config.json", *TOKENIZER_FILES):
            assert (received / name).read_bytes() == (model_dir / name).read_bytes(), name
