"""Collectives in the compiled train step of a TPU slice (compiled here through libtpu, no TPU).

    JAX_PLATFORMS=cpu python benchmarks/hlo_collectives.py configs/gpt2-124m.yaml v5e:2x4 --mesh.tensor=2

Counts each collective op kind in the optimized HLO, in the whole program and inside the layer
scan's body (where a count is paid once per layer), and the bytes they move per step. Used to
compare parameter layouts (issue 12: c_attn stored as (C, 3, H, D) with heads a real axis).
"""

from __future__ import annotations

import re
import sys
from collections import Counter

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(\S+)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_DTYPES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPES.get(dtype, 4)
    return total


def count(hlo: str) -> dict[str, Counter]:
    """{computation name: Counter of collective kinds}, from optimized HLO text."""
    out: dict[str, Counter] = {}
    name = "?"
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            name = line.split()[0] if not line.startswith("ENTRY") else "ENTRY"
        m = _OP.search(line)
        if m:
            out.setdefault(name, Counter())[m.group(2)] += 1
            out[name][m.group(2) + " bytes"] += _bytes(m.group(1))
    return out


def main(argv: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_flax.aot import topology_devices
    from gpt2_flax.config import load_config
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.sharding import batch_sharding, make_mesh
    from gpt2_flax.train import plan

    config, topology, *overrides = argv
    cfg = load_config(config, [o.removeprefix("--") for o in overrides])
    devices = topology_devices(topology)
    mesh = make_mesh(cfg.mesh, devices)
    abstract = nnx.eval_shape(lambda: GPT2LMHeadModel(cfg.model, platform="tpu"))
    graphdef, state = nnx.split(abstract)
    p = plan(graphdef, state, cfg, mesh)
    b, t = cfg.train.batch_size, cfg.block_size
    row = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_sharding(mesh))
    with jax.set_mesh(mesh):
        hlo = p.step_fn.lower(p.abstract_state, {"input_ids": row, "labels": row}).compile().as_text()
    per = count(hlo)
    total = sum(per.values(), Counter())
    print(f"{config} on {topology} mesh {dict(mesh.shape)}: collectives in the compiled train step")
    for kind in KINDS:
        if total[kind]:
            print(f"  {kind:20s} {total[kind]:4d} ops  {total[kind + ' bytes'] / 2**20:10.1f} MiB (static)")
    loops = {k: v for k, v in per.items() if k != "ENTRY" and any(v[kind] for kind in KINDS)}
    for name, c in sorted(loops.items(), key=lambda kv: -sum(kv[1][k] for k in KINDS))[:6]:
        print(f"  in {name[:60]:60s} " + ", ".join(f"{k} {c[k]}" for k in KINDS if c[k]))


if __name__ == "__main__":
    main(sys.argv[1:])
