"""The `cascade` command line: help everywhere, model creation, talking to a mesh (or to
nothing) over a real nats-server, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from nats.aio.msg import Msg

from cascade import cli
from cascade.cli.statusview import render
from cascade.cli.tapformat import format_message
from cascade.messages import Heartbeat, ScaleAck, ScaleDecision, ServiceStatus, encode
from cascade.models.checkpoint import Checkpoint
from cascade.natsutil import MeshStatus, connect
from cascade.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    [],
    ["gateway"],
    ["scaler"],
    ["loader"],
    ["worker"],
    ["up"],
    ["model"],
    ["model", "create"],
    ["model", "pull"],
    ["status"],
    ["tap"],
    ["scale"],
    ["deploy"],
    ["bench"],
    ["sim"],
    ["place"],
    ["apply"],
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A CASCADE_HOME of its own, and no mesh settings leaking in from the environment."""
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    for var in ("CASCADE_NATS_URL", "CASCADE_PREFIX", "CASCADE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    # cli.main configures structlog for the process; other test modules must not inherit that.
    saved = structlog.get_config()
    try:
        yield tmp_path
    finally:
        structlog.configure(**saved)


def run_cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m cascade.cli ...` in its own process (commands that run an event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "cascade.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cascade")
def test_help_everywhere(command: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cascade")
    assert "--help" in out


def test_service_help_shows_the_service_flags(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for service, flag in [
        ("gateway", "--port"),
        ("worker", "--worker-id"),
        ("scaler", "--ack-timeout-s"),
        ("loader", "--load-timeout-s"),
    ]:
        with pytest.raises(SystemExit):
            cli.main([service, "--help"])
        out = capsys.readouterr().out
        assert flag in out and "--nats-url" in out, service


def test_entry_point_runs_as_a_module(home: Path) -> None:
    r = run_cli(home, "--help")
    assert r.returncode == 0, r.stderr
    assert "cascade up" in r.stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["model", "create", "m", "--layers", "abc"], "'abc' is not an integer"),
        (["model", "create", "m", "--layers", "2"], "the following arguments are required"),
        (["scale", "m"], "--replicas"),
        (["scale", "m", "--replicas", "-1"], "must not be negative"),
        (["up", "--workers", "0"], "must be at least 1"),
        (["status", "--timeout", "0"], "must be above 0"),
        (["loader", "--idle-wait-s", "soon"], "'soon' is not a number"),
        (["deploy", "m", "--knob", "base_batch"], "'base_batch' is not NAME=VALUE"),
        (["deploy", "m", "--knob", "base_batch=big"], "knob base_batch: 'big' is not a number"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(
    argv: list[str], needle: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert needle in line and "error:" in line and "--help" in line


def test_up_refuses_more_replicas_than_workers_before_starting_anything(home: Path) -> None:
    r = run_cli(home, "up", "--workers", "1", "--replicas", "2", "--port", "0")
    assert r.returncode == 1
    assert "needs 2 worker(s)" in one_line(r.stderr)
    assert not (home / "models").exists() and not (home / "mesh.json").exists()


def test_up_reports_a_model_it_cannot_find(home: Path) -> None:
    cfg = home / "deploy.toml"
    cfg.write_text('[[models]]\nname = "mine"\npath = "no/such/dir"\n')
    r = run_cli(home, "up", "--workers", "1", "--port", "0", "--config", str(cfg))
    assert r.returncode == 1
    assert "model mine: no model at" in one_line(r.stderr)


def test_up_beyond_loopback_without_an_api_key_warns_loudly(home: Path) -> None:
    """The warning comes before anything starts (here the model is missing, so `up` stops after it)."""
    cfg = home / "deploy.toml"
    cfg.write_text('[[models]]\nname = "mine"\npath = "no/such/dir"\n')
    argv = ["up", "--workers", "1", "--port", "0", "--config", str(cfg)]
    r = run_cli(home, *argv, "--host", "0.0.0.0")
    assert r.returncode == 1
    assert "WARNING" in r.stderr and "with no API key" in r.stderr and "--api-key" in r.stderr
    for quiet in (["--host", "0.0.0.0", "--api-key", "k"], ["--host", "127.0.0.1"], ["--host", "localhost"]):
        r = run_cli(home, *argv, *quiet)
        assert r.returncode == 1
        assert "WARNING" not in r.stderr and "model mine: no model at" in one_line(r.stderr)


def test_bad_deployment_file_is_a_clear_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--config", str(home / "missing.toml")]) == 1
    assert "cannot read deployment file" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- model create

SMALL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "320"]


def test_model_create_writes_a_loadable_model_and_refuses_to_overwrite(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["model", "create", "small", *SMALL, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    path = home / "models" / "small"
    assert f"created {path}" in out
    ck = Checkpoint(path)
    try:
        assert ck.config.num_hidden_layers == 2 and ck.config.hidden_size == 64
        assert ck.config.num_key_value_heads == 2 and ck.config.vocab_size == 320
        first = bytes(ck.raw("model.layers.0.self_attn.q_proj.weight"))
    finally:
        ck.close()

    assert cli.main(["model", "create", "small", *SMALL, "--seed", "4"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "already holds a model" in err and "--force" in err

    assert cli.main(["model", "create", "small", *SMALL, "--exist-ok"]) == 0
    assert "leaving it" in capsys.readouterr().out

    assert cli.main(["model", "create", "small", *SMALL, "--seed", "4", "--force"]) == 0
    ck = Checkpoint(path)
    try:
        assert bytes(ck.raw("model.layers.0.self_attn.q_proj.weight")) != first
    finally:
        ck.close()


def test_model_create_out_and_dtype(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "half"
    assert cli.main(["model", "create", "half", *SMALL, "--dtype", "float16", "--out", str(out)]) == 0
    ck = Checkpoint(out)
    try:
        assert ck.config.torch_dtype == "float16"
        assert ck.tensor("model.embed_tokens.weight").element_size() == 2
    finally:
        ck.close()


def test_model_create_rejects_impossible_shapes(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = ["--layers", "2", "--hidden", "63", "--heads", "4", "--kv-heads", "2", "--vocab", "320"]
    assert cli.main(["model", "create", "odd", *bad]) == 1
    assert "hidden must divide by heads" in one_line(capsys.readouterr().err)
    assert cli.main(["model", "create", "../escape", *SMALL]) == 1
    assert "model name" in one_line(capsys.readouterr().err)
    assert not (home / "models").exists()


# --------------------------------------------------------------------------- talking to a mesh


@pytest.mark.e2e
def test_status_with_no_mesh_is_a_clear_error(home: Path, nats_url: str, prefix: str) -> None:
    r = run_cli(home, "status", "--nats-url", nats_url, "--prefix", prefix, "--timeout", "0.3")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"no Cascade service answered on '{prefix}.status'" in line
    assert f"NATS at {nats_url} is up" in line


def test_status_with_no_broker_is_a_clear_error(home: Path) -> None:
    from cascade.cli.embedded_nats import free_port

    r = run_cli(home, "status", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "cannot reach NATS" in one_line(r.stderr)


@pytest.mark.e2e
def test_scale_with_no_scaler_is_a_clear_error(home: Path, nats_url: str, prefix: str) -> None:
    r = run_cli(home, "scale", "m", "--replicas", "2", "--nats-url", nats_url, "--prefix", prefix, "--timeout", "0.5")
    assert r.returncode == 1
    assert "no scaler answered" in one_line(r.stderr)


def hb(worker: str, state: str, units: int) -> Heartbeat:
    return Heartbeat(
        worker_id=worker,
        state=state,  # type: ignore[arg-type]
        model="m",
        units_ready=units,
        num_units=6,
        running=3,
        waiting=1,
        max_batch=8,
        tokens_per_s=12.5,
        ready_seq=units,
        pid=4242,
        host="h",
    )


@pytest.mark.e2e
async def test_status_gathers_every_answer(home: Path, nats_url: str, subjects: Subjects) -> None:
    """Two services answer the scatter-gather; `status --json` and the table show both."""
    nc = await connect(nats_url, "test-status-services")
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(encode(ServiceStatus("scaler", "s1", 11, {"targets": {"m": 2}})))
            w = hb("w1", "loading", 2)
            detail = {k: getattr(w, k) for k in ("state", "model", "units_ready", "num_units", "running", "waiting")}
            await msg.respond(encode(ServiceStatus("worker", "w1", 12, {**detail, "max_batch": 8})))

        await nc.subscribe(subjects.status(), cb=answer)
        await nc.flush()
        base = ["--nats-url", nats_url, "--prefix", subjects.prefix, "--timeout", "0.5"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cascade.cli",
            "status",
            "--json",
            *base,
            cwd=ROOT,
            env={**os.environ, "CASCADE_HOME": str(home)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        data = json.loads(out)
        assert data["prefix"] == subjects.prefix
        assert [(s["service"], s["instance"]) for s in data["services"]] == [("scaler", "s1"), ("worker", "w1")]
        (inst,) = data["instances"]
        assert inst["worker_id"] == "w1" and inst["state"] == "loading" and inst["units_ready"] == 2
        assert inst["load"] == pytest.approx(3 / 8)
    finally:
        await nc.drain()


def test_status_table_shows_a_progress_bar_while_loading() -> None:
    st = MeshStatus(
        services=[ServiceStatus("worker", "w1", 12, {}), ServiceStatus("gateway", "g", 10, {"accepting": True})],
        heartbeats={"w1": hb("w1", "loading", 3), "w2": hb("w2", "serving", 6)},
    )
    text = render(st, "nats://x:1", "cascade")
    assert "[######......] 3/6" in text
    assert "accepting=True" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith(("w1", "w2"))}
    assert "loading" in lines["w1"] and "3/1" in lines["w1"] and "38%" in lines["w1"]
    assert "6/6" in lines["w2"] and "serving" in lines["w2"]
    assert "host-memory caches" not in text  # no worker has one
    assert "tokens/s now (last 5 s): m 25.0" in text  # both instances' current figures, summed per model


def test_status_table_shows_each_workers_own_cache() -> None:
    cache = {"budget_mb": 2000.0, "used_mb": 27.5, "models": [{"model": "tiny", "path": "/m", "mb": 27.5}],
             "hits": 2, "misses": 1, "evicted": 0, "copy_mb_s": 0.0}  # fmt: skip
    st = MeshStatus(services=[ServiceStatus("worker", "w1", 12, {"local_cache": cache})], heartbeats={})
    text = render(st, "nats://x:1", "cascade")
    assert "host-memory caches" in text
    (row,) = [ln for ln in text.splitlines() if ln.startswith("w1") and "tiny" in ln]
    assert "27.5 MB/2.0 GB" in row and row.split()[-4:] == ["tiny", "2", "1", "0"]


@pytest.mark.e2e
async def test_tap_prints_one_readable_line_per_message(home: Path, nats_url: str, subjects: Subjects) -> None:
    nc = await connect(nats_url, "test-tap-publisher")
    procs = []
    try:
        for raw in (False, True):
            extra = ["--raw"] if raw else []
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cascade.cli",
                "tap",
                "--count",
                "3",
                "--nats-url",
                nats_url,
                "--prefix",
                subjects.prefix,
                *extra,
                cwd=ROOT,
                env={**os.environ, "CASCADE_HOME": str(home)},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stderr is not None
            # tap says so once it is subscribed: only then is publishing sure to reach it.
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert b"tapping " + subjects.all().encode() in line
            await nc.publish(subjects.heartbeat("w1"), encode(hb("w1", "serving", 6)))
            await nc.publish(subjects.scale_decision(), encode(ScaleDecision("d1", "m", "up", 2, 3, "below target")))
            await nc.publish(subjects.scale_ack(), encode(ScaleAck("d1", "m", False, [], "no idle worker")))
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0
            lines = out.decode().splitlines()
            assert len(lines) == 3
            if raw:
                assert json.loads(lines[0].split(" ", 2)[2])["type"] == "heartbeat"
            else:
                assert f"{subjects.heartbeat('w1')} heartbeat w1 serving model=m units=6/6" in lines[0]
                assert "scale_decision d1 m up 2 -> target 3" in lines[1]
                assert "scale_ack d1 m FAILED" in lines[2] and "no idle worker" in lines[2]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await nc.drain()


def test_tap_line_for_a_foreign_payload() -> None:
    line = format_message("cascade.x", b"hello", now=0.0)
    assert "cascade.x ?? 5 bytes, not a Cascade message" in line


# --------------------------------------------------------------------------- bench


def test_bench_lists_and_refuses_unknown(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench"]) == 0
    assert capsys.readouterr().out.startswith("benchmarks:")
    assert cli.main(["bench", "no_such_bench"]) == 1
    assert "no benchmark 'no_such_bench'" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- sim


def test_sim_runs_a_small_scenario(home: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["sim", "--system", "cascade", "--accelerators", "8", "--duration", "30", "--json", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "SLO" in text and "events per CPU second" in text
    doc = json.loads(out.read_text())
    assert doc["summary"]["requests"] > 0 and doc["info"]["instances"] == 8
    assert doc["commit"] and doc["machine"]["cores"] > 0
    assert cli.main(["sim", "--accelerators", "12"]) == 1  # not whole hosts of 8
    assert "whole hosts" in one_line(capsys.readouterr().err)
