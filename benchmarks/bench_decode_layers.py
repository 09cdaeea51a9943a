"""The CPU decode's per-layer weights against the scanned decode, ours against ours, in one process.

    python benchmarks/bench_decode_layers.py                # seed-size and GPT-2 124M-size models
    python benchmarks/bench_decode_layers.py --models seed

The two `Generator`s alternate (best of --repeats calls each), so a slow spell on the 2 cores lands
on both: 128 new tokens after a 17-token prompt, top_k 50, top_p 0.9, temperature 0.7, random
weights, batch 1 and 8. `model.decode_layers_apart` picks the per-layer form on CPU; here it is
forced each way. `bench_generate.py` is the comparison with PyTorch.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {
    "seed": dict(vocab_size=5000, n_positions=256, n_embd=256, n_layer=8, n_head=8),
    "124m": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["seed", "124m"], choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from flax import nnx

    import gpt2_flax.generate as G
    from gpt2_flax.config import ModelConfig
    from gpt2_flax.model import GPT2LMHeadModel

    for name in args.models:
        model = GPT2LMHeadModel(ModelConfig(**MODELS[name]), rngs=nnx.Rngs(0))
        params = nnx.to_pure_dict(nnx.state(model))
        for b in args.batches:
            prompt = [0, *range(1, 17)]
            total = [len(prompt) + 128] * b
            rows = G.Rows(prompts=[prompt] * b, totals=total, min_totals=total, row_ids=list(range(b)))
            sampling = G.Sampling(temperature=0.7, top_k=50, top_p=0.9)
            engines = {form: G.Generator(nnx.graphdef(model)) for form in ("scanned", "per-layer")}
            times: dict[str, list[float]] = {form: [] for form in engines}
            for i in range(args.repeats + 1):  # the first round compiles
                for form, engine in engines.items():
                    G.decode_layers_apart = lambda platform, form=form: form == "per-layer"
                    t0 = time.perf_counter()
                    engine(params, rows, sampling=sampling, seed=0, stop_ids=[], pad_id=0)
                    if i:
                        times[form].append(time.perf_counter() - t0)
            rate = {form: 128 * b / min(t) for form, t in times.items()}
            print(f"{name} batch {b}: scanned {rate['scanned']:.1f} tok/s, per-layer {rate['per-layer']:.1f} "
                  f"tok/s, {rate['per-layer'] / rate['scanned']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
