#!/usr/bin/env python3
"""Keep a training run alive on spot/preemptible TPUs: recreate, set up and relaunch after preemption.

Every --poll-seconds it describes the TPU VM (or queued resource):
  * PREEMPTED / TERMINATED / missing (queued resource: FAILED / SUSPENDED / missing): delete what is
    left, create it again, run setup and launch. The trainer resumes from the latest checkpoint in
    OUTPUT (hence gs:// only).
  * READY (ACTIVE): read the end of worker 0's log. The line "gpt2-flax: training finished" ends
    babysit with exit 0; a trainer that is no longer running without it is launched again.
Each restart is logged with a timestamp. After --max-restarts restarts it gives up with exit 1;
--max-polls (0 = no limit) bounds the whole loop, exiting 3 if training is still unfinished then.
Takes the flags of create.py, setup.py and launch.py.

example:
  python tpu_scripts/babysit.py --queued --type v5litepod-16 --provisioning spot \\
      --wheel dist/gpt2_flax-0.1.0-py3-none-any.whl \\
      --config configs/tpu-v5litepod-16-124m.yaml --output gs://my-bucket/gpt2-124m
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import common
import create
import delete
import launch
import setup

RUNNING, STOPPED = "gpt2_flax-babysit: running", "gpt2_flax-babysit: stopped"


def training_status(tpu: common.Tpu) -> str:
    """'finished', 'running' or 'stopped', from worker 0's log tail and the trainer's pid file."""
    pid = common.REMOTE_PID
    result = tpu.ssh(
        f"tail -n 20 {common.REMOTE_LOG} 2>/dev/null; "
        f'if kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null; '
        f'then echo "{RUNNING}"; else echo "{STOPPED}"; fi',
        worker="0",
        capture=True,
    )
    if common.FINISHED_MARKER in result.stdout:
        return "finished"
    return "running" if RUNNING in result.stdout else "stopped"


def recreate(tpu: common.Tpu, args: argparse.Namespace, state: str) -> None:
    if state != "NOT_FOUND":
        delete.delete(tpu)
    create.create(tpu, args)
    setup.setup(tpu, args)
    launch.launch(tpu, args, take_over=True)  # the old VM is gone, and its trainer with it


def babysit(tpu: common.Tpu, args: argparse.Namespace) -> int:
    restarts = 0
    poll = 0
    while True:
        poll += 1
        problem, state = None, None
        try:
            state = tpu.state()
            if state in tpu.dead_states:
                problem = f"{tpu.label} is {state}"
            elif state == tpu.ready_state:
                status = training_status(tpu)
                if status == "finished":
                    common.log(f"training finished on {tpu.label}; babysit done")
                    return 0
                if status == "stopped":
                    problem = "the trainer is not running and did not finish"
            else:
                common.log(f"{tpu.label} is {state}; waiting")
        except common.GcloudError as e:  # a flaky describe/ssh is no reason to recreate anything
            common.log(f"poll {poll} failed, will retry: {e}")

        if problem:
            if restarts >= args.max_restarts:
                common.log(f"giving up: {problem}, and --max-restarts={args.max_restarts} restarts are used")
                return 1
            restarts += 1
            step = tpu.latest_checkpoint(args.output)
            resume = f"resuming from checkpoint step {step}" if step is not None else "no checkpoint yet"
            action = "relaunching" if state == tpu.ready_state else "recreating"
            common.log(f"RESTART {restarts}/{args.max_restarts}: {problem}; {action}, {resume}")
            try:
                if state == tpu.ready_state:
                    # replace: on a multi-host slice the trainers of other workers may still hang on.
                    launch.launch(tpu, args, replace=True)
                else:
                    recreate(tpu, args, state)
            except common.GcloudError as e:  # e.g. no spot capacity right now: try again next poll
                common.log(f"restart {restarts} failed: {e}")

        if args.max_polls and poll >= args.max_polls:
            common.log(f"stopping after --max-polls={args.max_polls}; training has not finished")
            return 3
        time.sleep(args.poll_seconds)


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__)
    create.add_args(parser)
    setup.add_args(parser)
    launch.add_args(parser)
    parser.add_argument("--max-restarts", type=int, default=10, help="give up after this many restarts")
    parser.add_argument("--poll-seconds", type=float, default=300, help="sleep between two checks")
    parser.add_argument("--max-polls", type=int, default=0, help="stop after this many checks (0 = never)")
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    create.check_args(args)
    setup.check_args(args)
    launch.check_args(args)
    # Resuming on a new VM needs the checkpoints to outlive the old one.
    common.require_gs_output(args.output, "babysit recreates the TPU, losing its disk")
    if args.dry_run:
        # One poll, then what a restart would run; describe answers are unknown without gcloud.
        tpu.state()
        training_status(tpu)
        print("# after a preemption babysit runs:")
        tpu.latest_checkpoint(args.output)
        recreate(tpu, args, "PREEMPTED")
        return 0
    return babysit(tpu, args)


if __name__ == "__main__":
    common.main_wrapper(main)
