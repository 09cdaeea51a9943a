"""Splash attention (gpt2_flax/splash.py): the Pallas TPU kernel run in interpret mode on this CPU
against the explicit path, and the one choice of attention implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_flax import splash
from gpt2_flax.config import ConfigError, MeshConfig, ModelConfig
from gpt2_flax.model import _attend, attention_implementation
from gpt2_flax.sharding import make_mesh

B, T, H, D = 4, 256, 2, 64


def _explicit(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None) -> jax.Array:
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    return _attend(q, k, v, mask, 0.0, None)


def _value_and_grads(attention, args, cotangent):
    out, vjp = jax.vjp(attention, *args)
    return out, vjp(cotangent)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_splash_in_interpret_mode_equals_the_explicit_path(packed: bool, monkeypatch) -> None:
    # 128-blocks: at T=256 a 2 x 2 grid of tiles, the upper-right one skipped by the causal mask, and
    # document boundaries (100, 130, 200) inside tiles, so both masks meet within a tile.
    monkeypatch.setattr(splash, "BLOCKS", (128,))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys)
    segments = None
    if packed:
        bounds = [(100,), (130, 200), (), (1,)]  # row 3: a one-token document, then one to the end
        segments = jnp.asarray([np.searchsorted(b, np.arange(T), side="right") for b in bounds], jnp.int32)
    kernel = lambda q, k, v: splash.splash_attention(q, k, v, segments, interpret=True)
    # On the mesh, as in training: rows over data x fsdp (B'=1 per device), heads over tensor (H'=1).
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        got, got_grads = jax.jit(_value_and_grads, static_argnums=0)(kernel, (q, k, v), ct)
    want, want_grads = jax.jit(_value_and_grads, static_argnums=0)(
        lambda q, k, v: _explicit(q, k, v, segments), (q, k, v), ct
    )
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, err_msg=f"d{name}")
    assert float(jnp.abs(want_grads[0]).max()) > 0.1  # the gradients are not trivially small


def test_attention_choice() -> None:
    cfg = ModelConfig(n_embd=768, n_head=12)  # GPT-2 124M: head_dim 64
    choose = lambda platform, t=1024, dropout=0.0, packed=False, cfg=cfg: attention_implementation(
        cfg, platform, t, dropout=dropout, packed=packed
    )
    assert choose("tpu").impl == "splash" and "512x512" in choose("tpu").why
    assert choose("tpu", packed=True).impl == "splash"  # segment ids: the kernel masks documents
    assert choose("tpu", t=256).why == "Pallas TPU kernel, 256x256 blocks"
    assert choose("tpu", t=384).why == "Pallas TPU kernel, 128x128 blocks"  # 384 = 3 x 128
    not_128 = choose("tpu", t=1000)
    assert not_128.impl == "explicit" and "multiple of 128" in not_128.why
    dropped = choose("tpu", dropout=0.1)
    assert dropped.impl == "explicit" and "model.dropout=0" in dropped.why
    forced = ModelConfig(attention="explicit")
    assert choose("tpu", cfg=forced).impl == choose("gpu", cfg=forced).impl == "explicit"
    assert choose("gpu").impl == "cudnn"  # "auto" dtype: bfloat16 on GPU
    assert choose("gpu", packed=True).impl == choose("gpu", dropout=0.1).impl == "explicit"
    assert choose("cpu").impl == "explicit"
    with pytest.raises(ConfigError, match="model.attention must be auto or explicit"):
        ModelConfig(attention="flash")


def test_block_sizes_follow_t_and_head_dim() -> None:
    assert splash.block_sizes(1024, 64, 2).block_q == 512
    assert splash.vmem_bytes(512, 64, 2) < splash.VMEM_BUDGET
    # Heads of 512 in bf16 no longer fit a 512-block grid step in the VMEM budget (9.5 MiB): 256.
    assert splash.vmem_bytes(512, 512, 2) > splash.VMEM_BUDGET
    assert splash.block_sizes(1024, 512, 2).block_kv_dkv == 256
