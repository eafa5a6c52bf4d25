"""`cascade up`: the whole mesh on one machine, supervised.

Order of work, each step undone in reverse on the way out:
models on disk → broker → deployment file → children (gateway, scaler,
loader, workers) → wait until every service said `ServiceReady`, every model
serves on its min_replicas workers and the gateway's /health is 200 → mesh
file → wait for Ctrl-C / SIGTERM or a child dying → stop children (SIGTERM,
then SIGKILL after a grace period) → broker → mesh file removed.

Children are ordinary `python -m cascade.cli <service>` processes in their own
session (a terminal Ctrl-C reaches only this supervisor, which then stops them
in order) and, on Linux, with PR_SET_PDEATHSIG so that a supervisor killed
with SIGKILL does not leave them behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cascade.cliargs import non_negative_int, positive_float, positive_int
from cascade.config import (
    DEFAULT_NATS_PORT,
    ConfigError,
    Deployment,
    ModelDeployment,
    cascade_home,
    load_deployment,
    mesh_file,
    read_mesh_file,
    with_replicas,
    write_mesh_file,
)

SERVICE_ORDER = ("gateway", "scaler", "loader")


class UpError(Exception):
    """`cascade up` cannot go on; the message says what and where to look."""


# --------------------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes to start (default 2)")
    parser.add_argument(
        "--port", type=non_negative_int, default=8000, help="gateway HTTP port (default 8000; 0 picks a free one)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway HTTP address (default 127.0.0.1)")
    parser.add_argument(
        "--nats-url", default=None, help="use this NATS server instead of starting an embedded one on port 4222"
    )
    parser.add_argument(
        "--nats-port",
        type=non_negative_int,
        default=None,
        help="port of the embedded NATS server (default 4222 if free, else any free port; 0: any free port)",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("CASCADE_CONFIG") or None,
        help="deployment file, TOML (default: $CASCADE_CONFIG, else the built-in cascade-tiny model)",
    )
    parser.add_argument(
        "--replicas",
        type=non_negative_int,
        default=None,
        help="min replicas of every model (default: the deployment's min_replicas, 1 for the built-in model)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument(
        "--prefix",
        default=os.environ.get("CASCADE_PREFIX") or "cascade",
        help="subject prefix (default: $CASCADE_PREFIX, else 'cascade')",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CASCADE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level of the services (default: $CASCADE_LOG_LEVEL, else info)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds to wait for the mesh to come up (default 300)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=positive_float,
        default=15.0,
        help="seconds children get to stop after SIGTERM before SIGKILL (default 15)",
    )


# --------------------------------------------------------------------------- processes


def _make_die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to send `sig` to the child when this process dies (Linux
    only). Tools that start a whole `cascade up` (benchmarks, tests) pass SIGTERM, so that the
    supervisor still stops its children in order."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        # Own session: a terminal's Ctrl-C goes to the supervisor only, which stops children in order.
        os.setsid()
        # SIGKILL for the supervisor's children, not SIGTERM: this fires only when the supervisor itself
        # was killed, and then nobody is left to escalate a child that hangs on shutdown.
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died between fork and prctl
            os._exit(1)

    return preexec


def die_with_parent_preexec(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """For a process that starts `cascade up` itself: its mesh stops when that process dies."""
    return _make_die_with_parent(sig)


def _source_root() -> Path | None:
    """The checkout this package runs from, if any (so children find `services` without an install)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "services").is_dir() and (root / "pyproject.toml").is_file() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Child:
    name: str  # "gateway", "worker-0", ...
    service: str  # "gateway", "worker", ...
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    exited: asyncio.Task[int] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        data = path.read_bytes()[-8192:]
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join("    | " + line for line in text)


# --------------------------------------------------------------------------- readiness


@dataclass
class Readiness:
    """What has come up, from ServiceReady and heartbeats, keyed by pid so that another mesh on
    the same broker and prefix cannot be mistaken for ours."""

    deployment: Deployment
    ready_pids: set[int] = field(default_factory=set)
    beats: dict[int, Any] = field(default_factory=dict)  # pid → latest Heartbeat

    def serving(self, model: ModelDeployment, pids: set[int]) -> list[Any]:
        return [
            hb
            for pid, hb in self.beats.items()
            if pid in pids
            and hb.model == model.name
            and hb.state == "serving"
            and hb.num_units > 0
            and hb.units_ready == hb.num_units
        ]

    def missing(self, children: list[Child]) -> list[str]:
        """What is not up yet, in words (empty when everything is)."""
        out = [f"{c.name} (no ServiceReady yet)" for c in children if c.pid not in self.ready_pids]
        worker_pids = {c.pid for c in children if c.service == "worker" and c.pid is not None}
        for m in self.deployment.models:
            if m.min_replicas <= 0:
                continue
            have = self.serving(m, worker_pids)
            if len(have) < m.min_replicas:
                loading = [
                    f"{hb.worker_id} {hb.state} {hb.units_ready}/{hb.num_units}"
                    for pid, hb in sorted(self.beats.items())
                    if pid in worker_pids and hb.model == m.name and hb not in have
                ]
                extra = f"; {', '.join(loading)}" if loading else ""
                out.append(f"{m.name} (serving on {len(have)} of {m.min_replicas} workers{extra})")
        return out


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(
        self,
        args: argparse.Namespace,
        home: Path,
        deployment: Deployment,
        deployment_file: Path,
        nats_url: str,
        gateway_port: int,
        broker_pid: int | None,
    ) -> None:
        self.args = args
        self.home = home
        self.logs = home / "logs"
        self.deployment = deployment
        self.deployment_file = deployment_file
        self.nats_url = nats_url
        self.gateway_port = gateway_port
        self.broker_pid = broker_pid
        self.children: list[Child] = []
        self.readiness = Readiness(deployment)
        self.changed = asyncio.Event()
        self.stopping = False
        self._wrote_mesh = False
        self._last_worker_state: dict[int, tuple[str, str | None]] = {}
        self._preexec = _make_die_with_parent()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1"

    # ---- children ----------------------------------------------------------
    def _plan_children(self) -> None:
        a = self.args
        common = [
            "--nats-url",
            self.nats_url,
            "--prefix",
            a.prefix,
            "--config",
            str(self.deployment_file),
            "--log-level",
            a.log_level,
        ]
        specs: list[tuple[str, str, list[str]]] = [
            ("gateway", "gateway", ["--host", a.host, "--port", str(self.gateway_port), "--gateway-id", "gateway"]),
            ("scaler", "scaler", []),
            ("loader", "loader", []),
        ]
        specs += [
            (f"worker-{i}", "worker", ["--worker-id", f"worker-{i}", "--threads", str(a.threads)])
            for i in range(a.workers)
        ]
        for name, service, extra in specs:
            argv = [sys.executable, "-m", "cascade.cli", service, *common, *extra]
            self.children.append(Child(name, service, argv, self.logs / f"{name}.log"))

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CASCADE_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
        root = _source_root()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        return env

    async def start_children(self) -> None:
        self._plan_children()
        self.logs.mkdir(parents=True, exist_ok=True)
        env = self._child_env()
        for c in self.children:
            with self._open_log(c) as log:
                c.proc = await asyncio.create_subprocess_exec(
                    *c.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    preexec_fn=self._preexec,
                    start_new_session=self._preexec is None,  # the preexec does setsid itself
                )
            c.exited = asyncio.ensure_future(c.proc.wait())
            c.exited.add_done_callback(lambda _t: self.changed.set())
        names = ", ".join(c.name for c in self.children)
        print(f"started {names}; logs in {self.logs}/<name>.log", flush=True)

    @staticmethod
    def _open_log(c: Child) -> Any:
        # A fresh log per run: the previous run's lines would only mislead.
        return open(c.log_path, "wb")

    def died(self) -> Child | None:
        for c in self.children:
            if c.exited is not None and c.exited.done():
                return c
        return None

    def _died_error(self, c: Child) -> UpError:
        code = c.proc.returncode if c.proc else None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        tail = _tail(c.log_path)
        return UpError(f"{c.name} {how} (log: {c.log_path})" + (f"\n{tail}" if tail else ""))

    async def stop_children(self) -> None:
        """SIGTERM everyone, wait for the grace period, SIGKILL the rest. Safe to call twice."""
        self.stopping = True
        live = [c for c in self.children if c.running()]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                assert c.proc is not None
                c.proc.send_signal(signal.SIGTERM)
        waits = [c.exited for c in live if c.exited is not None]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=self.args.stop_timeout)
            if pending:
                stuck = [c for c in live if c.exited in pending]
                print(
                    f"cascade up: {', '.join(c.name for c in stuck)} did not stop within "
                    f"{self.args.stop_timeout:g}s; killing",
                    file=sys.stderr,
                    flush=True,
                )
                for c in stuck:
                    with contextlib.suppress(ProcessLookupError):
                        assert c.proc is not None
                        c.proc.kill()
                await asyncio.wait(pending)

    # ---- readiness ---------------------------------------------------------
    def _by_pid(self, pid: int) -> Child | None:
        for c in self.children:
            if c.pid == pid:
                return c
        return None

    def on_ready(self, msg: Any) -> None:
        if msg.pid in self.readiness.ready_pids:
            return
        self.readiness.ready_pids.add(msg.pid)
        c = self._by_pid(msg.pid)
        if c is not None:
            print(f"  ready: {c.name} (pid {msg.pid})", flush=True)
        self.changed.set()

    def on_heartbeat(self, hb: Any) -> None:
        self.readiness.beats[hb.pid] = hb
        c = self._by_pid(hb.pid)
        key = (hb.state, hb.model)
        if c is not None and self._last_worker_state.get(hb.pid) != key:
            self._last_worker_state[hb.pid] = key
            model = f" {hb.model}" if hb.model else ""
            print(f"  {c.name}: {hb.state}{model} ({hb.units_ready}/{hb.num_units} units)", flush=True)
        self.changed.set()

    async def wait_up(self, deadline: float, stop: asyncio.Event) -> bool:
        """True once everything is up; False if stopped by a signal. Raises UpError otherwise."""
        loop = asyncio.get_running_loop()
        while True:
            # Clear before looking, so a change that lands while we look wakes the next wait.
            self.changed.clear()
            if stop.is_set():
                return False
            dead = self.died()
            if dead is not None:
                raise self._died_error(dead)
            if not self.readiness.missing(self.children):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout_error(self.readiness.missing(self.children))
            await _wait_any(self.changed, stop, timeout=remaining)
        return await self._wait_health(deadline, stop)

    async def _wait_health(self, deadline: float, stop: asyncio.Event) -> bool:
        import aiohttp

        url = f"http://127.0.0.1:{self.gateway_port}/health"
        loop = asyncio.get_running_loop()
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            while True:
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return True
                        last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
                dead = self.died()
                if dead is not None:
                    raise self._died_error(dead)
                if loop.time() >= deadline:
                    raise self._timeout_error([f"gateway {url} ({last})"])
                # HTTP has no readiness event to await: poll with a deadline, waking early on a signal.
                if await _wait_any(stop, timeout=0.25):
                    return False

    def _timeout_error(self, missing: list[str]) -> UpError:
        return UpError(
            f"the mesh did not come up within {self.args.timeout:g}s; not up: {'; '.join(missing)}. Logs: {self.logs}"
        )

    # ---- mesh file ---------------------------------------------------------
    def write_mesh(self) -> Path:
        pids: dict[str, int | None] = {"up": os.getpid(), "nats": self.broker_pid}
        pids.update({c.name: c.pid for c in self.children})
        info = {
            "nats_url": self.nats_url,
            "gateway_url": self.gateway_url,
            "prefix": self.args.prefix,
            "pids": pids,
            "logs": str(self.logs),
            "deployment": str(self.deployment_file),
            "started": time.time(),
        }
        self._wrote_mesh = True
        return write_mesh_file(info, self.home)

    def remove_mesh(self) -> None:
        if not self._wrote_mesh:
            return
        info = read_mesh_file(self.home)
        # Remove only our own record: another `cascade up` may have replaced it meanwhile.
        if info and info.get("pids", {}).get("up") == os.getpid():
            mesh_file(self.home).unlink(missing_ok=True)


async def _wait_any(*events: asyncio.Event, timeout: float) -> bool:
    """Wait until any event is set or the timeout passes; True if one was set."""
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return bool(done)


async def _supervise(sup: Supervisor) -> int:
    from cascade.meshview import connect_bounded
    from cascade.messages import Heartbeat, MessageError, ServiceReady, decode
    from cascade.natsutil import stop_event
    from cascade.subjects import Subjects

    stop = stop_event()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + sup.args.timeout
    subjects = Subjects(sup.args.prefix)
    nc = None
    try:
        try:
            nc = await connect_bounded(sup.nats_url, "cascade-up", timeout_s=10.0)
        except ConnectionError as e:
            raise UpError(str(e)) from None

        async def on_ready(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                sup.on_ready(decode(msg.data, ServiceReady))

        async def on_beat(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                sup.on_heartbeat(decode(msg.data, Heartbeat))

        # Subscribe before any child exists, so no ServiceReady can be missed.
        await nc.subscribe(subjects.service_ready(), cb=on_ready)
        await nc.subscribe(subjects.heartbeat_all(), cb=on_beat)
        await nc.flush()

        await sup.start_children()
        if not await sup.wait_up(deadline, stop):
            print("cascade up: interrupted while starting; stopping", file=sys.stderr, flush=True)
            return 0
        path = sup.write_mesh()
        models = ", ".join(m.name for m in sup.deployment.models)
        print(f"\nCascade is up: {sup.gateway_url}", flush=True)
        print(f"  models: {models}; {sup.args.workers} worker(s); NATS {sup.nats_url}; prefix '{sup.args.prefix}'")
        print(f"  mesh recorded in {path}; `cascade status` and `cascade tap` find it there")
        print("  Ctrl-C stops everything", flush=True)

        while True:
            sup.changed.clear()
            dead = sup.died()
            if dead is not None:
                raise sup._died_error(dead)
            if stop.is_set():
                print("\ncascade up: stopping", flush=True)
                return 0
            await _wait_any(sup.changed, stop, timeout=3600)
    except UpError as e:
        print(f"cascade up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await sup.stop_children()
        sup.remove_mesh()


# --------------------------------------------------------------------------- models


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare_models(dep: Deployment) -> None:
    """Generate every model that has a generate spec and no files yet; check the others exist."""
    from cascade.models.config import CheckpointError

    for m in dep.models:
        if _holds_model(m.path):
            # Every header and tensor shape, not only config.json: a bad checkpoint stops `up` here
            # rather than failing in a worker mid-load.
            from cascade.models.checkpoint import validate_checkpoint

            try:
                validate_checkpoint(m.path)
            except (CheckpointError, OSError) as e:
                raise UpError(f"model {m.name}: {e}") from None
            continue
        if m.generate is None:
            raise UpError(
                f"model {m.name}: no model at {m.path} (needs config.json and *.safetensors), "
                "and the deployment has no generate spec for it"
            )
        from cascade.console import Progress
        from cascade.models.generate import generate_model

        print(f"generating model {m.name} in {m.path} (first run only)", flush=True)
        bar = Progress(f"  {m.name}", total=1)
        try:
            generate_model(m.path, m.generate, progress=bar.update)
        except (CheckpointError, OSError) as e:
            raise UpError(f"cannot generate model {m.name} in {m.path}: {e}") from None
        bar.done("generated")


# --------------------------------------------------------------------------- entry


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    # Until the event loop takes over signals, SIGTERM must unwind through the finally blocks
    # (stopping the broker) rather than end the process on the spot.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from cascade.embedded_nats import BrokerError, EmbeddedNats, port_is_free

    if args.nats_url and args.nats_port is not None:
        raise ConfigError("--nats-port sets the embedded broker's port; with --nats-url no broker is started")
    home = cascade_home()
    dep = load_deployment(Path(args.config) if args.config else None, home)
    if args.replicas is not None:
        dep = with_replicas(dep, args.replicas)
    needed = sum(m.min_replicas for m in dep.models)
    if needed > args.workers:
        raise ConfigError(
            f"the deployment needs {needed} worker(s) for its min_replicas but --workers is {args.workers}"
        )
    info = read_mesh_file(home)
    if info:
        pid = (info.get("pids") or {}).get("up")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            print(
                f"cascade up: a mesh is already running from {home} (pid {pid}, {info.get('gateway_url')}); "
                "stop it first, or set CASCADE_HOME to run another",
                file=sys.stderr,
            )
            return 1

    port = args.port
    if port == 0:
        from cascade.embedded_nats import free_port

        port = free_port()
    elif not port_is_free(port, "127.0.0.1" if args.host in ("127.0.0.1", "localhost") else args.host):
        print(f"cascade up: port {port} is in use; pass --port N (or --port 0 for a free one)", file=sys.stderr)
        return 1

    try:
        prepare_models(dep)
    except UpError as e:
        print(f"cascade up: {e}", file=sys.stderr)
        return 1

    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    deployment_file = home / "deployment.json"
    deployment_file.write_bytes(orjson.dumps(dep.to_json(), option=orjson.OPT_INDENT_2))

    broker: EmbeddedNats | None = None
    try:
        if args.nats_url:
            nats_url = args.nats_url
        else:
            if args.nats_port is None:
                nats_port = DEFAULT_NATS_PORT if port_is_free(DEFAULT_NATS_PORT) else None
            else:
                nats_port = args.nats_port or None  # 0 → EmbeddedNats picks a free port
            broker = EmbeddedNats(
                port=nats_port,
                log_file=home / "logs" / "nats.log",
                preexec_fn=_make_die_with_parent(),
            )
            try:
                broker.start()
            except BrokerError as e:
                print(f"cascade up: cannot start the embedded NATS server: {e}", file=sys.stderr)
                return 1
            nats_url = broker.url
            print(f"NATS broker at {nats_url} (log: {home / 'logs' / 'nats.log'})", flush=True)
        sup = Supervisor(
            args,
            home,
            dep,
            deployment_file,
            nats_url,
            port,
            broker.proc.pid if broker and broker.proc else None,
        )
        return asyncio.run(_supervise(sup))
    finally:
        if broker is not None:
            broker.stop()
