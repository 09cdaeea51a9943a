#!/usr/bin/env python3
"""Show the last lines of the training log of every worker (~/gpt2_flax_logs/train.log).

Each line is prefixed with the worker's hostname (…-w-0, …-w-1, …), because the output of all
workers arrives interleaved. --follow keeps streaming until Ctrl-C.

examples:
  python tpu_scripts/logs.py --lines 50
  python tpu_scripts/logs.py --worker 0 --follow
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lines", type=int, default=20, help="lines per worker")
    parser.add_argument("--worker", default="all", help="'all' or one worker index")


def tail_command(lines: int, follow: bool = False) -> str:
    # sed -u: unbuffered, so followed lines show up as they come.
    tail = f"tail -n {lines} {'-F ' if follow else ''}{common.REMOTE_LOG}"
    return f'{tail} 2>&1 | sed -u "s/^/[$(hostname)] /"'


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__, with_type=False)
    add_args(parser)
    parser.add_argument("--follow", action="store_true", help="keep streaming new lines (Ctrl-C to stop)")
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    tpu.ssh(tail_command(args.lines, args.follow), worker=args.worker, check=False)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
