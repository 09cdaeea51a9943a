#!/usr/bin/env python3
"""Install gpt2_flax[tpu] on every worker of a TPU VM and check that JAX sees all the TPU chips.

The package goes into a virtualenv (~/gpt2_flax_venv) made with uv, because the TPU VM images ship
Python 3.10 and jax>=0.8 needs Python >= 3.11; uv fetches a newer Python by itself.

The check runs `python -c 'import jax; print(jax.device_count())'` on all workers at once and expects
the GLOBAL device count of the slice (v4-8: 4, v4-32: 16, v5litepod-8: 8, v5litepod-16: 16, v5p-8: 4,
v6e-8: 8). jax.local_device_count() is the per-host share (v4-32: 16 devices / 4 hosts = 4 per host).
A worker printing the local count as its device_count did not join the other hosts.

examples:
  pip wheel --no-deps . -w dist && python tpu_scripts/setup.py --wheel dist/gpt2_flax-0.1.0-py3-none-any.whl
  python tpu_scripts/setup.py --git https://github.com/ORG/gpt2_flax.git@main --type v5litepod-16
  python tpu_scripts/setup.py --source .
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

import common

REMOTE_SRC = "gpt2_flax_src"  # where --source is copied on each worker
# Printed by the shell, not by Python, so the remote command needs no nested quotes.
DEVICE_CHECK = (
    f"echo gpt2_flax-devices $({common.REMOTE_VENV}/bin/python -c "
    '"import jax; print(jax.device_count(), jax.local_device_count(), jax.process_index())")'
)


def add_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="a local gpt2_flax wheel, copied to every worker")
    source.add_argument(
        "--git", help="a git URL pip can install from, e.g. https://github.com/ORG/REPO.git@main"
    )
    source.add_argument("--source", help="a local source tree (with pyproject.toml), copied to every worker")
    parser.add_argument(
        "--extras",
        default="tpu",
        help="package extras; 'tpu,torch' also installs PyTorch so exports include pytorch_model.bin",
    )
    parser.add_argument("--python-version", default="3.12", help="Python for the worker virtualenv")
    parser.add_argument(
        "--check-timeout", type=float, default=600, help="seconds before the device check counts as hung"
    )


def check_args(args: argparse.Namespace) -> None:
    if not (args.wheel or args.git or args.source):
        raise common.UsageError(
            "nothing to install. Fix: pass one of --wheel FILE.whl, --git URL, --source DIR."
        )
    if not re.fullmatch(r"\w+(,\w+)*", args.extras):
        raise common.UsageError(
            f"--extras {args.extras!r} is not a comma-separated list. Fix: e.g. tpu,torch."
        )
    if args.wheel and not (os.path.isfile(args.wheel) and args.wheel.endswith(".whl")):
        raise common.UsageError(
            f"--wheel {args.wheel!r} is not a .whl file. Fix: build one with `pip wheel --no-deps . -w dist`."
        )
    if args.source and not os.path.isfile(os.path.join(args.source, "pyproject.toml")):
        raise common.UsageError(
            f"--source {args.source!r} has no pyproject.toml. Fix: point it at the repo root."
        )


def setup(tpu: common.Tpu, args: argparse.Namespace) -> None:
    # 1. Put the package where every worker can install it from.
    if args.wheel:
        wheel = os.path.basename(args.wheel)
        tpu.scp(args.wheel, wheel)
        target = f"./{wheel}[{args.extras}]"
    elif args.source:
        tpu.ssh(f"rm -rf {REMOTE_SRC}")  # scp into an existing directory would nest the copy
        tpu.scp(args.source, REMOTE_SRC, recurse=True)
        target = f"./{REMOTE_SRC}[{args.extras}]"
    else:
        url = args.git if args.git.startswith("git+") else f"git+{args.git}"
        target = f"gpt2_flax[{args.extras}] @ {url}"
    # 2. A fresh virtualenv each time, so a re-run of setup never mixes old and new versions.
    venv, uv = common.REMOTE_VENV, ".local/bin/uv"
    tpu.ssh(
        f"python3 -m pip install --user --quiet --upgrade uv && rm -rf {venv} && "
        f"{uv} venv --python {common.quote(args.python_version)} {venv} && "
        f"{uv} pip install --python {venv}/bin/python {common.quote(target)}"
    )
    check_devices(tpu, args.check_timeout)


def check_devices(tpu: common.Tpu, timeout: float) -> None:
    # All workers must run this at once (--worker=all): on a multi-host slice JAX waits for every host.
    result = tpu.ssh(DEVICE_CHECK, capture=True, timeout=timeout)
    if tpu.dry_run:
        return
    accel = tpu.accel_type
    want, n_hosts = common.devices(accel), common.hosts(accel)
    reports = [tuple(map(int, m)) for m in re.findall(r"gpt2_flax-devices (\d+) (\d+) (\d+)", result.stdout)]
    problems = []
    if len(reports) != n_hosts:
        problems.append(f"{len(reports)} of {n_hosts} workers answered")
    for count, local, process in reports:
        if count != want:
            problems.append(f"process {process} sees jax.device_count()={count} (local: {local})")
    if problems:
        raise common.GcloudError(
            f"device check failed for {accel}: {'; '.join(problems)}. Expected jax.device_count()={want} on "
            f"every worker: device_count is the GLOBAL count over all {n_hosts} host(s), "
            f"local_device_count the per-host one ({want // n_hosts}). A worker reporting only its local "
            "devices ran without the others; re-run setup, or recreate the TPU if it persists."
            f"\n{result.stderr.strip()[-1500:]}"
        )
    common.log(f"device check ok: {n_hosts} worker(s), jax.device_count()={want} on each")


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__)
    add_args(parser)
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    check_args(args)
    setup(tpu, args)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
