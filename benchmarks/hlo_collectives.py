"""Collectives in the compiled train step of a TPU slice (compiled here through libtpu, no TPU).

    JAX_PLATFORMS=cpu python benchmarks/hlo_collectives.py configs/gpt2-124m.yaml v5e:2x4 --mesh.tensor=2

Counts each collective op kind in the optimized HLO (gpt2_flax/hlo.py, the count `gpt2-flax compile`
prints): executed per step with the loop trip counts applied, as written in the program (static),
and in the loop bodies that hold the most. Used to compare parameter layouts (issue 12: c_attn
stored as (C, 3, H, D) with heads a real axis).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_flax import hlo
    from gpt2_flax.aot import topology_devices
    from gpt2_flax.config import load_config
    from gpt2_flax.estimate import nested_loops
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
        text = p.step_fn.lower(p.abstract_state, {"input_ids": row, "labels": row}).compile().as_text()
    module = hlo.parse(text)
    mult = hlo.multiplicities(module)
    per_step = hlo.collectives(module, mult)
    static = hlo.collectives(module, dict.fromkeys(mult, 1))
    print(f"{config} on {topology} mesh {dict(mesh.shape)}: collectives in the compiled train step")
    print(f"  loops {nested_loops(module)}; result bytes per device")
    for kind, c in static.items():
        step = per_step[kind]
        print(
            f"  {kind:20s} {c.ops:4d} ops {c.bytes / 2**20:10.1f} MiB (static); "
            f"per step {step.ops:6d} ops {step.bytes / 2**20:10.1f} MiB"
        )
    bodies = [b for comp in module.computations.values() for b, _, _ in comp.whiles]
    for name in bodies:
        own = hlo.collectives(module, {k: int(k == name) for k in mult})
        if own:
            ops = ", ".join(f"{k} {c.ops}" for k, c in own.items())
            print(f"  in loop body {name[:50]:50s} x{mult[name]}: {ops}")


if __name__ == "__main__":
    main(sys.argv[1:])
