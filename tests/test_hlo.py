"""The compiled program read as text (gpt2_flax/hlo.py) and the step estimate built on it
(gpt2_flax/estimate.py): trip counts, their products, collectives, kernels and the roofline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gpt2_flax import hlo, splash
from gpt2_flax.estimate import nested_loops, roofline

# The shape of the compiled TPU train step, cut down: a microbatch loop of 4 (its trip count only in
# its condition, as the TPU compiler leaves it) around a layer loop of 3 (annotated, as on CPU)
# whose body all-reduces a bf16[8,128] gradient and calls a splash kernel; one f32[256] all-reduce
# in the entry. The kernel's backend_config holds a line that starts with "}", as real ones do.
SMALL = """HloModule jit_train_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%layer_cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%layer_body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %g = bf16[8,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %all-reduce.1 = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} all-reduce(%g), channel_id=1, to_apply=%add
  %splash_mha_fwd_residuals.7 = (f32[2,512,128]{2,1,0}, bf16[2,4,1024,64]{3,2,1,0}) custom-call(%g), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "x",
}}, metadata={op_name="splash"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8,128]) tuple(%next, %all-reduce.1)
}

%mb_cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(4)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%mb_body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  ROOT %w = (s32[], bf16[8,128]) while(%p), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"3"}}
}

ENTRY %main (x: bf16[8,128], y: f32[256]) -> (s32[], bf16[8,128]) {
  %x = bf16[8,128] parameter(0)
  %y = f32[256] parameter(1)
  %all-reduce.2 = f32[256]{0} all-reduce(%y), channel_id=2, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,128]) tuple(%zero, %x)
  ROOT %loop = (s32[], bf16[8,128]) while(%init), condition=%mb_cond, body=%mb_body
}
"""  # noqa: E501 (HLO lines as the compiler writes them)


def test_trip_counts_from_annotations_and_conditions() -> None:
    module = hlo.parse(SMALL)
    assert module.entry == "main"
    assert module.computations["main"].whiles == [("mb_body", "mb_cond", 4)]  # from the condition
    assert module.computations["mb_body"].whiles == [("layer_body", "layer_cond", 3)]  # annotated
    assert nested_loops(module) == "4 x [3]"
    mult = hlo.multiplicities(module)
    assert (mult["main"], mult["mb_body"], mult["layer_body"], mult["layer_cond"]) == (1, 4, 12, 16)


def test_collectives_and_kernels_are_counted_per_step() -> None:
    module = hlo.parse(SMALL)
    c = hlo.collectives(module, hlo.multiplicities(module))
    # 12 layer-body all-reduces of 8 x 128 bf16, one of 256 f32 in the entry.
    assert c == {"all-reduce": hlo.Collective(ops=13, bytes=12 * 8 * 128 * 2 + 256 * 4)}
    (call,) = hlo.kernel_calls(module, hlo.multiplicities(module))
    assert call == hlo.KernelCall("splash_mha_fwd_residuals", ("f32[2,512,128]", "bf16[2,4,1024,64]"), 12)


def test_loop_cost_multiplies_each_body_by_its_trip_count() -> None:
    module = hlo.parse(SMALL)
    # A stand-in cost analysis: 1 FLOP per computation in the text (entry 1 + its loops once).
    fake = lambda text: {"flops": float(text.count("ENTRY") + text.count(" while("))}  # noqa: E731
    cost = hlo.loop_cost(module, SMALL, fake)
    # entry alone: 3 (entry + 2 whiles) - 2 (mb_body alone) + 4 * (2 - 1 + 3 * 1) = 17
    assert cost.flops == 17.0 and cost.trip_counts == {"mb_body": 4, "layer_body": 3}


def test_loop_cost_with_xla_matches_the_unrolled_count() -> None:
    # A real program (XLA:CPU): 5 matmuls of 64^3 in a fori_loop; XLA's own count sees one.
    def f(x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, 5, lambda i, a: jnp.tanh(a @ a), x)

    compiled = jax.jit(f).lower(jnp.ones((64, 64), jnp.float32)).compile()
    text = compiled.as_text()
    once = hlo.xla_cost(text)["flops"]
    cost = hlo.loop_cost(hlo.parse(text), text, hlo.xla_cost)
    assert once >= 2 * 64**3 and cost.flops == pytest.approx(5 * once, rel=0.01)
    assert list(cost.trip_counts.values()) == [5]


def test_shape_bytes() -> None:
    assert hlo.shape_bytes("(f32[4,512]{1,0:T(8,128)}, bf16[8]{0}, pred[])") == 4 * 512 * 4 + 16 + 1


def test_splash_kernel_flops() -> None:
    # T=1024 in blocks of 512: 3 of the 4 tiles; each matmul 2 * B * H * 512^2 * D per tile.
    tile = 2.0 * 2 * 4 * 512 * 512 * 64
    assert splash.kernel_flops("splash_mha_fwd_residuals", 2, 4, 1024, 64, block=512) == 2 * 3 * tile
    assert splash.kernel_flops("splash_mha_dq_no_residuals", 2, 4, 1024, 64, block=512) == 3 * 3 * tile
    assert splash.kernel_flops("splash_mha_dkv_no_residuals", 2, 4, 1024, 64, block=512) == 4 * 3 * tile
    assert splash.kernel_flops("some_other_kernel", 2, 4, 1024, 64, block=512) is None


def test_roofline() -> None:
    # 1e15 FLOPs at 1e15 FLOP/s = 1 s; 4e11 bytes at 8e11 B/s = 0.5 s: compute-bound, 1 s.
    assert roofline(1e15, 4e11, 1e15, 8e11) == (1.0, "compute")
    assert roofline(1e14, 4e12, 1e15, 8e11) == (5.0, "memory")
    assert roofline(1e14, 0.0, 0.0, 0.0) == (0.0, "compute")  # an unknown chip: no time
