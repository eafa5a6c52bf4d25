"""`cascade place`: choose groups, stage counts and which groups hold which models for a
deployment and a workload (AlpaServe's greedy placement, cascade/placement.py), scored by the
multi-model estimate in sim/multimodel.py, and print the plan (docs/placement.md)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

import orjson

from cascade.cli.common import CliError
from cascade.cliargs import positive_float, positive_int
from cascade.config import ConfigError, load_deployment
from cascade.placement import GB, ModelSpec, Plan, PoolSpec, Workload, model_spec, plan_json, workload_from_dict

DEFAULT_PROFILE = "llama2-7b-a100-80gb"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "place",
        help="plan which groups of workers hold which models, with how many pipeline stages",
        description="Plan a pool for several models (AlpaServe's greedy placement): cut the pool into groups of "
        "equal size, serve each model placed in a group as a pipeline of one stage per worker, and greedily add the "
        "(model, group) that most raises the SLO attainment simulated on the workload. Prints the groups, the "
        "stages per model and the predicted attainment. Per-model placement keys ([models.placement]: profile, "
        "layers, slo_ms) and the [pool] table in the deployment file are described in docs/placement.md.",
    )
    p.add_argument("--config", type=Path, required=True, help="deployment file (TOML or JSON) naming the models")
    p.add_argument(
        "--workload",
        type=Path,
        required=True,
        help="TOML or JSON: [rates] model = req/s, cv = inter-arrival CV (burstiness, 1 = Poisson), duration_s",
    )
    p.add_argument("--workers", type=positive_int, default=None, help="workers in the pool (default: [pool] workers)")
    p.add_argument(
        "--memory-gb",
        type=positive_float,
        default=None,
        help="GB of parameters each worker holds (default: [pool] memory_gb, else 40)",
    )
    p.add_argument(
        "--group-sizes",
        default="",
        help="comma-separated group sizes to try (default: every divisor of the pool size)",
    )
    p.add_argument(
        "--replication",
        action="store_true",
        help="plan the baseline instead: whole models, one per worker, replicas by popularity (selective replication)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the plan file (JSON) here")
    p.add_argument("--json", action="store_true", help="print the plan file (JSON) instead of a table")
    p.set_defaults(func=cmd_place)


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = orjson.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (orjson.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{what} {path} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise CliError(f"{what} {path} must be a table")
    return data


def specs_from_config(path: Path) -> tuple[list[ModelSpec], dict[str, Any]]:
    """The models of a deployment file with their placement keys, and its [pool] table."""
    dep = load_deployment(path)  # the same checks `cascade up` makes
    data = _read(path, "deployment file")
    tables = {str(t.get("name", "")): t for t in data.get("models", []) if isinstance(t, dict)}
    out = []
    for m in dep.models:
        pt = tables.get(m.name, {}).get("placement", {})
        if not isinstance(pt, dict):
            raise ConfigError(f"model {m.name}: placement must be a table")
        unknown = set(pt) - {"profile", "layers", "slo_ms", "slo_scale", "prompt_tokens", "output_tokens"}
        if unknown:
            raise ConfigError(f"model {m.name}: unknown placement keys {sorted(unknown)}")
        try:
            out.append(
                model_spec(
                    m.name,
                    str(pt.get("profile", DEFAULT_PROFILE)),
                    layers=int(pt.get("layers", 0)),
                    slo_ms=float(pt.get("slo_ms", 0.0)),
                    slo_scale=float(pt.get("slo_scale", 5.0)),
                    prompt_tokens=int(pt.get("prompt_tokens", 128)),
                    output_tokens=int(pt.get("output_tokens", 16)),
                )
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model {m.name}: bad placement value: {e}") from None
    pool = data.get("pool", {})
    if not isinstance(pool, dict):
        raise ConfigError("[pool] must be a table")
    return out, pool


def plan_for(
    models: list[ModelSpec], pool: PoolSpec, w: Workload, group_sizes: tuple[int, ...] | None, replication: bool
) -> Plan:
    from cascade.placement import place
    from sim.multimodel import scorer, workload_arrivals

    by_name = {m.name: m for m in models}
    missing = sorted(set(w.rates) - set(by_name))
    if missing:
        raise CliError(f"the workload names models the deployment does not have: {', '.join(missing)}")
    arrivals = workload_arrivals(w)
    if not arrivals:
        raise CliError("the workload has no requests (every rate is 0 or the duration too short)")
    score = scorer(by_name, pool, arrivals)
    if replication:
        return place(models, pool, score, group_sizes=(1,), max_models_per_group=1)
    return place(models, pool, score, group_sizes=group_sizes)


def cmd_place(args: argparse.Namespace) -> int:
    try:
        import sim.multimodel  # noqa: F401
    except ModuleNotFoundError:
        raise CliError("cascade place needs the simulator (run from a checkout)") from None
    models, pool_t = specs_from_config(args.config)
    w = workload_from_dict(_read(args.workload, "workload file"), str(args.workload))
    workers = args.workers or int(pool_t.get("workers", 0))
    if workers <= 0:
        raise CliError("say how many workers: --workers N or [pool] workers = N in the deployment file")
    memory_gb = args.memory_gb or float(pool_t.get("memory_gb", 40.0))
    pool = PoolSpec(workers=workers, memory_bytes=int(memory_gb * GB), hop_s=float(pool_t.get("hop_us", 50)) / 1e6)
    sizes: tuple[int, ...] | None = None
    if args.group_sizes:
        try:
            sizes = tuple(int(x) for x in args.group_sizes.split(",") if x.strip())
        except ValueError:
            raise CliError(f"--group-sizes must be comma-separated integers (got {args.group_sizes!r})") from None
        bad = [g for g in sizes if g < 1 or workers % g]
        if bad:
            raise CliError(f"group sizes {bad} do not divide the pool of {workers} workers")
    plan = plan_for(models, pool, w, sizes, args.replication)
    by_name = {m.name: m for m in models}
    doc = plan_json(plan, by_name, pool, w.rates)
    doc["workload"] = {"rates": w.rates, "cv": w.cv, "duration_s": w.duration_s, "seed": w.seed}
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"pool: {workers} workers x {memory_gb:g} GB; {len(plan.groups)} group(s) of {plan.group_size}")
    for g in doc["groups"]:
        print(f"  group {g['group']} [{', '.join(g['workers'])}]: {g['stages']} stage(s)")
        for m in g["models"]:
            layers = " | ".join(f"{s['worker']}:{s['layers'][0]}-{s['layers'][1]}" for s in m["stages"])
            quota = f"  (quota {m['quota']:g})" if len(g["models"]) > 1 else ""
            print(f"    {m['model']:<16} {layers}{quota}")
    unplaced = [m.name for m in models if not plan.models_in(m.name)]
    if unplaced:
        print(f"  not placed (no memory left, or placing them lowered attainment): {', '.join(unplaced)}")
    print(
        f"predicted SLO attainment: {100 * plan.attainment:.2f} % (rate {sum(w.rates.values()):g} req/s, cv {w.cv:g})"
    )
    by_size = plan.notes.get("attainment_by_group_size", {})
    if len(by_size) > 1:
        print("  by group size: " + ", ".join(f"{g}: {100 * a:.2f} %" for g, a in sorted(by_size.items())))
    return 0
