"""Where the train step's gap to torch.compile is: the forward, the forward + backward and the whole
step (optimizer, clipping and norms too), ours (`jax.jit`) against Hugging Face PyTorch under
`torch.compile`, all six in one process, interleaved by `bench_train.bench` (the median round
counts). The step minus the forward + backward is the optimizer's share on each side. CPU only
(fp32 on both sides; on a GPU, `bench_train.py` and `profile_train.py` measure the step).

    python benchmarks/bench_train_parts.py --config configs/seed.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "seed.yaml"))
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds of 4 timed steps per contender")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp
    import torch
    from bench_train import bench, hf_model, make_ours, make_torch
    from flax import nnx

    from gpt2_flax.config import load_config
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import loss_sums

    if jax.default_backend() != "cpu":
        raise SystemExit("bench_train_parts.py compares CPU programs: run it with JAX_PLATFORMS=cpu")
    torch.set_num_threads(2)
    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])
    m = cfg.model
    rng = np.random.default_rng(0)
    warmup, per_round = 4, 4
    shape = (cfg.train.batch_size, m.n_positions + 1)
    batches = [rng.integers(0, m.vocab_size, shape) for _ in range(warmup + per_round * args.rounds)]

    graphdef, params = nnx.split(GPT2LMHeadModel(m, rngs=nnx.Rngs(0)))

    def loss(p: nnx.State, b: dict) -> jax.Array:
        s, n = loss_sums(nnx.merge(graphdef, p)(b["input_ids"]), b)
        return s / n

    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    ours_step = make_ours(cfg)

    # torch.compile's step on its own model (bench_train's); its forward and forward + backward on a
    # second one of the same seed, whose gradients are cleared after each backward.
    run_step = make_torch(cfg, compile_=True)
    hf = hf_model(cfg)

    def hf_loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = hf(ids).logits
        flat = logits.float().reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(flat, labels.reshape(-1))

    @torch.compile
    def hf_fwd(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return hf_loss(ids, labels)

    @torch.compile
    def hf_fwd_bwd(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = hf_loss(ids, labels)
        value.backward()
        return value

    def hf_part(f):  # noqa: ANN001, ANN202
        def run(batch: np.ndarray):  # noqa: ANN202
            t = torch.from_numpy(batch.astype(np.int64))
            value = f(t[:, :-1].contiguous(), t[:, 1:].contiguous())
            hf.zero_grad(set_to_none=True)
            return value.item

        return run

    def ours_part(f):  # noqa: ANN001, ANN202
        def run(batch: np.ndarray):  # noqa: ANN202
            ids, labels = jnp.asarray(batch[:, :-1], jnp.int32), jnp.asarray(batch[:, 1:], jnp.int32)
            out = f(params, {"input_ids": ids, "labels": labels})
            return lambda: jax.block_until_ready(out)

        return run

    contenders = {
        "ours fwd": ours_part(fwd),
        "ours fwd+bwd": ours_part(grad),
        "ours step": ours_step,
        "compile fwd": hf_part(hf_fwd),
        "compile fwd+bwd": hf_part(hf_fwd_bwd),
        "compile step": run_step,
    }
    med = {k: v * 1e3 for k, v in bench(contenders, batches, warmup, args.rounds).items()}  # ms
    print(
        f"model {m.n_layer}x{m.n_embd} vocab {m.vocab_size} ctx {m.n_positions}, batch {cfg.train.batch_size}"
    )
    print(f"{'part':10s} {'ours ms':>9s} {'compile ms':>11s}  our speed / theirs")
    for part in ("fwd", "fwd+bwd", "step"):
        o, c = med[f"ours {part}"], med[f"compile {part}"]
        print(f"{part:10s} {o:9.1f} {c:11.1f}  {c / o:.2f}x")
    o_opt, c_opt = med["ours step"] - med["ours fwd+bwd"], med["compile step"] - med["compile fwd+bwd"]
    print(f"{'optimizer':10s} {o_opt:9.1f} {c_opt:11.1f}  (step minus fwd+bwd)")


if __name__ == "__main__":
    main()
