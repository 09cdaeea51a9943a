"""Page faults per train step in a fresh process (tests/test_host.py): prints one JSON line."""

import json
import resource

import jax

from gpt2_flax.config import config_from_dict
from gpt2_flax.host import tune_allocator
from gpt2_flax.model import GPT2LMHeadModel
from gpt2_flax.train import build, init_state, to_global


def main() -> None:
    import numpy as np

    # Big enough that XLA's temp buffer (140 MB) is past glibc's largest mmap threshold (32 MB) with
    # room: at batch 32 it was 66 MB once LayerNorm's and attention's backward were written out.
    cfg = config_from_dict(
        {
            "model": {
                "vocab_size": 512,
                "n_positions": 64,
                "n_embd": 128,
                "n_layer": 2,
                "n_head": 4,
                "dtype": "float32",
            },
            "train": {"batch_size": 64},
            "mesh": {"data": 1},
        }
    )
    model = GPT2LMHeadModel(cfg.model)
    setup = build(model, cfg)
    jax.set_mesh(setup.mesh)  # (a global setting: this whole process runs on this one mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (64, 65)).astype(np.int32)
    batch = to_global({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, setup.mesh)
    state = init_state(setup, model)
    temp = setup.step_fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):
        state, metrics = setup.step_fn(state, batch)
        metrics["loss"].block_until_ready()
    per_step = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics = setup.step_fn(state, batch)
        metrics["loss"].block_until_ready()
        per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(per_step)[len(per_step) // 2]  # the median step
    report = {"applied": tune_allocator(), "temp_bytes": temp, "fault_bytes_per_step": faults * 4096}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
