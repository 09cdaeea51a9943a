"""Where our train step's time goes, per XLA op: a few steps traced with `jax.profiler`, each op named
from the optimised HLO (its shape, its kind and the JAX operation it came from).

    python benchmarks/profile_train.py --config configs/seed.yaml
    python benchmarks/profile_train.py --config configs/gpt2-124m.yaml train.batch_size=16 \\
        train.grad_accum_steps=1 model.remat=none                      # on a GPU

On a GPU or TPU the time is the device's ("XLA Ops" lines of the device planes). On a CPU it is the
XLA:CPU thunks on the host threads: ops that run at once on different cores both count, so the
total can exceed the step's wall time, and an op's time is its wall time, not core time.
The groups at the end: matmuls (any op whose JAX source is a dot_general, fused or not), attention
kernels (custom calls: cuDNN, splash), collectives, and the rest.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_INSTR = re.compile(r"\s+(?:ROOT )?%(\S+) = (\S+?) (\S+?)\(")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def hlo_ops(text: str) -> dict[str, tuple[str, str, str]]:
    """Instruction name -> (result shape, opcode, JAX op_name) for every instruction of an HLO dump."""
    ops = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            ops[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
    return ops


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter, str]:
    """(ns per op name, events per op name, where they were read) from the newest trace in trace_dir."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    data = ProfileData.from_file(path)
    device = [
        line
        for plane in data.planes
        if plane.name.startswith("/device:")
        for line in plane.lines
        if line.name == "XLA Ops"
    ]
    host = [
        line
        for plane in data.planes
        if not plane.name.startswith("/device:")
        for line in plane.lines
        if any(w in line.name for w in ("XLA", "Eigen", "Slinky"))
    ]
    lines, where = (device, "device 'XLA Ops' lines") if device else (host, "host XLA:CPU threads")
    if not lines:
        names = [(p.name, [ln.name for ln in p.lines]) for p in data.planes]
        sys.exit(f"no XLA op events in {path}; planes and lines found: {names}")
    ns, count = collections.Counter(), collections.Counter()
    for line in lines:
        for ev in line.events:
            if ev.name.startswith(("ThunkExecutor", "end:")):
                continue
            ns[ev.name] += ev.duration_ns
            count[ev.name] += 1
    return ns, count, where


def group(kind: str, opcode: str, op_name: str) -> str:
    if opcode in _COLLECTIVES or any(c in kind for c in _COLLECTIVES):
        return "collectives"
    if "dot_general" in op_name or opcode == "dot":
        return "matmuls"
    if opcode == "custom-call":
        return "custom calls (attention kernels, top-k)"
    return "the rest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "seed.yaml"))
    p.add_argument("--steps", type=int, default=5, help="traced steps")
    p.add_argument("--top", type=int, default=30, help="ops to list")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = p.parse_args()

    dump = tempfile.mkdtemp(prefix="gpt2_flax_hlo_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    import jax
    from bench_train import make_ours  # the same step the benchmark times

    from gpt2_flax.config import load_config

    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])
    t, b = cfg.block_size, cfg.train.batch_size
    run = make_ours(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t + 1))

    def steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            sync = run(tokens)
        sync()
        return (time.perf_counter() - t0) / n

    steps(3)  # compile and warm up
    wall = steps(args.steps)
    trace = tempfile.mkdtemp(prefix="gpt2_flax_trace_")
    jax.profiler.start_trace(trace)
    steps(args.steps)
    jax.profiler.stop_trace()

    modules = glob.glob(f"{dump}/*train_step*after_optimizations.txt")
    ops = hlo_ops(Path(max(modules, key=os.path.getsize)).read_text()) if modules else {}
    ns, count, where = op_times(trace)
    per_step = lambda v: v / 1e6 / args.steps  # ns over the traced steps -> ms per step
    by: collections.Counter = collections.Counter()
    events: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    for name, v in ns.items():
        kind, opcode, op_name = ops.get(name, ("?", re.sub(r"[.\d]+$", "", name), ""))
        key = (kind[:34], opcode, "/".join(op_name.split("/")[-3:])[:64])
        by[key] += v
        events[key] += count[name]
        groups[group(kind, opcode, op_name) if name in ops else "unnamed (thread-pool waits, runtime)"] += v
    print(
        f"model {cfg.model.n_layer}x{cfg.model.n_embd} vocab {cfg.model.vocab_size} ctx {t}, batch {b} on "
        f"{jax.devices()[0].device_kind}: {wall * 1e3:.1f} ms/step wall; ops "
        f"{per_step(sum(ns.values())):.1f} ms/step ({where})"
    )
    for key, v in by.most_common(args.top):
        print(f"{per_step(v):8.2f} ms {events[key] / args.steps:6.1f}x  {key[0]:34s} {key[1]:14s} {key[2]}")
    print("by group:")
    for g, v in groups.most_common():
        print(f"{per_step(v):8.2f} ms  {g}")


if __name__ == "__main__":
    main()
