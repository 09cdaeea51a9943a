"""GPT-2 in Flax NNX with Hugging Face's parameter names and layouts.

Parameter tree (L = n_layer, C = n_embd, V' = vocab padded to a multiple of 128)::

    wte.embedding (V', C)      wpe.embedding (n_positions, C)
    h.ln_1.scale/bias (L, C)   h.attn.c_attn.kernel (L, C, 3, H, D)  h.attn.c_proj.kernel (L, C, C)
    h.ln_2.scale/bias (L, C)   h.attn.c_attn.bias (L, 3, H, D)       h.mlp.c_fc.kernel (L, C, 4C)
    ln_f.scale/bias (C,)       h.mlp.c_proj.kernel (L, 4C, C)        (lm_head is tied to wte)

A Flax kernel is (in, out) like HF's Conv1D weight, so export is a rename plus splitting the stacked
layer axis: ``h.attn.c_attn.kernel[i]`` <-> ``transformer.h.{i}.attn.c_attn.weight``; c_attn
keeps the heads as an axis of their own, and (C, 3, H, D) is HF's (C, 3C) [q|k|v] reshaped. Every
parameter carries logical axis names (``"embed"``, ``"mlp"`` ...); ``sharding.py`` maps them to
mesh axes, so this file never names a mesh axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_flax.config import ConfigError, ModelConfig
from gpt2_flax.sharding import constrain

Array = jax.Array


def _init(std: float, names: tuple[str | None, ...]) -> Any:
    # eager_sharding=False: parameters are created unsharded inside `jax.jit(init, out_shardings=...)`
    # (sharding.py), so no mesh context is needed here.
    return nnx.with_partitioning(_normal_2d(std), names, eager_sharding=False)


def _normal_2d(std: float) -> Any:
    """normal(std) drawn as (shape[0], rest) and reshaped: the same values (threefry numbers the
    elements in row-major order either way), but XLA:CPU compiles the 2-D draw of c_attn's
    (C, 3, H, D) kernel in 0.4 s where the 4-D one took 4.2 s, which was most of a GPT2() init."""
    normal = nnx.initializers.normal(std)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return normal(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)

    return init


def _const(value: float, names: tuple[str | None, ...]) -> Any:
    init = nnx.initializers.ones if value == 1.0 else nnx.initializers.zeros
    return nnx.with_partitioning(init, names, eager_sharding=False)


def compute_dtype(dtype: Any, platform: str | None = None) -> jnp.dtype:
    """ "auto" -> bfloat16 on TPU/GPU (the MXU and tensor cores' type), float32 on CPU (where bf16 is
    slower than fp32); anything else is taken as a dtype name."""
    if isinstance(dtype, str) and dtype == "auto":
        platform = platform or jax.default_backend()
        return jnp.dtype(jnp.bfloat16 if platform in ("tpu", "gpu", "cuda", "rocm") else jnp.float32)
    return jnp.dtype(dtype)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class Linear(nnx.Module):
    """y = x @ kernel + bias on 2-D activations (B*T, in): 2.4x faster train step on XLA:CPU
    than the same matmul written on (B, T, in)."""

    def __init__(self, n_in: int, n_out: int, std: float, names: tuple[str, str], rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(std, names)(rngs.params(), (n_in, n_out)))
        self.bias = nnx.Param(_const(0.0, (names[1],))(rngs.params(), (n_out,)))

    def __call__(self, x: Array, transposed: bool = False) -> Array:
        """transposed: the kernel is held as (out, in), as `split_layers` writes it for the CPU decode."""
        kernel = self.kernel[...].astype(x.dtype)
        y = times_transposed(x, kernel) if transposed else x @ kernel
        return y + self.bias[...].astype(x.dtype)


FEW_ROWS = 64  # up to this many rows, `times_transposed` takes the (N, M) product


def times_transposed(x: Array, kernel_t: Array, dtype: Any = None) -> Array:
    """x (M, K) @ kernel_t (N, K)^T: the CPU decode's products (`split_layers`). For a few rows
    (M <= 64: decode steps) it is computed as (N, M) and transposed. XLA:CPU's kernels for small M
    read a (K, N) weight at 6-12 GB/s; with the weight as (N, K) and an (N, M) product they stream
    it at 14-20 GB/s. GPT-2 124M's shapes at M=8, 2-core AMD EPYC: (3072 -> 768) 1.39 -> 0.48 ms,
    (768 -> 2304) 0.90 -> 0.49 ms, the tied head 12.4 -> 9.0 ms; level or faster at M=1 and 1.0-1.4x
    at M=64. The barrier keeps XLA from folding the transpose back into the dot (that gives the slow
    kernel again). Longer prefills (M >= 256), where the (N, M) form ran 0.83-0.96x, take the
    plain product, as fast as `x @ kernel`. dtype: the product's (the tied head accumulates 16-bit
    inputs in float32), by default x's."""
    if x.shape[0] > FEW_ROWS:
        return jnp.einsum("mk,nk->mn", x, kernel_t, preferred_element_type=dtype)
    return jax.lax.optimization_barrier(jnp.einsum("nk,mk->nm", kernel_t, x, preferred_element_type=dtype)).T


class QKVLinear(nnx.Module):
    """The fused q, k, v projection with the heads as a real axis: kernel (C, 3, H, D), bias
    (3, H, D). Sharding `heads` over `tensor` then splits at head boundaries; stored as HF's
    (C, 3C), the split cut the [q|k|v] columns elsewhere and the compiled v5e:2x4 tensor=2 step of
    GPT-2 124M all-gathered 432 MiB in 13 collectives to reshuffle them (0 with this layout)."""

    def __init__(self, c: int, n_head: int, std: float, rngs: nnx.Rngs, flat: bool = False):
        d = c // n_head
        self.kernel = nnx.Param(_init(std, ("embed", None, "heads", None))(rngs.params(), (c, 3, n_head, d)))
        self.bias = nnx.Param(_const(0.0, (None, "heads", None))(rngs.params(), (3, n_head, d)))
        self.flat = flat  # see `flat_qkv`

    def __call__(self, x: Array, transposed: bool = False) -> Array:
        kernel = self.kernel[...].astype(x.dtype)
        if transposed:  # held as (3*H*D, C) by `split_layers`
            y = times_transposed(x, kernel).reshape(x.shape[0], *self.bias.shape)
        elif self.flat:  # (B*T, C) @ (C, 3*H*D): the kernel's trailing axes are contiguous, a bitcast
            y = (x @ kernel.reshape(kernel.shape[0], -1)).reshape(x.shape[0], *kernel.shape[1:])
        else:  # (B*T, C) x (C, 3, H, D) -> (B*T, 3, H, D), no batch dimensions
            y = jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))
        return y + self.bias[...].astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(
        self, n: int, c: int, std: float, names: tuple[str, str], rngs: nnx.Rngs, used_rows: int | None = None
    ):
        table = nnx.initializers.normal(std)(rngs.params(), (n, c))
        if used_rows is not None:  # vocab padding rows start (and, never decayed, stay) at zero
            table = table.at[used_rows:].set(0.0)
        self.embedding = nnx.Param(table, out_sharding=names, eager_sharding=False)


class LayerNorm(nnx.Module):
    def __init__(self, n: int, eps: float, rngs: nnx.Rngs):
        self.scale = nnx.Param(_const(1.0, ("norm",))(rngs.params(), (n,)))
        self.bias = nnx.Param(_const(0.0, ("norm",))(rngs.params(), (n,)))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        # Statistics in float32 whatever the compute dtype.
        return layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...], self.eps).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis, with its backward written out (`_layer_norm_bwd`): autodiff's
    backward of the same forward ran as more, smaller fusions and reductions on XLA:CPU. Train step,
    same process, interleaved, this project's 2-core CPU: seed 158.2 -> 150.6 ms (1.05x; again
    162.4 -> 153.7), demo 106.7 -> 102.4 ms (1.04x)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(eps: float, res: tuple, dy: Array) -> tuple[Array, Array, Array]:
    # y = xhat * scale + bias, xhat = (x - mean) * rstd: with g = dy * scale,
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the normalised axis.
    xhat, rstd, scale = res
    rows = tuple(range(dy.ndim - 1))
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; a no-op when `key` is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class KVCache(NamedTuple):
    """Keys and values of every layer for generation, in the compute dtype, S cache slots: k, v
    (L, B, H, S, D) stacked on the layer axis like the scanned parameters, so one scan reads both,
    or tuples of L (B, H, S, D) arrays for the per-layer decode (`decode_layers_apart`). Heads before
    slots so that attention is a plain batched matmul over (B, H) (with (B, S, H, D) XLA:CPU
    transposed every layer's cache every token)."""

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]


class Masking(NamedTuple):
    """How a forward's attention runs and masks, decided once per forward for every layer:
    impl ("splash", "cudnn", "explicit"; the tests add "xla"), the (B, 1, T, T) allowed pairs of
    packed rows for the explicit path (None: plain causal rows) or their (B, T) segment ids for
    splash, and whether a Pallas kernel is interpreted (off TPU)."""

    impl: str
    mask: Array | None = None
    segment_ids: Array | None = None
    interpret: bool = False


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, proj_std: float, rngs: nnx.Rngs, flat_qkv: bool = False):
        c = cfg.n_embd
        self.n_head = cfg.n_head
        self.rate = cfg.dropout
        self.c_attn = QKVLinear(c, cfg.n_head, cfg.initializer_range, rngs, flat=flat_qkv)
        self.c_proj = Linear(c, c, proj_std, ("heads", "embed"), rngs)

    def _qkv(self, x: Array, b: int, t: int, transposed: bool = False) -> tuple[Array, Array, Array]:
        h = self.n_head
        qkv = self.c_attn(x, transposed).reshape(b, t, 3, h, x.shape[-1] // h)  # -> (B, T, 3, H, D)
        # Heads split over the tensor axis (a no-op without one): attention is then local per device.
        qkv = constrain(qkv, ("batch", None, None, "heads", None))
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, D) each

    def __call__(self, x: Array, masking: Masking, shape: tuple[int, int], keys: Array | None) -> Array:
        b, t = shape
        c = x.shape[-1]
        q, k, v = self._qkv(x, b, t)
        if masking.impl == "splash":
            from gpt2_flax.splash import splash_attention

            # No (T, T) scores in HBM; numerics: tests/test_splash.py, against `_attend` below.
            y = splash_attention(q, k, v, masking.segment_ids, interpret=masking.interpret)
            return dropout(self.c_proj(y.reshape(b * t, c)), self.rate, None if keys is None else keys[1])
        if masking.impl in ("cudnn", "xla"):
            # cuDNN flash attention: no (T, T) scores in memory (H100, GPT-2 124M at T=1024: the
            # explicit path below ran the train step 2.8x slower than torch.compile's SDPA).
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=masking.impl)
            return dropout(self.c_proj(y.reshape(b * t, c)), self.rate, None if keys is None else keys[1])
        mask = masking.mask
        if mask is None:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # (1, 1, T, T) causal
        y = _attend(q, k, v, mask, self.rate, None if keys is None else keys[0]).reshape(b * t, c)
        return dropout(self.c_proj(y), self.rate, None if keys is None else keys[1])

    def decode(
        self,
        x: Array,
        shape: tuple[int, int],
        k_cache: Array,
        v_cache: Array,
        index: Any,
        masks: Any,
        transposed: bool = False,
    ) -> tuple[Array, Array, Array]:
        """Attention of T new tokens over one layer's cache (B, H, S, D) and over themselves.
        masks: (B, 1, T, S) allowed cache slots (None: an empty cache, as in prefill) and (B, 1, T, T)
        allowed new tokens; transposed: kernels held as (out, in) (`split_layers`). Returns (output
        (B*T, C), new keys and values (B, H, T, D)) for the caller to write at slots [index, index + T)."""
        b, t = shape
        q, k, v = (y.transpose(0, 2, 1, 3) for y in self._qkv(x, b, t, transposed))  # (B, H, T, D)
        cache_mask, new_mask = masks
        scale = 1.0 / math.sqrt(q.shape[-1])
        neg = jnp.finfo(jnp.float32).min
        # Two blocks, one softmax: the cache is read in place, never concatenated with the new keys
        # (a concat or an update-then-attend copied every layer's cache each token: 3x slower at B=8).
        s_new = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
        s_new = jnp.where(new_mask, s_new, neg)
        if cache_mask is None:
            probs = jax.nn.softmax(s_new, axis=-1).astype(q.dtype)
            y = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        else:
            s_old = jnp.einsum("bhqd,bhkd->bhqk", q, k_cache.astype(q.dtype)).astype(jnp.float32) * scale
            s_old = jnp.where(cache_mask, s_old, neg)
            top = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
            p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
            denom = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
            y = jnp.einsum("bhqk,bhkd->bhqd", (p_old / denom).astype(q.dtype), v_cache.astype(q.dtype))
            y = y + jnp.einsum("bhqk,bhkd->bhqd", (p_new / denom).astype(q.dtype), v)
        y = y.transpose(0, 2, 1, 3).reshape(b * t, x.shape[-1])
        return self.c_proj(y, transposed), k, v


def _attend(q: Array, k: Array, v: Array, mask: Array, rate: float, key: Array | None) -> Array:
    """Explicit softmax attention: q (B, Tq, H, D) over k, v (B, Tk, H, D); mask (B or 1, 1, Tq, Tk)."""
    if key is None or rate == 0.0:
        return _attention(q, k, v, mask)
    probs = dropout(_probs(q, k, mask).astype(q.dtype), rate, key)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _probs(q: Array, k: Array, mask: Array) -> Array:
    """Softmax of the masked scores, (B, H, Tq, Tk), in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`_attend` without dropout, with its backward written out (`_attention_bwd`, from the float32
    probabilities alone): autodiff's ran the softmax backward as more fusions and transposes on
    XLA:CPU. Train step, same process, interleaved, this project's 2-core CPU: seed 1.02-1.04x,
    demo 1.03-1.04x (three runs each)."""
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, tuple]:
    probs = _probs(q, k, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(q.dtype), v), (q, k, v, probs, mask)


def _attention_bwd(res: tuple, dy: Array) -> tuple[Array, Array, Array, None]:
    # y = P V with P = softmax(S), S = q k^T / sqrt(D) where allowed: dV = P^T dy, dP = dy V^T,
    # dS = P * (dP - rowsum(dP * P)) / sqrt(D), zero where masked (as autodiff's); dq = dS k, dk = dS^T q.
    q, k, v, probs, mask = res
    dv = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(q.dtype), dy)
    dp = jnp.einsum("bqhd,bkhd->bhqk", dy, v).astype(jnp.float32)
    ds = probs * (dp - (dp * probs).sum(-1, keepdims=True)) / math.sqrt(q.shape[-1])
    ds = jnp.where(mask, ds, 0.0).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", ds, k), jnp.einsum("bhqk,bqhd->bkhd", ds, q), dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def unroll_layers(platform: str, n_layer: int) -> bool:
    """Whether the training forward unrolls its layer scan (the parameters stay stacked either way).
    XLA:CPU, up to GPT-2 124M's 12 layers: a rolled scan writes every layer's saved activations
    into stacked (L, ...) buffers and slices them back out in the backward; unrolled, each is a
    plain buffer. Measured fwd+bwd on this project's 2-core CPU: demo (4 layers) 173 -> 138 ms, seed
    (8 layers) 233 -> 213 ms. GPT-2 124M (context 256, batch 4, fp32), the train step in one process,
    interleaved: 6.59 -> 5.71 s (1.15x), temp buffer 2.36 -> 1.91 GB, compile 3.3 -> 5.8 s
    (2026-12-03; before the allocator stopped trimming, host.py, page faults hid the gain). Compile
    time grows with the layers, so deeper models, TPU and GPU keep the rolled scan."""
    return platform == "cpu" and n_layer <= 12


def decode_layers_apart(platform: str) -> bool:
    """Whether generation reads each layer's weights from an array of its own (`split_layers`)
    instead of scanning over the stacked parameters. XLA:CPU materialises the scan's per-layer
    slice of a stacked kernel before every matmul (a `dynamic-slice` copy fusion), and at one token
    per row generation is all weight reads. Measured on this project's 2-core CPU in one process
    (scanned vs per-layer, 128 new tokens, top_k 50): GPT-2 124M size 14.2 -> 29.8 tok/s at batch 1,
    61.4 -> 60.0 at batch 8; the seed model 398 -> 495 at batch 1, 922 -> 884 at batch 8 (at M=8
    the small-M GEMMs, not the copy, bound the step). TPU and GPU read the slice in place, so they
    keep the scan and no second copy of the weights."""
    return platform == "cpu"


def flat_qkv(platform: str) -> bool:
    """Whether the fused q, k, v projection multiplies by its (C, 3, H, D) kernel viewed as (C, 3*H*D).
    XLA:CPU lowers the weight gradient of the 4-D contraction as (3*H*D, B*T) @ (B*T, C) with a
    transpose of dy before it and of the result after it (seed model: ~4.4 ms of copies a step);
    as a 2-D matmul it is one `x.T @ dy` like every other kernel's. Train step, same process,
    interleaved, this project's 2-core CPU: seed 147.5 -> 143.0 ms (1.03x), demo 97.7 -> 96.2 ms
    (1.02x). Elsewhere the 4-D form stays: merging a `heads` axis split over `tensor` into one
    (3*H*D) axis is not a sharding of that axis, so a tensor-parallel TPU step would reshuffle it."""
    return platform == "cpu"


def split_layers(h_state: Any) -> tuple[Any, ...]:
    """The stacked block parameters (L, ...) -> L per-layer states (one copy of the block weights;
    see `decode_layers_apart`), each kernel held as (out, in) for `times_transposed`: the fused
    q, k, v kernel (C, 3, H, D) as (3*H*D, C). Seed model at batch 8, the same process: 1,043 ->
    1,380 tok/s; GPT-2 124M size 36.6 -> 43.2 at batch 1 and 90.4 -> 158.9 at batch 8."""
    n = jax.tree.leaves(h_state)[0].shape[0]

    def layer(path: Any, a: Array, i: int) -> Array:
        if "kernel" not in (getattr(k, "key", getattr(k, "name", None)) for k in path):
            return a[i]
        return a[i].reshape(a.shape[1], -1).T  # (in, ...) -> (out, in); jitted, a copy

    with_path = jax.tree_util.tree_map_with_path
    return tuple(with_path(lambda p, a, i=i: layer(p, a, i), h_state) for i in range(n))


@dataclass(frozen=True)
class AttentionChoice:
    impl: str  # "splash" | "cudnn" | "explicit"
    why: str  # for the compile report and the docs

    def __str__(self) -> str:
        return f"{self.impl} ({self.why})"


def attention_implementation(
    cfg: ModelConfig, platform: str, t: int, *, dropout: float, packed: bool
) -> AttentionChoice:
    """The one choice of attention for a forward of rows of length `t` on `platform`; dropout is
    the attention dropout rate in effect (0 in evaluation), packed whether rows carry segment ids.

    TPU: the splash kernel (gpt2_flax/splash.py) for causal and packed rows when T is a multiple of
    128. GPT-2 124M on v5e:2x4, temporaries per device: 3.97 -> 3.82 GiB at 16 microbatches and
    remat dots, 10.39 -> 7.12 GiB without remat (BENCHMARKS.md).
    Attention dropout in training keeps the explicit path: the kernel never forms the probabilities
    a dropout mask would apply to (model.dropout=0, the default, gets the kernel). Other T keep it
    too, rather than padding: every layer would pad q, k, v and slice the output (copies of
    (B, T, C)) to compute up to 127 thrown-away rows, and every recipe's T is a multiple of 128.
    GPU: cuDNN's fused kernel for plain causal rows, 16-bit compute, no attention dropout.
    Elsewhere (CPU, fp32 GPU) the explicit path; on XLA:CPU it is the faster one."""
    dtype = compute_dtype(cfg.dtype, platform)
    if cfg.attention == "explicit":
        return AttentionChoice("explicit", "model.attention=explicit")
    if platform == "tpu":
        from gpt2_flax import splash

        why = splash.unsupported(t)
        if dropout > 0.0:
            why = f"model.dropout={dropout} in training: splash has no attention dropout (model.dropout=0)"
        if why is not None:
            return AttentionChoice("explicit", why)
        block = splash.block_sizes(t, cfg.n_embd // cfg.n_head, dtype.itemsize).block_q
        return AttentionChoice("splash", f"Pallas TPU kernel, {block}x{block} blocks")
    if platform == "gpu" and dtype.itemsize == 2 and dropout == 0.0 and not packed:
        return AttentionChoice("cudnn", "cuDNN fused attention")
    return AttentionChoice("explicit", f"{jnp.dtype(dtype).name} on {platform}")


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, proj_std: float, rngs: nnx.Rngs):
        c = cfg.n_embd
        inner = 4 * c
        self.rate = cfg.dropout
        self.c_fc = Linear(c, inner, cfg.initializer_range, ("embed", "mlp"), rngs)
        self.c_proj = Linear(inner, c, proj_std, ("mlp", "embed"), rngs)

    def __call__(self, x: Array, key: Array | None, transposed: bool = False) -> Array:
        # HF GPT-2's "gelu_new" is the tanh approximation.
        h = jax.nn.gelu(self.c_fc(x, transposed), approximate=True)
        return dropout(self.c_proj(h, transposed), self.rate, key)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, flat_qkv: bool = False):
        # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer): each block adds two.
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.n_embd, eps, rngs)
        self.attn = Attention(cfg, proj_std, rngs, flat_qkv)
        self.ln_2 = LayerNorm(cfg.n_embd, eps, rngs)
        self.mlp = MLP(cfg, proj_std, rngs)

    def __call__(self, x: Array, masking: Masking, shape: tuple[int, int], keys: Array | None) -> Array:
        x = x + self.attn(self.ln_1(x), masking, shape, None if keys is None else keys[:2])
        return x + self.mlp(self.ln_2(x), None if keys is None else keys[2])

    def decode(
        self, x: Array, shape: tuple[int, int], k: Array, v: Array, index: Any, masks: Any, transposed: bool
    ) -> tuple[Array, Array, Array]:
        a, k_new, v_new = self.attn.decode(self.ln_1(x), shape, k, v, index, masks, transposed)
        x = x + a
        return x + self.mlp(self.ln_2(x), None, transposed), k_new, v_new


_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 language model: int32 token ids (B, T) -> float32 logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, platform: str | None = None):
        """The one constructor (the facade, the AOT compile and the converter all use it).
        platform: where the model will run ("cpu", "tpu", "gpu"), by default JAX's default
        backend; it picks the "auto" compute dtype and the layer loop (`unroll_layers`)."""
        if not isinstance(config, ModelConfig):
            raise ConfigError(
                f"GPT2LMHeadModel takes a gpt2_flax ModelConfig, got {type(config).__name__}; "
                "convert a transformers GPT2Config with ModelConfig.from_hf_config(config)"
            )
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        platform = platform or jax.default_backend()
        self.config = config
        self.platform = platform
        self.dtype = compute_dtype(config.dtype, platform)
        self.remat = config.remat
        self.unroll = unroll_layers(platform, config.n_layer)
        self.vocab_size = config.vocab_size
        vp = padded_vocab_size(config.vocab_size, config.vocab_multiple)
        std = config.initializer_range
        self.wte = Embedding(vp, config.n_embd, std, ("vocab", "embed"), rngs, used_rows=config.vocab_size)
        self.wpe = Embedding(config.n_positions, config.n_embd, std, ("pos", "embed"), rngs)
        self.embd_rate = config.dropout

        @nnx.split_rngs(splits=config.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs, flat_qkv(platform))

        self.h = make_blocks(rngs)
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, rngs)

    def __call__(
        self,
        input_ids: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        dropout_key: Array | None = None,
    ) -> Array:
        """Logits (B, T, vocab_size) in float32.

        positions: (B, T) position ids, default 0..T-1. segment_ids: (B, T) document ids of packed
        rows; attention never crosses documents. dropout_key: a PRNG key turns dropout on (training);
        None means deterministic (evaluation, generation).
        """
        b, t = input_ids.shape
        if t > self.config.n_positions:
            raise ConfigError(
                f"sequence length {t} exceeds the context n_positions={self.config.n_positions}"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        rate = self.config.dropout if dropout_key is not None else 0.0
        impl = attention_implementation(
            self.config, self.platform, t, dropout=rate, packed=segment_ids is not None
        ).impl
        masking = Masking(impl, interpret=self.platform != "tpu")
        # Plain causal rows: the attention builds (or fuses) the causal mask itself.
        if impl == "splash":  # packed rows: the kernel masks by segment ids itself
            masking = masking._replace(segment_ids=segment_ids)
        elif segment_ids is not None:  # packed rows, explicit path: (B, 1, T, T) allowed pairs
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
            same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            masking = masking._replace(mask=causal & same_doc)
        x = self._embed(input_ids, positions)  # (B*T, C), 2-D activations through the blocks
        keys = None
        if dropout_key is not None:
            k_embd, k_blocks = jax.random.split(dropout_key)
            x = dropout(x, self.embd_rate, k_embd)
            keys = jax.random.split(k_blocks, (self.config.n_layer, 3))  # 3 dropouts per block
        x = self._blocks(x, masking, (b, t), keys)
        return self._logits(self.ln_f(x)).reshape(b, t, self.vocab_size)

    def _embed(self, input_ids: Array, positions: Array) -> Array:
        x = self.wte.embedding[...][input_ids] + self.wpe.embedding[...][positions]  # (B, T, C)
        return x.reshape(-1, x.shape[-1]).astype(self.dtype)

    def _logits(self, x: Array) -> Array:
        # Tied head: logits = x @ wte[:V]^T in float32. The padding rows are cut from the weight, not
        # from the logits: slicing (B*T, V') logits costs a copy forward and a pad backward (XLA:CPU
        # head step 27 ms -> 19 ms at V=2000, B*T=2048).
        wte = self.wte.embedding[...][: self.vocab_size]
        return jnp.dot(x, wte.astype(x.dtype).T, preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, slots: int, per_layer: bool = False) -> KVCache:
        """An empty KV cache of `slots` token slots per row, in the compute dtype: stacked (L, B, H,
        S, D), or L arrays of (B, H, S, D) for the per-layer decode."""
        c = self.config
        if per_layer:
            zeros = jnp.zeros((batch, c.n_head, slots, c.n_embd // c.n_head), self.dtype)
            zeros = constrain(zeros, ("batch", "heads", None, None))
            return KVCache((zeros,) * c.n_layer, (zeros,) * c.n_layer)
        zeros = jnp.zeros((c.n_layer, batch, c.n_head, slots, c.n_embd // c.n_head), self.dtype)
        zeros = constrain(zeros, ("layers", "batch", "heads", None, None))
        return KVCache(zeros, zeros)

    def decode(
        self,
        input_ids: Array,
        positions: Array,
        cache: KVCache,
        index: Array | int,
        kv_valid: Array,
        layers: Sequence[Any] | None = None,
    ) -> tuple[Array, KVCache]:
        """The forward of generation: T new tokens (B, T) at cache slots [index, index + T).

        positions: (B, T) their position ids; kv_valid: (B, S) which cache slots hold a row's real
        tokens (left padding does not). A token attends to the valid slots before `index` and to the
        valid new tokens up to itself. index=0 (a Python int) is a prefill: the cache is not read.
        layers: the blocks' weights as `split_layers` states, with a per-layer cache (XLA:CPU, see
        `decode_layers_apart`); None scans the stacked parameters and cache.
        Returns float32 logits (B, vocab_size) of the last new token, and the cache holding the new
        keys and values: the same math as `__call__`, without recomputing the prefix.
        """
        b, t = input_ids.shape
        slots = (cache.k[0] if layers is not None else cache.k).shape[-2]
        x = self._embed(input_ids, positions)
        new_valid = jax.lax.dynamic_slice_in_dim(kv_valid, index, t, axis=1)  # (B, T)
        new_mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & new_valid[:, None, None, :]
        cache_mask = None
        if not (isinstance(index, int) and index == 0):
            cache_mask = ((jnp.arange(slots) < index)[None, :] & kv_valid)[:, None, None, :]  # (B,1,1,S)

        def body(x: Array, block: Block, k: Array, v: Array) -> tuple[Array, tuple[Array, Array]]:
            x, k_new, v_new = block.decode(
                constrain(x, ("batch", None)), (b, t), k, v, index, (cache_mask, new_mask), layers is not None
            )
            return x, (k_new, v_new)

        # One in-place write of the T new slots per layer: the while_loop carrying the cache
        # updates its buffer instead of copying it every token.
        write = lambda c, new, at: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), at)
        if layers is not None:
            graphdef, new = nnx.graphdef(self.h), []
            for state, k, v in zip(layers, cache.k, cache.v, strict=True):
                x, kv = body(x, nnx.merge(graphdef, state), k, v)
                new.append(kv)
            at = (0, 0, index, 0)
            ks = tuple(write(c, n, at) for c, (n, _) in zip(cache.k, new, strict=True))
            cache = KVCache(ks, tuple(write(c, n, at) for c, (_, n) in zip(cache.v, new, strict=True)))
        else:
            scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
            x, (k_new, v_new) = scan(x, self.h, cache.k, cache.v)  # new k, v: (L, B, H, T, D)
            at = (0, 0, 0, index, 0)
            cache = KVCache(write(cache.k, k_new, at), write(cache.v, v_new, at))
        last = self.ln_f(x.reshape(b, t, -1)[:, -1])  # (B, C): only the last token's logits are sampled
        # Here the few logits are cut, not the weight: XLA:CPU copied wte[:V] every token (GPT-2 124M:
        # a 154 MB copy per token; the logits are (B, V')). wte is (V', C), already (out, in).
        wte = self.wte.embedding[...].astype(last.dtype)
        if layers is not None:  # XLA:CPU (`decode_layers_apart`): see `times_transposed`
            logits = times_transposed(last, wte, jnp.float32)
        else:
            logits = jnp.dot(last, wte.T, preferred_element_type=jnp.float32)
        return logits[:, : self.vocab_size], cache

    def _blocks(self, x: Array, masking: Masking, shape: tuple[int, int], keys: Array | None) -> Array:
        def body(x: Array, block: Block, layer_keys: Array | None) -> Array:
            # The one activation constraint per block: rows over the data axes, features whole.
            return block(constrain(x, ("batch", None)), masking, shape, layer_keys)

        if self.remat != "none":
            body = nnx.remat(body, policy=_REMAT_POLICIES[self.remat])
        scan = nnx.scan(
            body,
            in_axes=(nnx.Carry, 0, 0 if keys is not None else None),
            out_axes=nnx.Carry,
            unroll=True if self.unroll else 1,
        )
        return scan(x, self.h, keys)


def count_params(model: GPT2LMHeadModel) -> int:
    """Parameters as Hugging Face counts them (true vocabulary, tied head counted once)."""
    state = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(state))
    pad = model.wte.embedding.shape[0] - model.vocab_size
    return total - pad * model.config.n_embd


def build_gpt2_config(
    vocab_size: int = 5000,
    max_length: int = 1024,
    dropout: float = 0.0,
    n_embd: int = 768,
    n_layer: int = 12,
    n_head: int = 12,
    eos_token_id: int = 0,
    **kwargs: Any,
) -> Any:
    """The seed document's `transformers.GPT2Config`: n_positions = max_length, every dropout =
    dropout, bos/eos = the `<|endoftext|>` id (0 for tokenizers made by `train_tokenizer`). It is
    checked as the ModelConfig it becomes; other GPT2Config keyword arguments pass through."""
    ours = {k: kwargs.pop(k) for k in ("layer_norm_epsilon", "initializer_range") if k in kwargs}
    model = ModelConfig(
        vocab_size=vocab_size,
        n_positions=max_length,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        dropout=dropout,
        **ours,
    )
    return model.to_hf_config(eos_token_id, **kwargs)
