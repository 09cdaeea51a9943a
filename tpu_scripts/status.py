#!/usr/bin/env python3
"""Show the state of the TPU, the last log lines of every worker and the latest checkpoint step.

The latest checkpoint is the largest integer directory under OUTPUT/checkpoints/ (gs:// only): the
step a restarted trainer resumes from.

example:
  python tpu_scripts/status.py --output gs://my-bucket/gpt2-124m --lines 5
"""

from __future__ import annotations

from collections.abc import Sequence

import common
import logs


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__, with_type=False)
    logs.add_args(parser)
    parser.add_argument("--output", help="the run's gs:// output dir, to find the latest checkpoint")
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)

    state = tpu.state()
    if not tpu.dry_run:
        print(f"{tpu.label}: {state}", flush=True)
    if state == tpu.ready_state:
        tpu.ssh(logs.tail_command(args.lines), worker=args.worker, check=False)
    if args.output and args.output.startswith("gs://"):
        step = tpu.latest_checkpoint(args.output)
        if not tpu.dry_run:
            print(f"latest checkpoint step: {step if step is not None else 'none yet'}", flush=True)
    elif args.output:
        print(f"(checkpoints in {args.output} are on the VM; only gs:// outputs are listed here)", flush=True)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
