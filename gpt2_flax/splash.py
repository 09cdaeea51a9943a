"""Splash attention: the Pallas flash-attention kernel for TPU from `jax.experimental.pallas.ops.tpu`.

The (T, T) scores never leave the chip's VMEM: the kernel walks (block, block) tiles of them with
an online softmax (running max and sum in float32) and skips the tiles the causal mask empties.
`model.attention_implementation` decides when it is used; this file only runs it. Off TPU it runs
in Pallas interpret mode (the tests' numerics check on CPU: slow, exact).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from gpt2_flax.sharding import shard_map_by_name

Array = jax.Array

LANES = 128  # the TPU vector lane width: the kernel's kv compute block must be a multiple of it
BLOCKS = (512, 256, 128)  # tried largest first; 512 is MaxText's default block for its TPU runs
# Bytes of VMEM one grid step may use: half of v5e's 16 MiB default scoped VMEM (v4, v5p: 16 MiB,
# v6e: 32 MiB), leaving the other half for the compiler's double buffering of neighbouring tiles.
VMEM_BUDGET = 8 << 20


def unsupported(t: int) -> str | None:
    """Why the kernel cannot take rows of length `t`, or None if it can."""
    if t % LANES:
        return f"T={t} is not a multiple of {LANES}, the kernel's block granularity"
    return None


def vmem_bytes(block: int, head_dim: int, itemsize: int) -> int:
    """VMEM of one grid step of the dkv backward kernel, the largest of the three (forward, dq,
    dkv): q, k, v and the output gradient (block, D) in the compute dtype, double-buffered; three
    float32 (block, block) tiles (scores, probabilities, their gradient); float32 dk and dv
    accumulators (block, D); logsumexp and the row sums of dO*O broadcast to (block, 128) float32.
    At block 512, D=64, bf16: 4.3 MiB."""
    inputs = 2 * 4 * block * head_dim * itemsize
    return inputs + 3 * 4 * block * block + 2 * 4 * block * head_dim + 2 * 4 * block * LANES


def block_sizes(t: int, head_dim: int, itemsize: int) -> sa.BlockSizes:
    """The largest block of BLOCKS that divides T and keeps a grid step within VMEM_BUDGET, the same
    for q and kv and for the forward and both backward kernels (dq, dkv). GPT-2 (D=64, bf16) at
    T=1024 gets 512: 2 x 2 tiles, the upper-right one skipped by the causal mask. The tile sizes
    change speed, not numerics; they are not timed here (no TPU): MaxText's default is 512 too."""
    fitting = [b for b in BLOCKS if t % b == 0 and vmem_bytes(b, head_dim, itemsize) <= VMEM_BUDGET]
    block = fitting[0] if fitting else LANES
    return sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *, interpret: bool) -> Array:
    """Causal softmax attention, q, k, v (B, T, H, D) -> (B, T, H, D), as `model._attend` computes
    it; segment_ids (B, T) of packed rows: a token sees only earlier tokens of its own document.
    Each device runs the kernel on its own rows and heads (batch over the data axes, heads over
    `tensor`, the same split `Attention._qkv` constrains q, k, v to): on a mesh without shard_map
    the lowering refuses ("Mosaic kernels cannot be automatically partitioned")."""
    b, t, h, d = q.shape
    # The kernel does not scale the scores: scale q instead (1/8 for D=64, a power of two, so in bf16
    # exactly the explicit path's scaling of the float32 scores).
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, T, D): the kernel's layout
    blocks = block_sizes(t, d, q.dtype.itemsize)

    def local(q: Array, k: Array, v: Array, *segments: Array) -> Array:
        # One device's (B', H', T, D): a kernel over its H' heads, mapped over its B' rows.
        mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * q.shape[1])
        kernel = sa.make_splash_mha(
            mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        if not segments:
            return jax.vmap(kernel)(q, k, v)
        packed = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s))
        return jax.vmap(packed)(q, k, v, segments[0])

    qkv_names = ("batch", "heads", None, None)
    args, names = (q, k, v), [qkv_names] * 3
    if segment_ids is not None:
        args, names = (*args, segment_ids), [*names, ("batch", None)]
    y = shard_map_by_name(local, args, names, qkv_names)
    return y.transpose(0, 2, 1, 3)  # (B, T, H, D)


# Matmuls per (block_q, block_kv) tile, each 2 * block_q * block_kv * D FLOPs, by kernel (the
# instruction names of the compiled program): the forward QK^T and PV; the dq kernel recomputes
# QK^T, forms dP = dO V^T and dQ = dS K; the dkv kernel recomputes QK^T and dP and forms
# dV = P^T dO and dK = dS^T Q. XLA's cost analysis counts none of them (a custom call).
KERNEL_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}


def kernel_flops(name: str, b: int, h: int, t: int, d: int, block: int) -> float | None:
    """FLOPs of one causal splash kernel call on (b, h, t, d), or None for a kernel not in
    KERNEL_MATMULS. The kernel skips the tiles the causal mask empties and computes the others in
    full: n(n+1)/2 of n^2 for n = t / block (3/4 at T=1024, block 512; a dense count would be 1,
    the useful work 1/2)."""
    matmuls = next((n for prefix, n in KERNEL_MATMULS.items() if name.startswith(prefix)), None)
    if matmuls is None:
        return None
    n = t // block
    return matmuls * 2.0 * b * h * block * block * d * (n * (n + 1) // 2)
