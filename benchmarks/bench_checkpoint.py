"""Checkpoint cost: training steps/s with asynchronous saves every 10 steps against no saves (the
seed config), and save / restore seconds of the full GPT-2 124M training state, in one run.

    python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --steps 200 --skip-124m

Goal (issue 5): under 5% overhead from saving. Run with nothing else busy.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _setup(config: str, overrides: list[str]):
    from flax import nnx

    from gpt2_flax.config import load_config
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import build, init_state

    cfg = load_config(config, ["mesh.data=1", *overrides])
    model = GPT2LMHeadModel(cfg.model, rngs=nnx.Rngs(0))
    plan = build(model, cfg)
    return cfg, plan, init_state(plan, model)


def steps_per_s(steps: int, save_every: int) -> float:
    import jax

    from gpt2_flax.checkpoint import Checkpointer
    from gpt2_flax.train import to_global

    cfg, setup, state = _setup(str(ROOT / "configs" / "seed.yaml"), [])
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.block_size
    batches = [rng.integers(0, cfg.model.vocab_size, (b, t + 1)) for _ in range(16)]
    tmp = Path(tempfile.mkdtemp())
    ckpt = Checkpointer(tmp / "ckpt", keep=2)

    def run(i: int):
        nonlocal state
        x = batches[i % len(batches)]
        batch = {"input_ids": x[:, :-1].astype(np.int32), "labels": x[:, 1:].astype(np.int32)}
        with jax.set_mesh(setup.mesh):
            state, metrics = setup.step_fn(state, to_global(batch, setup.mesh))
        if save_every and (i + 1) % save_every == 0:
            ckpt.save(i + 1, state.params, state.opt_state, {})
        return metrics

    for i in range(5):  # compile
        jax.block_until_ready(run(i))
    t0 = time.perf_counter()
    for i in range(5, 5 + steps):
        metrics = run(i)
    jax.block_until_ready(metrics)
    ckpt.wait()
    elapsed = time.perf_counter() - t0
    ckpt.close()
    shutil.rmtree(tmp)
    return steps / elapsed


def save_restore_124m() -> tuple[float, float, float]:
    import jax

    from gpt2_flax.checkpoint import Checkpointer, state_bytes

    cfg, setup, state = _setup(str(ROOT / "configs" / "gpt2-124m.yaml"), ["model.dtype=float32"])
    size = state_bytes(state)
    tmp = Path(tempfile.mkdtemp())
    ckpt = Checkpointer(tmp / "ckpt", keep=2)
    t0 = time.perf_counter()
    ckpt.save(1, state.params, state.opt_state, {})
    ckpt.wait()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = ckpt.restore(1, setup.abstract_state.params, setup.abstract_state.opt_state)
    jax.block_until_ready(out["params"])
    restore_s = time.perf_counter() - t0
    ckpt.close()
    shutil.rmtree(tmp)
    return size / 2**20, save_s, restore_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip-124m", action="store_true")
    args = p.parse_args()
    base = steps_per_s(args.steps, save_every=0)
    saving = steps_per_s(args.steps, save_every=10)
    print(
        f"seed config, {args.steps} steps: no saves {base:.2f} steps/s; async save every 10 steps "
        f"{saving:.2f} steps/s; overhead {100 * (base / saving - 1):.1f}%"
    )
    if not args.skip_124m:
        mib, save_s, restore_s = save_restore_124m()
        print(
            f"GPT-2 124M full training state ({mib:.0f} MiB: params + Adam moments): "
            f"save {save_s:.2f} s (until final), restore {restore_s:.2f} s"
        )


if __name__ == "__main__":
    main()
