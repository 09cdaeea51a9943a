"""LoRA against full fine-tuning, ours, on the same model and batches, in one run: step time, the
train state's size and a checkpoint's size.

    python benchmarks/bench_lora.py                          # seed page's model, rank 8
    python benchmarks/bench_lora.py --config configs/demo.yaml --rank 16

The adapters are merged into the weights inside the step (gpt2_flax/lora.py), so the backward
still forms every target's full weight gradient: the step is expected to cost about what a full
fine-tuning step does, and the saving is memory (no moments for the base) and checkpoint size.
Run it with nothing else busy; the contenders alternate, the median round counts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "seed.yaml"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = p.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from gpt2_flax.checkpoint import state_bytes
    from gpt2_flax.config import load_config
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import build, init_state, to_global

    contenders = {}
    for name, rank in (("full fine-tuning", 0), (f"LoRA r={args.rank}", args.rank)):
        cfg = load_config(args.config, [*args.overrides, f"train.lora_rank={rank}", "mesh.data=1"])
        model = GPT2LMHeadModel(cfg.model, rngs=nnx.Rngs(0))
        plan = build(model, cfg)
        state = init_state(plan, model)
        b, t = cfg.train.batch_size, cfg.model.n_positions
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32) for _ in range(4)]
        batches = [to_global({"input_ids": x[:, :-1], "labels": x[:, 1:]}, plan.mesh) for x in batches]
        with jax.set_mesh(plan.mesh):
            for x in batches:  # compile and warm up
                state, m = plan.step_fn(state, x)
            jax.block_until_ready(m)
        ab = plan.abstract_state
        saved = state_bytes(plan.saved(ab.params)) + state_bytes(ab.opt_state)  # what a checkpoint holds
        contenders[name] = dict(
            plan=plan, state=state, batches=batches, times=[], tokens=b * t,
            state_mb=state_bytes(ab) / 2**20, ckpt_mb=saved / 2**20,
        )  # fmt: skip
    for _ in range(args.rounds):
        for c in contenders.values():
            with jax.set_mesh(c["plan"].mesh):
                t0 = time.perf_counter()
                for i in range(args.steps):
                    c["state"], m = c["plan"].step_fn(c["state"], c["batches"][i % 4])
                jax.block_until_ready(m)
            c["times"].append((time.perf_counter() - t0) / args.steps)
    full = statistics.median(next(iter(contenders.values()))["times"])
    print(f"{args.config} {args.overrides}: median of {args.rounds} rounds x {args.steps} steps")
    print("| contender | step | tokens/s | vs full | train state | checkpoint |")
    print("|---|---|---|---|---|---|")
    for name, c in contenders.items():
        step = statistics.median(c["times"])
        print(
            f"| {name} | {step * 1e3:.1f} ms | {c['tokens'] / step:,.0f} | {full / step:.2f}x | "
            f"{c['state_mb']:.1f} MB | {c['ckpt_mb']:.1f} MB |"
        )


if __name__ == "__main__":
    main()
