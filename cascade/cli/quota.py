"""`cascade quota`: an instance's compute quota on a shared worker (docs/pipelined-and-shared.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cascade.cli.common import CliError, add_mesh_flags, ask_typed
from cascade.cliargs import positive_float
from cascade.messages import QuotaSet, SetQuota
from cascade.subjects import check_token


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quota",
        help="set an instance's compute quota on a shared worker",
        description="Send SetQuota to WORKER (an instance id, as `cascade status` lists it): its share of the "
        "worker's engine steps relative to the other instances there, applied from the next step on. Prints "
        "the quota applied and every instance's quota and share on that worker.",
    )
    p.add_argument("worker", help="instance id on the shared worker (e.g. gpu0 or gpu0-2)")
    p.add_argument("quota", type=positive_float, help="the quota, a share above 0 (relative to the others there)")
    p.add_argument("--reason", default="operator", help="why, carried in the published QuotaSet")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the worker's answer")
    add_mesh_flags(p)
    p.set_defaults(func=cmd_quota)


def cmd_quota(args: argparse.Namespace) -> int:
    try:
        worker = check_token(args.worker)
    except ValueError as e:
        raise CliError(f"bad worker id: {e}") from None
    reply: QuotaSet = ask_typed(
        args, f"worker {worker}", lambda s: s.quota(worker), SetQuota(args.quota, reason=args.reason), QuotaSet
    )
    every = ", ".join(
        f"{w} {q:g} ({100 * q / sum(reply.quotas.values()):.0f}%)" for w, q in sorted(reply.quotas.items())
    )
    print(f"{reply.worker_id} on {reply.device}: quota {reply.quota:g}, {100 * reply.share:.0f}% under contention")
    print(f"  every instance there: {every}")
    return 0
