"""`cascade apply PLAN`: make a running mesh hold what a placement plan (`cascade place --out`)
says: each model's instances and stages through the scaler (they become its floor and target,
so no policy releases below the plan), then each instance's quota on the shared workers it was
placed on (docs/placement.md)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from cascade.cli.common import CliError, add_mesh_flags, connect_to_mesh, mesh_address
from cascade.cli.statusview import instances
from cascade.cliargs import positive_float
from cascade.config import ConfigError
from cascade.messages import ApplyPlan, PlanApplied, PlannedModel, QuotaSet, RemoteError, SetQuota
from cascade.natsutil import RequestTimeout, gather_status, request
from cascade.planapply import (
    MeshSlot,
    PlanTargets,
    binding,
    mesh_slots,
    pool_problem,
    progress,
    quota_orders,
    read_plan,
)
from cascade.subjects import Subjects


def register(sub: Any) -> None:
    p = sub.add_parser(
        "apply",
        help="make the running mesh hold a placement plan (instances, stages, quotas)",
        description="Apply a plan file written by `cascade place --out`: each model's planned instances of S stages "
        "become its min_replicas and target at the scaler (the loader places them on idle workers, each "
        "instance's stages on distinct devices), then each instance on a shared worker gets its group's quota. "
        "Applying the same plan again changes nothing. Refused, with why, when the pool cannot hold the plan.",
    )
    p.add_argument("plan", type=Path, help="plan file (JSON, `cascade place --out FILE`)")
    p.add_argument("--wait", type=positive_float, default=300.0, help="seconds to wait for the instances to serve")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for each answer")
    p.add_argument("--window", type=positive_float, default=1.0, help="seconds each look at the mesh listens")
    add_mesh_flags(p)
    p.set_defaults(func=cmd_apply)


def load_plan(path: Path) -> PlanTargets:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as e:
        raise CliError(f"cannot read plan {path}: {e.strerror}") from None
    except orjson.JSONDecodeError as e:
        raise CliError(f"plan {path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CliError(f"plan {path} must be a JSON object")
    try:
        return read_plan(data)
    except ConfigError as e:
        raise CliError(f"plan {path}: {e}") from None


def cmd_apply(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    url, prefix = mesh_address(args)
    subjects = Subjects(prefix)

    async def look(nc: Any, window: float) -> tuple[list[MeshSlot], set[str]]:
        st = await gather_status(nc, subjects, window, requester="cascade-apply")
        return mesh_slots(instances(st)), {s.service for s in st.services}

    async def go() -> int:
        nc = await connect_to_mesh(url, "cascade-apply")
        try:
            slots, services = await look(nc, args.window)
            if "scaler" not in services:
                raise CliError(f"no scaler answered on '{prefix}' (is the mesh running?)")
            problem = pool_problem(plan, slots)
            if problem:
                raise CliError(f"the pool cannot hold this plan: {problem}")
            targets = plan.targets()
            req = ApplyPlan([PlannedModel(m, n, s) for m, (n, s) in sorted(targets.items())], str(args.plan))
            try:
                reply = await request(nc, subjects.scale_apply(), req, PlanApplied, args.timeout)
            except RemoteError as e:
                raise CliError(f"the scaler refused the plan: {e.message}") from None
            except RequestTimeout:
                raise CliError(f"no scaler answered within {args.timeout:g}s") from None
            for line in reply.lines:
                print(f"scaler: {line}", flush=True)
            slots = await wait_serving(nc, look, plan, args)
            await set_quotas(nc, subjects, look, plan, slots, args)
            slots, _ = await look(nc, args.window)
            lines, warnings = binding(plan, slots)
            for line in lines:
                print(f"placed: {line}")
            for w in warnings:
                print(f"warning: {w}")
            print("plan applied" if reply.changed else "plan applied: nothing changed")
            return 0
        finally:
            await nc.drain()

    return asyncio.run(go())


async def wait_serving(nc: Any, look: Any, plan: PlanTargets, args: argparse.Namespace) -> list[MeshSlot]:
    """Until every planned model has exactly its planned instances serving (progress printed as it
    changes); CliError with what is missing past `--wait`."""
    deadline = time.monotonic() + args.wait
    shown: dict[str, tuple[int, int]] = {}
    while True:
        slots, _ = await look(nc, min(args.window, 0.5))
        now = progress(plan, slots)
        for m, (have, want) in now.items():
            if shown.get(m) != (have, want):
                stages = plan.targets()[m][1]
                print(f"{m}: {have}/{want} instance(s) of {stages} stage(s) serving", flush=True)
        shown = now
        if all(have == want for have, want in now.values()):
            return slots
        if time.monotonic() > deadline:
            missing = ", ".join(f"{m} {h}/{w}" for m, (h, w) in now.items() if h != w)
            raise CliError(
                f"the instances did not all serve within {args.wait:g}s ({missing}); the scaler keeps the "
                "targets and goes on trying (`cascade status`, `cascade tap` show why)"
            )


async def set_quotas(
    nc: Any, subjects: Subjects, look: Any, plan: PlanTargets, slots: list[MeshSlot], args: argparse.Namespace
) -> None:
    """Each planned instance on a shared worker to its group's quota; then until the heartbeats
    show them. Nothing is sent for quotas already as planned."""
    orders = quota_orders(plan, slots)
    if not orders:
        print("quotas: as planned", flush=True)
        return
    for o in orders:
        try:
            r = await request(
                nc,
                subjects.quota(o.worker),
                SetQuota(o.quota, reason=f"plan {args.plan.name}, group {o.group}"),
                QuotaSet,
                args.timeout,
            )
        except (RemoteError, RequestTimeout) as e:
            raise CliError(f"worker {o.worker} did not take quota {o.quota:g} for {o.model}: {e}") from None
        print(f"quota: {o.model} on {o.worker} ({r.device}): {o.was:g} -> {r.quota:g}", flush=True)
    deadline = time.monotonic() + args.wait
    while quota_orders(plan, slots):
        if time.monotonic() > deadline:
            raise CliError("the heartbeats do not show the quotas set")
        slots, _ = await look(nc, min(args.window, 0.5))
