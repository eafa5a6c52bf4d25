"""`cascade deploy`: a model's scaling policy and knobs, changed at run time."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from cascade.cli.common import add_mesh_flags, ask_typed
from cascade.cliargs import positive_float
from cascade.messages import DeployReply, DeployRequest


def _knob(text: str) -> tuple[str, float]:
    """argparse type for --knob NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"knob {name.strip()}: {value!r} is not a number") from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="change a model's scaling policy and knobs at run time",
        description="Ask the scaler to run MODEL under another scaling policy (manual, concurrency, rate, "
        "two-stage) and/or with other knobs, from now on; without --policy or --knob, show what it runs. Knobs "
        "merge into the current ones unless the policy changes or --replace-knobs is given. The change lasts "
        "until the scaler restarts (the deployment file is not rewritten). See docs/deployment.md.",
    )
    p.add_argument("model", help="model name, as in the deployment")
    p.add_argument("--policy", default="", help="manual | concurrency | rate | two-stage (default: keep the current)")
    p.add_argument(
        "--knob", type=_knob, action="append", default=[], metavar="NAME=VALUE", help="a policy knob (repeatable)"
    )
    p.add_argument("--replace-knobs", action="store_true", help="the given knobs replace the current ones")
    p.add_argument("--json", action="store_true", help="print the scaler's reply as JSON")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the scaler's answer")
    add_mesh_flags(p)
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    req = DeployRequest(args.model, args.policy, dict(args.knob), args.replace_knobs)
    r: DeployReply = ask_typed(args, "scaler", lambda s: s.scale_deploy(), req, DeployReply)
    if args.json:
        print(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode())
        return 0

    def knobs(d: dict[str, float]) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in sorted(d.items())) or "(defaults)"

    print(f"{r.model}: policy {r.policy}" + (" (changed)" if r.changed else " (unchanged)"))
    print(f"  knobs set:  {knobs(r.knobs)}")
    if r.effective:
        print(f"  in effect:  {knobs(r.effective)}")
    limit = f", batch limit {r.batch_limit}" if r.batch_limit else ""
    print(f"  replicas:   min {r.min_replicas}, max {r.max_replicas}, target now {r.target_replicas}{limit}")
    return 0
