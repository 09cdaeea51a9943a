#!/usr/bin/env python3
"""Copy a config to every worker and start `gpt2-flax train` on all of them at once, detached.

Each worker runs the same command; on a TPU VM jax.distributed.initialize() needs no arguments, so
the hosts of a multi-host slice find each other by themselves. The trainer keeps running after this
script returns (setsid + nohup); its output goes to ~/gpt2_flax_logs/train.log on each worker.
Checkpoints go to OUTPUT/checkpoints/, and the trainer resumes from the latest one by itself, so the
same launch command also continues a run (--replace first stops a trainer that is still running).
A multi-host slice needs a gs:// OUTPUT (hosts share no disk).

Extra dotted overrides for the trainer go after `--`.

example:
  python tpu_scripts/launch.py --config configs/tpu-v4-8-124m.yaml --output gs://my-bucket/gpt2-124m \\
      -- --train.num_steps=20000
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

import common


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="trainer config YAML, e.g. configs/tpu-v4-8-124m.yaml, or a preset by name (gpt2-124m)",
    )
    parser.add_argument(
        "--output", required=True, help="output dir, gs://BUCKET/RUN (required for multi-host)"
    )
    parser.add_argument(
        "--data-files",
        help="training text for --data.files=: a path on the workers, or gs://BUCKET/data/*.txt "
        "(read in place by every worker: nothing is copied; needs gcsfs, in gpt2_flax[tpu])",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra trainer overrides after --, e.g. --train.learning_rate=3e-4"
    )


# The repository's presets, beside tpu_scripts/: `--config gpt2-124m` sends configs/gpt2-124m.yaml.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_file(path: str) -> str:
    """The config YAML to send: the path given if it exists, else a preset of configs/ by name.
    The rule of gpt2_flax.config.config_file, written again because these scripts run on a
    workstation with the standard library only (no gpt2_flax, no PyYAML)."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path).removesuffix(".yaml")
    if os.path.dirname(path) in ("", "configs") and (CONFIGS / f"{name}.yaml").is_file():
        return str(CONFIGS / f"{name}.yaml")
    presets = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise common.UsageError(
        f"config {path!r} not found. Fix: pass --config PATH/TO/CONFIG.yaml, or a preset by name: {presets}."
    )


def check_args(args: argparse.Namespace) -> None:
    args.config = config_file(args.config)
    if common.hosts(args.accel_type) > 1:
        common.require_gs_output(args.output, f"{args.accel_type} has {common.hosts(args.accel_type)} hosts")
    for override in args.overrides:
        if not re.fullmatch(r"--[A-Za-z_][\w.]*=.*", override):
            raise common.UsageError(
                f"override {override!r} is not of the form --section.key=value. "
                "Fix: e.g. --train.learning_rate=3e-4."
            )


def train_command(args: argparse.Namespace, take_over: bool = False) -> list[str]:
    cmd = [f"{common.REMOTE_VENV}/bin/gpt2-flax", "train", "--config", common.REMOTE_CONFIG]
    if common.hosts(args.accel_type) > 1:
        # jax.distributed.initialize() with no arguments: the TPU metadata names the peer hosts.
        cmd.append("--distributed")
    if args.data_files:
        # gs:// data is read in place, by byte ranges, on every worker; the token cache each worker
        # builds (or, with a shared cache folder, process 0 builds) stays on local disk. A cache saved
        # once to gs:// (`gpt2-flax encode ... --output gs://...`) is read in place too: pass
        # `-- --data.from_cache=gs://...` instead of --data-files.
        cmd.append(f"--data.files={args.data_files}")
    cmd.append(f"--train.output_dir={args.output}")
    if take_over:
        # The old trainer was stopped here, or its VM was recreated: its lock on the output folder
        # (for gs://, a lease it can no longer renew) is taken over instead of waiting 10 minutes.
        cmd.append("--train.take_over_lock=true")
    return [*cmd, *args.overrides]


def launch(
    tpu: common.Tpu, args: argparse.Namespace, replace: bool = False, take_over: bool | None = None
) -> None:
    """Starts the trainer on every worker; replace: stop one still running first. take_over (by
    default = replace): the old trainer is known to be gone, so its output-folder lock is taken over."""
    take_over = replace if take_over is None else take_over
    if not args.output.startswith("gs://"):
        common.log(
            f"warning: {args.output} is on the VM's disk; it is lost if the VM is preempted or deleted"
        )
    tpu.scp(args.config, common.REMOTE_CONFIG)
    log_, pid = common.REMOTE_LOG, common.REMOTE_PID
    # set -e: a failed step stops here, and gcloud reports the failure.
    steps = ["set -e", f"mkdir -p {common.REMOTE_LOG_DIR}"]
    if replace:
        # Stop the old trainer (SIGTERM, up to 60 s to exit, then SIGKILL) so it frees the chips.
        steps.append(
            f'if [ -f {pid} ]; then P="$(cat {pid})"; '
            '{ kill "$P" 2>/dev/null && timeout 60 tail --pid="$P" -f /dev/null; } || true; '
            'kill -9 "$P" 2>/dev/null || true; fi'
        )
    steps += [
        # Refuse to start a second trainer: both would fight over the TPU chips.
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        'echo "gpt2_flax: training is already running on this worker (launch.py --replace stops it)" >&2; '
        "exit 1; fi",
        # setsid + nohup + closed stdin: the trainer survives the end of this ssh session.
        f"setsid nohup {' '.join(map(common.quote, train_command(args, take_over)))} "
        f"> {log_} 2>&1 < /dev/null & "
        f"echo $! > {pid}",
    ]
    tpu.ssh("; ".join(steps))
    if not tpu.dry_run:
        common.log(f"training started on all workers of {tpu.label}; logs: ~/{log_} (tpu_scripts/logs.py)")


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__)
    add_args(parser)
    parser.add_argument("--replace", action="store_true", help="stop a trainer still running, then start")
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    check_args(args)
    launch(tpu, args, replace=args.replace)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
