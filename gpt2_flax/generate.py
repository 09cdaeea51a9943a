"""Jitted sampling: temperature, top-k, top-p, stop at <|endoftext|>, n samples at once.

This version recomputes the window each new token (no KV cache): simple and exactly the model's
forward. Outputs longer than the context (n_positions) slide the window over the last n_positions
tokens, as Hugging Face's pipelines do for GPT-2.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """(n, V) float32 logits -> logits with excluded tokens at -inf, scaled by 1/temperature."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (n, 1) smallest kept value
        logits = jnp.where(logits < kth, neg, logits)
    # Nucleus: keep the smallest set of tokens whose probability reaches top_p (always the top one).
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # index of the last kept token
    cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_idx, logits.shape[-1] - 1), axis=-1)
    return jnp.where((top_p < 1.0) & (logits < cutoff), neg, logits)


def _sample(
    graphdef: Any,
    params: Any,
    buf: jax.Array,
    start: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    eos_id: jax.Array,
    *,
    total: int,
    top_k: int,
    greedy: bool,
) -> jax.Array:
    """Fills buf[:, start:total] one token at a time; stops early once every row has emitted EOS."""
    ctx = min(total, graphdef_context(graphdef, params))
    n = buf.shape[0]

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        pos, _, done = carry
        return (pos < total) & ~jnp.all(done)

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        pos, buf, done = carry
        lo = jnp.maximum(pos - ctx, 0)  # the window is the last `ctx` tokens before `pos`
        window = jax.lax.dynamic_slice(buf, (0, lo), (n, ctx))
        # merged here, not outside: NNX modules may not cross into the while_loop's trace level
        model = nnx.merge(graphdef, params)
        logits = model(window)[:, pos - 1 - lo]  # (n, V)
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            logits = filter_logits(logits, temperature, top_k, top_p)
            tok = jax.random.categorical(jax.random.fold_in(key, pos), logits, axis=-1)
        tok = jnp.where(done, eos_id, tok).astype(buf.dtype)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, pos))
        return pos + 1, buf, done | (tok == eos_id)

    done = jnp.zeros((n,), bool)
    _, buf, _ = jax.lax.while_loop(cond, body, (start, buf, done))
    return buf


def graphdef_context(graphdef: Any, params: Any) -> int:
    return nnx.merge(graphdef, params).config.n_positions


def make_sampler(graphdef: Any) -> Any:
    """The jitted sampling loop for one model structure (reuse it: each new one compiles again)."""
    return jax.jit(functools.partial(_sample, graphdef), static_argnames=("total", "top_k", "greedy"))


def sample_ids(
    sampler: Any,
    params: Any,
    prompt: list[int],
    *,
    n: int,
    max_length: int,
    eos_id: int,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """(n, max_length) int32 token ids: the prompt, then samples, EOS-filled after each row's stop."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token (use the <|endoftext|> id)")
    if len(prompt) >= max_length:
        raise ValueError(f"the prompt has {len(prompt)} tokens; max_length={max_length} leaves no room")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    buf = np.full((n, max_length), eos_id, dtype=np.int32)
    buf[:, : len(prompt)] = prompt
    out = sampler(
        params,
        jnp.asarray(buf),
        jnp.int32(len(prompt)),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(eos_id),
        total=max_length,
        top_k=int(top_k),
        greedy=temperature <= 0,
    )
    return np.asarray(out)
