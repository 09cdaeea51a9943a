#!/usr/bin/env python3
"""Create a Cloud TPU VM (or a queued resource) and wait until it is usable.

The runtime version (the TPU VM image) is picked per TPU generation unless --runtime-version is given:
v4 -> tpu-ubuntu2204-base, v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e.

examples:
  python tpu_scripts/create.py --zone us-central2-b --project my-proj --type v4-8
  python tpu_scripts/create.py --zone us-west4-a --type v5litepod-16 --provisioning spot --queued
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provisioning",
        choices=["on-demand", "spot", "preemptible"],
        default="on-demand",
        help="spot/preemptible cost less but can be reclaimed at any time (use babysit.py then)",
    )
    parser.add_argument("--runtime-version", help="TPU VM image; default: chosen from the TPU generation")
    common.add_wait_args(parser)


def check_args(args: argparse.Namespace) -> None:
    # Queued resources in the GA gcloud offer --spot but not the older preemptible model.
    if args.queued and args.provisioning == "preemptible":
        raise common.UsageError(
            "queued resources cannot be preemptible. Fix: use --provisioning spot (or drop --queued)."
        )


def runtime_version(args: argparse.Namespace) -> str:
    generation = args.accel_type.rsplit("-", 1)[0]  # "v5litepod-16" -> "v5litepod"
    return args.runtime_version or common.RUNTIME_VERSIONS[generation]


def create(tpu: common.Tpu, args: argparse.Namespace) -> None:
    accel = f"--accelerator-type={args.accel_type}"
    if tpu.queued:
        # The queued resource and the TPU VM it will hold share one id, so ssh/scp use the same name.
        spot = ["--spot"] if args.provisioning == "spot" else []
        tpu.resource(
            "create", f"--node-id={tpu.name}", accel, f"--runtime-version={runtime_version(args)}", *spot
        )
    else:
        flags = {"on-demand": [], "spot": ["--spot"], "preemptible": ["--preemptible"]}[args.provisioning]
        tpu.resource("create", accel, f"--version={runtime_version(args)}", *flags)
    # `tpu-vm create` returns once the operation ends, a queued resource only once it is queued:
    # either way, poll describe until the TPU is actually usable.
    tpu.wait_until_ready(args.wait_tries, args.wait_seconds)


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__)
    add_args(parser)
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    check_args(args)
    create(tpu, args)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
