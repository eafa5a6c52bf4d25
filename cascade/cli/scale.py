"""`cascade scale`: how many replicas of a model the mesh keeps."""

from __future__ import annotations

import argparse
from typing import Any

from cascade.cli.common import add_mesh_flags, ask
from cascade.cliargs import non_negative_int, positive_float
from cascade.messages import ScaleRequest


def register(sub: Any) -> None:
    p = sub.add_parser(
        "scale",
        help="set how many replicas of a model the mesh keeps",
        description="Ask the scaler to keep N replicas of MODEL (bounded by the deployment's max_replicas).",
    )
    p.add_argument("model", help="model name, as in the deployment")
    p.add_argument("--replicas", type=non_negative_int, required=True, help="target number of replicas")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the scaler's answer")
    add_mesh_flags(p)
    p.set_defaults(func=cmd_scale)


def cmd_scale(args: argparse.Namespace) -> int:
    detail = ask(args, "scaler", lambda s: s.scale_request(), ScaleRequest(args.model, args.replicas))
    print(detail or f"{args.model}: target {args.replicas} replicas")
    return 0
