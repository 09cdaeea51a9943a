"""GPT2LMHeadModel: Hugging Face parity, causality, parameter layout, init, dropout, packing, remat."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import flat_params, new_model, small_config

from gpt2_flax import GPT2LMHeadModel
from gpt2_flax.convert import load_hf_state_dict
from gpt2_flax.model import count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, T, C, L, H = 400, 32, 32, 2, 4


def tiny(dropout: float = 0.0, n_embd: int = C, **kwargs) -> object:
    return small_config(V, max_length=T, n_embd=n_embd, n_layer=L, n_head=H, dropout=dropout, **kwargs)


@nnx.jit
def forward(model: GPT2LMHeadModel, ids: jax.Array, **kwargs) -> jax.Array:
    return model(ids, **kwargs)


def random_ids(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def randomized_hf_model(config, seed: int = 0):
    """An HF GPT-2 with every parameter random (biases and LayerNorms too, not just the init)."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                torch.randn_like(p) * 0.1
                + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
            )
    return hf


def test_logits_match_hugging_face_on_random_weights() -> None:
    config = tiny()
    hf = randomized_hf_model(config)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied in HF too
    ours = new_model(config, seed=1)
    load_hf_state_dict(ours, hf.state_dict())
    ids = random_ids((2, 16))
    logits = forward(ours, jnp.asarray(ids))
    assert logits.shape == (2, 16, V) and logits.dtype == jnp.float32
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids).long()).logits.numpy()
    assert np.abs(np.asarray(logits) - expected).max() < 1e-4
    assert np.abs(expected).max() > 1.0  # the weights are not trivially small


def test_count_params_equals_hugging_face() -> None:
    config = tiny()
    ours = new_model(config)
    assert count_params(ours) == transformers.GPT2LMHeadModel(config).num_parameters()
    # and the padded vocabulary rows are not counted
    assert count_params(ours) < sum(v.size for v in flat_params(ours).values())


def test_causal_mask() -> None:
    model = new_model(tiny())
    ids = random_ids((1, 16))
    base = np.asarray(forward(model, jnp.asarray(ids)))
    for t in (0, 7, 15):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] + 1) % V
        out = np.asarray(forward(model, jnp.asarray(changed)))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert np.abs(out[:, t:] - base[:, t:]).max(axis=-1).min() > 0  # every later position sees it


def test_sequence_longer_than_context_is_refused() -> None:
    model = new_model(tiny())
    with pytest.raises(ValueError, match="n_positions=32"):
        forward(model, jnp.zeros((1, T + 1), jnp.int32))


def test_parameter_tree_names_and_shapes() -> None:
    model = new_model(tiny())
    shapes = {k: v.shape for k, v in flat_params(model).items()}
    vp = 512  # 400 padded to a multiple of 128
    assert shapes == {
        "wte.embedding": (vp, C),
        "wpe.embedding": (T, C),
        "h.ln_1.scale": (L, C),
        "h.ln_1.bias": (L, C),
        "h.attn.c_attn.kernel": (L, C, 3, H, C // H),  # HF's (C, 3C), heads an axis of their own
        "h.attn.c_attn.bias": (L, 3, H, C // H),
        "h.attn.c_proj.kernel": (L, C, C),
        "h.attn.c_proj.bias": (L, C),
        "h.ln_2.scale": (L, C),
        "h.ln_2.bias": (L, C),
        "h.mlp.c_fc.kernel": (L, C, 4 * C),
        "h.mlp.c_fc.bias": (L, 4 * C),
        "h.mlp.c_proj.kernel": (L, 4 * C, C),
        "h.mlp.c_proj.bias": (L, C),
        "ln_f.scale": (C,),
        "ln_f.bias": (C,),
    }
    assert all(v.dtype == np.float32 for v in flat_params(model).values())


def test_init_statistics() -> None:
    n_embd = 64
    model = new_model(tiny(n_embd=n_embd))
    p = flat_params(model)
    proj_std = 0.02 / math.sqrt(2 * L)
    for name, std in [
        ("wte.embedding", 0.02),
        ("wpe.embedding", 0.02),
        ("h.attn.c_attn.kernel", 0.02),
        ("h.mlp.c_fc.kernel", 0.02),
        ("h.attn.c_proj.kernel", proj_std),
        ("h.mlp.c_proj.kernel", proj_std),
    ]:
        x = p[name][:V] if name == "wte.embedding" else p[name]
        assert x.std() == pytest.approx(std, rel=0.06), name
        assert abs(x.mean()) < 0.1 * std, name
    assert not p["wte.embedding"][V:].any()  # vocabulary padding rows start at zero
    for name, x in p.items():
        if name.endswith("bias"):
            assert not x.any(), name
        if name.endswith("scale"):
            assert (x == 1.0).all(), name


def test_dropout_only_with_a_key() -> None:
    model = new_model(tiny(dropout=0.1))
    ids = jnp.asarray(random_ids((2, 16)))
    plain = np.asarray(forward(model, ids))
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), plain)  # deterministic without a key
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1 = np.asarray(forward(model, ids, dropout_key=k1))
    np.testing.assert_array_equal(np.asarray(forward(model, ids, dropout_key=k1)), d1)  # same key, same mask
    d2 = np.asarray(forward(model, ids, dropout_key=k2))
    assert np.abs(d1 - plain).max() > 1e-3
    assert np.abs(d1 - d2).max() > 1e-3
    # With dropout 0 a key changes nothing.
    no_dropout = new_model(tiny(dropout=0.0))
    np.testing.assert_array_equal(
        np.asarray(forward(no_dropout, ids, dropout_key=k1)), np.asarray(forward(no_dropout, ids))
    )


def test_segment_ids_block_attention_across_documents() -> None:
    model = new_model(tiny())
    ids = random_ids((1, 16), seed=3)
    a, b = ids[:, :6], ids[:, 6:]
    segments = jnp.asarray([[0] * 6 + [1] * 10])
    positions = jnp.asarray([list(range(6)) + list(range(10))])
    packed = np.asarray(forward(model, jnp.asarray(ids), positions=positions, segment_ids=segments))
    np.testing.assert_allclose(packed[:, :6], np.asarray(forward(model, jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], np.asarray(forward(model, jnp.asarray(b))), atol=1e-5)
    # Without segment ids, document B does see A.
    unmasked = np.asarray(forward(model, jnp.asarray(ids), positions=positions))
    assert np.abs(unmasked[:, 6:] - packed[:, 6:]).max() > 1e-3


def _loss_and_grads(model: GPT2LMHeadModel, ids: jax.Array, key: jax.Array):
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(ids[:, :-1], dropout_key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
    return loss, logits, nnx.to_pure_dict(grads)


def test_remat_gives_same_logits_and_gradients() -> None:
    ids = jnp.asarray(random_ids((2, 17), seed=5))
    key = jax.random.key(7)  # dropout on: the recomputed forward must draw the same masks
    results = {
        remat: _loss_and_grads(new_model(tiny(dropout=0.1), remat=remat), ids, key)
        for remat in ("none", "block", "dots")
    }
    loss0, logits0, grads0 = results["none"]
    for remat in ("block", "dots"):
        loss, logits, grads = results[remat]
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3


def test_layer_norm_backward_equals_autodiff() -> None:
    """`model.layer_norm` writes its backward out (faster on XLA:CPU, fewer HBM bytes on TPU): its
    gradients for x, scale and bias equal autodiff's of the same forward, for 2-D and 3-D inputs."""
    from gpt2_flax.model import layer_norm

    def reference(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    keys = jax.random.split(jax.random.key(0), 4)
    for shape in ((24, 16), (3, 8, 16)):
        x = jax.random.normal(keys[0], shape) * 3 + 1
        scale, bias = 1 + 0.1 * jax.random.normal(keys[1], (16,)), 0.1 * jax.random.normal(keys[2], (16,))
        w = jax.random.normal(keys[3], shape)  # a loss whose gradient is not uniform
        ours = jax.grad(lambda x, s, b, w=w: (layer_norm(x, s, b, 1e-5) * w).sum(), (0, 1, 2))(x, scale, bias)
        want = jax.grad(lambda x, s, b, w=w: (reference(x, s, b) * w).sum(), (0, 1, 2))(x, scale, bias)
        np.testing.assert_allclose(layer_norm(x, scale, bias, 1e-5), reference(x, scale, bias), atol=1e-6)
        for a, b in zip(ours, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attention_backward_equals_autodiff() -> None:
    """`model._attention` (the explicit path without dropout) writes its backward out: its gradients
    for q, k and v equal autodiff's of the same forward, under a causal mask and under packed
    documents' masks."""
    from gpt2_flax.model import _attention, _probs

    def reference(q, k, v, mask):
        return jnp.einsum("bhqk,bkhd->bqhd", _probs(q, k, mask), v)

    q, k, v, w = (jax.random.normal(key, (2, 8, 4, 16)) for key in jax.random.split(jax.random.key(1), 4))
    causal = jnp.tril(jnp.ones((8, 8), dtype=bool))[None, None]
    docs = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    packed = causal & (docs[:, None, :, None] == docs[:, None, None, :])
    for mask in (causal, packed):
        ours = jax.grad(lambda *a, m=mask: (_attention(*a, m) * w).sum(), (0, 1, 2))(q, k, v)
        want = jax.grad(lambda *a, m=mask: (reference(*a, m) * w).sum(), (0, 1, 2))(q, k, v)
        np.testing.assert_allclose(_attention(q, k, v, mask), reference(q, k, v, mask), atol=1e-6)
        for a, b in zip(ours, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_flat_qkv_product_equals_the_4d_contraction() -> None:
    """On CPU the fused q, k, v kernel (C, 3, H, D) is multiplied as (C, 3*H*D) (`flat_qkv`, faster
    backward there); TPU and GPU keep the 4-D contraction. Both give the same logits and gradients."""
    ids = jnp.asarray(random_ids((2, 17), seed=3))
    model = new_model(tiny())
    assert model.h.attn.c_attn.flat  # the form this CPU runs (and the parity tests check)
    loss, logits, grads = _loss_and_grads(model, ids, None)
    model.h.attn.c_attn.flat = False
    loss4, logits4, grads4 = _loss_and_grads(model, ids, None)
    np.testing.assert_allclose(loss, loss4, rtol=1e-6)
    np.testing.assert_allclose(logits, logits4, rtol=1e-5, atol=1e-6)
    for g, g4 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads4), strict=True):
        np.testing.assert_allclose(g, g4, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(grads["h"]["attn"]["c_attn"]["kernel"]).max()) > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
        ({"n_inner": 64}, "n_inner=64 is not supported"),
        ({"attn_pdrop": 0.0, "resid_pdrop": 0.1, "embd_pdrop": 0.1}, "dropouts differ"),
    ],
)
def test_gpt2_configs_we_do_not_implement_are_refused_at_the_boundary(change, message) -> None:
    from gpt2_flax.config import ConfigError, ModelConfig

    config = tiny()
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(config)


def test_model_config_round_trips_through_transformers() -> None:
    from gpt2_flax.config import ModelConfig

    ours = ModelConfig(
        vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, dropout=0.1, dtype="bfloat16"
    )
    hf = ours.to_hf_config(eos_token_id=7)
    assert (hf.n_ctx, hf.attn_pdrop, hf.eos_token_id, hf.bos_token_id) == (T, 0.1, 7, 7)
    assert ModelConfig.from_hf_config(hf, dtype="bfloat16") == ours
    with pytest.raises(Exception, match="ModelConfig"):
        GPT2LMHeadModel(hf)  # the model takes ours only: the conversion is the caller's, once


def test_fused_attention_branch_equals_the_explicit_path(monkeypatch) -> None:
    # The GPU's cuDNN branch cannot run here, but the same call with implementation="xla" can: it
    # checks the q/k/v layout that branch hands to jax.nn.dot_product_attention.
    import gpt2_flax.model as model_module

    ids = jnp.asarray(random_ids((2, 17), seed=7))
    model = new_model(tiny())
    want = _loss_and_grads(model, ids, None)
    calls = []
    xla = model_module.AttentionChoice("xla", "the fused branch's call, on CPU")
    monkeypatch.setattr(model_module, "attention_implementation", lambda *a, **k: calls.append(1) or xla)
    got = _loss_and_grads(model, ids, None)
    assert calls  # the fused branch was traced
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_splash_branch_equals_the_explicit_path_on_packed_rows(monkeypatch) -> None:
    # The TPU's splash branch in Pallas interpret mode, logits of a 1-layer model on packed rows: the
    # model hands the kernel the segment ids instead of building a mask. The kernel's values and
    # gradients against the explicit path, causal and packed, on a mesh: tests/test_splash.py.
    import gpt2_flax.model as model_module

    t = 128  # the kernel's smallest row (its block granularity)
    model = new_model(small_config(V, max_length=t, n_embd=32, n_layer=1, n_head=2))
    ids = jnp.asarray(random_ids((2, t), seed=9))
    segments = jnp.asarray([[0] * 50 + [1] * 78, [0] * 127 + [1]])
    positions = jnp.asarray([list(range(50)) + list(range(78)), list(range(127)) + [0]])
    run = lambda: nnx.jit(lambda m: m(ids, positions=positions, segment_ids=segments))(model)  # a new trace
    want = run()
    calls = []
    splash = model_module.AttentionChoice("splash", "interpret mode")
    monkeypatch.setattr(model_module, "attention_implementation", lambda *a, **k: calls.append(1) or splash)
    got = run()
    assert calls
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(np.asarray(want)).max() > 0.1
