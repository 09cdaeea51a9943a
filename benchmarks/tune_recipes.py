"""Re-tune the GPT-2 recipes by compiling them (issue 16): for each config and TPU slice, the fewest
microbatches that fit with splash attention (within HEADROOM of HBM), then the lightest remat that
fits at that count.

    nice -n 19 python benchmarks/tune_recipes.py configs/gpt2-124m.yaml --topologies v5e:2x4 v4:2x2x1

Each point is one `gpt2-flax compile --json` in a subprocess (the environment of tests/test_aot.py:
no TPU is opened, no compilation cache). Every result is appended to runs/tune_recipes.jsonl and
reused when the same point is asked for again, so an interrupted search resumes where it stopped.
The search assumes memory falls as microbatches rise and as remat gets heavier (none > dots >
block): the fewest microbatches are found by bisection with remat block, then dots and none are
tried at that count, lightest last. A TPU compile takes 13-90 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "runs" / "tune_recipes.jsonl"
ACCUMS = (1, 2, 4, 8, 16, 32, 64)
GiB = 1 << 30
# A point is taken when the compiler's total is within 90% of HBM: the compiled program is not all
# a running job holds (the runtime's own buffers, the input batches in flight, fragmentation), and
# with no TPU here that margin cannot be measured; the table shows the compiler's figure.
HEADROOM = 0.9


def _load() -> dict[tuple[str, str, int, str], dict]:
    out = {}
    if LOG.exists():
        for line in LOG.read_text().splitlines():
            r = json.loads(line)
            out[(r["config"], r["topology"], r["accum"], r["remat"])] = r
    return out


def compile_point(config: str, topology: str, accum: int, remat: str, seen: dict) -> dict:
    """{"fits": bool, "report": the --json report or None, "error": str}: one compile, or the log's."""
    key = (config, topology, accum, remat)
    if key in seen:
        return seen[key]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "XLA_FLAGS": ""}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "gpt2_flax.cli", "compile", "--config", config, "--topology", topology]
    cmd += ["--json", f"--train.grad_accum_steps={accum}", f"--model.remat={remat}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    report = None
    if out.returncode in (0, 1) and out.stdout.strip():
        report = json.loads(out.stdout.strip().splitlines()[-1])
    r = {"config": config, "topology": topology, "accum": accum, "remat": remat}
    r |= {"fits": out.returncode == 0, "report": report, "error": "" if report else out.stderr[-2000:]}
    LOG.parent.mkdir(exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(r) + "\n")
    seen[key] = r
    total = f"{report['total_bytes'] / GiB:.2f} GiB" if report else "error"
    print(f"  {topology} accum {accum} remat {remat}: {'fits' if r['fits'] else 'no'} ({total})", flush=True)
    return r


def _ok(r: dict) -> bool:
    return r["fits"] and r["report"]["total_bytes"] <= HEADROOM * r["report"]["hbm_bytes"]


def tune(config: str, topology: str, seen: dict, hint: int | None = None) -> dict | None:
    """The fitting point with the fewest microbatches, then the lightest remat; None if none fits.
    hint: a count to try first (another slice's answer), which narrows the bisection."""
    from gpt2_flax.config import load_config

    train = load_config(config, []).train
    accums = [a for a in ACCUMS if train.batch_size % a == 0]
    # Bisection on the index, from the recipe's count (it fit before splash, so it fits with block).
    lo, hi = 0, accums.index(train.grad_accum_steps)
    if hint in accums and accums.index(hint) < hi:
        if _ok(compile_point(config, topology, hint, "block", seen)):
            hi = accums.index(hint)
        else:
            lo = accums.index(hint) + 1
    while not _ok(compile_point(config, topology, accums[hi], "block", seen)):
        if hi == len(accums) - 1:
            return None
        lo, hi = hi + 1, hi + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _ok(compile_point(config, topology, accums[mid], "block", seen)):
            hi = mid
        else:
            lo = mid + 1
    best = compile_point(config, topology, accums[hi], "block", seen)
    for remat in ("dots", "none"):  # lighter and lighter: if dots does not fit, none will not
        r = compile_point(config, topology, accums[hi], remat, seen)
        if not _ok(r):
            break
        best = r
    return best


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--topologies", nargs="+", default=["v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v5e:4x4"])
    p.add_argument("--hint", type=int, help="a microbatch count to try first (another slice's answer)")
    args = p.parse_args(argv)
    seen = _load()
    for config in args.configs:
        cells = []
        for topology in args.topologies:
            print(f"{config} on {topology}", flush=True)
            best = tune(config, topology, seen, args.hint)
            if best is None:
                cells.append("does not fit")
                continue
            r = best["report"]
            cells.append(
                f"{best['accum']} mb, remat {best['remat']}: {r['total_bytes'] / GiB:.1f} / "
                f"{r['hbm_bytes'] / GiB:.0f} GiB, ceiling MFU {r['ceiling_mfu']:.0%}"
            )
        print(f"| `{Path(config).name}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
