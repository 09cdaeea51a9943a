#!/usr/bin/env python3
"""Delete the TPU VM (or the queued resource together with its TPU VM). Asks first, unless --yes.

Nothing on the VM's disk survives; outputs on gs:// stay.

example:
  python tpu_scripts/delete.py --name gpt2-flax --zone us-central2-b --yes
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import common


def confirmed(tpu: common.Tpu) -> bool:
    # Without a terminal there is nobody to ask: refuse instead of guessing.
    if not sys.stdin.isatty():
        raise common.UsageError(
            f"refusing to delete {tpu.label} without confirmation (stdin is not a terminal). Fix: pass --yes."
        )
    answer = input(f"Delete {tpu.label} in {tpu.zone} (project {tpu.project})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def delete(tpu: common.Tpu) -> None:
    # --quiet: we asked already, gcloud must not ask again. --force: a queued resource also
    # deletes the TPU VM it holds (otherwise gcloud refuses while the VM exists).
    tpu.resource("delete", "--quiet", *(["--force"] if tpu.queued else []))


def main(argv: Sequence[str]) -> int:
    parser = common.make_parser(__doc__, with_type=False)
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)
    tpu = common.make_tpu(args)
    if not (args.yes or args.dry_run or confirmed(tpu)):
        print("not deleted", file=sys.stderr)
        return 1
    delete(tpu)
    return 0


if __name__ == "__main__":
    common.main_wrapper(main)
