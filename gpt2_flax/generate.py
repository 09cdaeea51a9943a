"""Generation: one prefill over the prompts, then a KV-cache decode loop, compiled once per shape bucket.

Shapes (B rows, P prompt width, N buffer slots, S cache slots, V vocabulary)::

    buf    (B, N) int32        every row's tokens; prompts left-padded so that all end at slot P
    cache  (L, B, H, S, D)     keys and values of every layer (model.KVCache), S = min(N, n_positions);
                               on CPU L arrays of (B, H, S, D), read with per-layer weights
                               (`model.decode_layers_apart`: a second copy of the block weights,
                               its kernels held as (out, in): `model.times_transposed`)
    start  (B,)                the slot of each row's first real token (its left padding is before)

While the rows are short the cache is too: where it outweighs the weights (small models, large
batches) the decode starts with a cache of a quarter or half of S slots and grows it when it is
full (`cache_phases`), so that a token reads fewer empty slots.

A row's positions are ``slot - start`` and no token attends to padding, so each row computes what
it would alone. That lets a small model's rows on one CPU device run as one program per core at
the same time (`Generator.groups`), each on its share of the rows. B, P and N are rounded up to
powers of two (P >= 8, N >= 64): calls whose shapes fall in the same buckets reuse one compiled
program (`Generator.compilations` counts them).

Past the context (a row longer than n_positions) the window slides over the last n_positions
tokens: when the cache is full it is re-prefilled with the last ``n_positions - window_shift + 1``
tokens at positions 0.. With window_shift=1 (the default) every token past the context is predicted
from exactly the last n_positions tokens, as without a cache, and costs one forward over the window
(a prefill of n_positions tokens instead of a one-token step). A larger shift re-prefills once every
`window_shift` tokens; each token then sees between n_positions - shift + 1 and n_positions tokens.

Logits processors follow Hugging Face's order and semantics: repetition penalty, no-repeat n-grams,
min length (stop tokens suppressed), then greedy (temperature 0) or temperature, top-k, top-p. With
top_k on, the draw is over the top-k candidates (lax.top_k); without, over the whole vocabulary cut
by bisection (no sort: XLA:CPU's sort cost more than a decode step).
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_flax.model import decode_layers_apart, split_layers
from gpt2_flax.sharding import BATCH_AXES, MESH_AXES, _fit

Array = jax.Array
NEG = -jnp.inf


@dataclass(frozen=True)
class Sampling:
    """Per-call settings, traced (changing them never recompiles) except no_repeat_ngram_size and
    top_k's power-of-two bucket (8, 16, 32, ...), which are compiled in."""

    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # keep the k likeliest tokens; 0 = off
    top_p: float = 1.0  # nucleus mass; 1 = off
    repetition_penalty: float = 1.0  # Hugging Face's (CTRL's): 1 = off
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size; 0 = off (compiled in)


@dataclass(frozen=True)
class Rows:
    """One batch of requests, in buffer tokens (a leading <|endoftext|> counts as one)."""

    prompts: Sequence[Sequence[int]]  # each row's prompt ids (at least one)
    totals: Sequence[int]  # each row's length when done: prompt + new tokens
    min_totals: Sequence[int]  # stop tokens are suppressed while a row is shorter than this
    row_ids: Sequence[int]  # per-row random streams: row r's samples depend on (seed, r) only


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def process_logits(logits: Array, seen: Array, banned: Array, suppress: Array, penalty: Array) -> Array:
    """(B, V) float32 logits -> after the repetition penalty on `seen` tokens (B, V), -inf on
    `banned` n-gram completions (B, V) and on `suppress`ed stop tokens (B, V)."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    logits = jnp.where(seen, penalised, logits)
    return jnp.where(banned | suppress, NEG, logits)


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Temperature, then top-k, then top-p (Hugging Face's warpers) on (B, V) logits; excluded
    tokens become -inf. top_k and top_p are traced values (no recompilation when they change).

    No sort: each cut is the smallest logit t whose "mass above t" test passes, found by bisection on
    the float bits (32 passes of compare-and-sum over the vocabulary, exact). XLA:CPU's sort took
    7.1 ms for (8, 5000) logits, the whole decode step 6 ms; the bisection takes well under 1 ms.
    """
    logits = logits / jnp.maximum(temperature, 1e-6)
    keys = _sortable(logits)
    v = logits.shape[-1]

    def top_k_cut(logits: Array) -> Array:  # keep logits >= the k-th largest (ties kept, as HF)
        t = _smallest(lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < top_k, keys.shape[0])
        return jnp.where(keys < t, NEG, logits)

    def top_p_cut(logits: Array) -> Array:  # keep tokens while the probability mass above is < top_p
        probs = jax.nn.softmax(logits, axis=-1)
        above = lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < top_p
        t = _smallest(above, keys.shape[0])
        return jnp.where(keys < t, NEG, logits)

    logits = jax.lax.cond((top_k > 0) & (top_k < v), top_k_cut, lambda x: x, logits)
    return jax.lax.cond(top_p < 1.0, top_p_cut, lambda x: x, logits)


def _sortable(x: Array) -> Array:
    """float32 -> int32 with the same order (negative floats' bits reversed)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _smallest(ok: Any, rows: int) -> Array:
    """(rows, 1) smallest int32 t with ok(t), for ok false below some t and true from there on
    (ok(int32 max) must hold): 32 halvings of the int32 range."""
    lo = jnp.full((rows, 1), jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.full((rows, 1), jnp.iinfo(jnp.int32).max, jnp.int32)

    def halve(_: int, lo_hi: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = lo_hi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        good = ok(mid)
        return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def banned_ngrams(buf: Array, pos: Array, start: Array, n: int, vocab: int) -> Array:
    """(B, V) tokens that would complete an n-gram already in a row (Hugging Face's
    NoRepeatNGramLogitsProcessor), for the token at slot `pos`."""
    b, slots = buf.shape
    m = slots - n + 1  # n-gram start slots 0..m-1
    i = jnp.arange(m)
    match = (i[None] >= start[:, None]) & (i[None] <= pos - n)  # the n-gram lies in [start, pos)
    for j in range(n - 1):
        prev = jax.lax.dynamic_index_in_dim(buf, jnp.maximum(pos - n + 1 + j, 0), 1, keepdims=False)
        match &= buf[:, j : j + m] == prev[:, None]
    toks = jnp.where(match, buf[:, n - 1 : n - 1 + m], vocab)  # vocab = no ban (dropped)
    return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], toks].set(True, mode="drop")


def top_k_candidates(
    logits: Array, temperature: Array, top_k: Array, top_p: Array, cap: int
) -> tuple[Array, Array]:
    """The top-k path of `filter_logits`: (B, cap) scaled logits of the `cap` likeliest tokens, with
    those past top_k (and outside the nucleus) at -inf, and their token ids. cap >= top_k is a
    power of two, compiled in; a draw over these candidates is a draw from the filtered
    distribution (every other token is -inf there), at a fraction of the cost: lax.top_k over
    (8, 5000) takes 0.13 ms where the full-vocabulary cut and draw took ~1.5 ms of a 7.6 ms step."""
    vals, ids = jax.lax.top_k(logits / jnp.maximum(temperature, 1e-6), cap)  # sorted, descending
    kth = jnp.take(vals, jnp.minimum(top_k, cap) - 1, axis=-1)[:, None]
    vals = jnp.where(vals < kth, NEG, vals)  # ties with the k-th are kept, as HF keeps them
    probs = jax.nn.softmax(vals, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(vals, kept - 1, axis=-1)
    return jnp.where((top_p < 1.0) & (vals < cutoff), NEG, vals), ids


def _choose(logits: Array, keys: Array, s: dict[str, Array], cap: int) -> Array:
    """The next token per row: argmax when greedy, else a sample from the filtered distribution
    (over the top `cap` candidates when top_k is on: cap > 0)."""

    def sample(logits: Array) -> Array:
        if cap:
            vals, ids = top_k_candidates(logits, s["temperature"], s["top_k"], s["top_p"], cap)
            pick = jax.vmap(jax.random.categorical)(keys, vals)
            return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        filtered = filter_logits(logits, s["temperature"], s["top_k"], s["top_p"])
        return jax.vmap(jax.random.categorical)(keys, filtered)

    greedy = lambda x: jnp.argmax(x, axis=-1)
    return jax.lax.cond(s["temperature"] <= 0, greedy, sample, logits).astype(jnp.int32)


def _generate(
    graphdef: Any,
    params: Any,
    layers: tuple[Any, ...] | None,
    r: dict[str, Array],
    s: dict[str, Array],
    *,
    width: int,
    ngram: int,
    shift: int,
    cap: int,
) -> tuple[Array, Array]:
    """Prefill r["buf"][:, :width], then sample slots width.. until every row reaches its end or
    emits a stop token. r: per-row arrays (buf, start, end, min_end, row_ids); s: shared scalars and
    the (V,) stop mask; layers: the blocks' weights one array per layer (`model.split_layers`), or
    None to scan the stacked ones. Returns (buf, the first slot not generated)."""
    buf, start, end, min_end = r["buf"], r["start"], r["end"], r["min_end"]
    stop_mask, pad_id = s["stop_mask"], s["pad_id"]
    model = nnx.merge(graphdef, params)
    b, n = buf.shape
    vocab, ctx = model.vocab_size, model.config.n_positions
    slots = min(n, ctx)
    window = max(1, min(ctx - shift + 1, slots))  # tokens a re-prefill keeps (the newest included)
    rows = jnp.arange(b)
    base = jax.random.key(s["seed"])

    def forward(params: Any, ids: Array, positions: Array, cache: Any, index: Any, cstart: Array) -> Any:
        # merged here, not outside: NNX modules may not cross into the loop's trace level
        size = jax.tree.leaves(cache)[0].shape[-2]  # this phase's cache slots
        valid = jnp.arange(size)[None, :] >= cstart[:, None]  # (B, S)
        return nnx.merge(graphdef, params).decode(ids, positions, cache, index, valid, layers)

    slot = jnp.arange(width)[None, :]
    real = slot >= start[:, None]  # (B, P)
    positions = jnp.maximum(slot - start[:, None], 0)
    weight_bytes = _nbytes(params)
    cfg, item = model.config, jnp.dtype(model.dtype).itemsize
    cache_share = 2 * cfg.n_layer * b * slots * cfg.n_embd * item / weight_bytes
    sizes = cache_phases(width, slots, cache_share) if n <= ctx else (slots,)
    cache = model.init_cache(b, sizes[0], per_layer=layers is not None)
    logits, cache = forward(params, buf[:, :width], positions, cache, 0, start)
    seen = jnp.zeros((b, vocab), bool).at[rows[:, None], jnp.where(real, buf[:, :width], vocab)]
    seen = seen.set(True, mode="drop")

    def cond(c: tuple, size: int | None) -> Array:
        going = (c[0] < jnp.max(end)) & ~jnp.all(c[-1])
        return going if size is None else going & (c[3] < size)  # c[3]: the next token's slot

    def body(c: tuple) -> tuple:
        pos, buf, cache, clen, cstart, logits, seen, done = c
        banned = banned_ngrams(buf, pos, start, ngram, vocab) if ngram else jnp.zeros_like(seen)
        suppress = (pos < min_end)[:, None] & stop_mask[None, :]
        logits = process_logits(logits, seen, banned, suppress, s["repetition_penalty"])
        fold = lambda row, t: jax.random.fold_in(jax.random.fold_in(base, row), t)
        keys = jax.vmap(fold)(r["row_ids"], pos - start)  # a row's stream: (seed, row id, its length)
        tok = jnp.where(done, pad_id, _choose(logits, keys, s, cap))
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, pos))
        seen = seen.at[rows, tok].set(True)
        done = done | stop_mask[tok] | (pos + 1 >= end)

        def step(cache: Any, clen: Array, cstart: Array) -> tuple:
            logits, cache = forward(params, tok[:, None], (clen - cstart)[:, None], cache, clen, cstart)
            return logits, cache, clen + 1, cstart

        def reprefill(cache: Any, clen: Array, cstart: Array) -> tuple:
            # The cache is full: rebuild it from the last `window` tokens, at positions from 0.
            offset = pos + 1 - window
            cstart = jnp.maximum(start - offset, 0)
            ids = jax.lax.dynamic_slice(buf, (0, offset), (b, window))
            wpos = jnp.maximum(jnp.arange(window)[None, :] - cstart[:, None], 0)
            logits, cache = forward(params, ids, wpos, cache, 0, cstart)
            return logits, cache, jnp.int32(window), cstart

        if n > ctx:  # static: only programs whose buffer outgrows the context slide
            logits, cache, clen, cstart = jax.lax.cond(clen == slots, reprefill, step, cache, clen, cstart)
        else:
            logits, cache, clen, cstart = step(cache, clen, cstart)
        return pos + 1, buf, cache, clen, cstart, logits, seen, done

    c = (jnp.int32(width), buf, cache, jnp.int32(width), start, logits, seen, end <= width)
    for i, size in enumerate(sizes):  # one loop per cache size; each reads only the slots it may fill
        if i:
            c = (*c[:2], grow(c[2], size), *c[3:])
        c = jax.lax.while_loop(functools.partial(cond, size=size if i + 1 < len(sizes) else None), body, c)
    pos, buf = c[:2]
    return buf, pos


def cache_phases(width: int, slots: int, cache_share: float) -> tuple[int, ...]:
    """The cache sizes one call's decode runs through, each one `while_loop` left when its cache is
    full (the cache then grows, copied once into the next size), so that a token reads fewer empty
    slots: up to three powers of two ending at `slots`, the first at least 64, slots / 4 and one
    more than the prompt. cache_share: the full cache's bytes over the weights' bytes, which every
    step reads too; below 1/2 one size is kept, as growing pays too little for its compile time
    (each size compiles the decode step again). Measured on this project's 2-core CPU, 17-token
    prompt + 128 new tokens (64, 128, 256 slots; BENCHMARKS.md): the seed model at batch 8 (share
    1.1) 1.16x tokens/s, compile 3.6 -> 5.5 s; GPT-2 124M at batch 8 (share 0.3) 1.01x, compile
    4.6 -> 9.1 s."""
    if cache_share < 0.5:
        return (slots,)
    size, sizes = max(64, bucket(width + 1, 1), slots // 4), []
    while size < slots:
        sizes.append(size)
        size *= 2
    return (*sizes, slots)


def grow(cache: Any, size: int) -> Any:
    """A KV cache (every leaf (..., S, D)) padded with empty slots to `size`."""
    pad = lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, size - c.shape[-2]), (0, 0)])
    return jax.tree.map(pad, cache)


_split_layers = jax.jit(split_layers)

SPLIT_WEIGHT_BYTES = 128 * 2**20  # the weights a token's groups may read together (Generator.groups)

# XLA:CPU's default copy insertion copied every per-layer cache buffer twice per token inside the
# decode loop (a dot reads it, a dynamic-update-slice writes it); its region analysis sees that
# the reads come first and copies nothing (seed model, batch 8: 32 -> 0 copies of (8, 8, 256, 32)
# per token). Scoped to generation programs on CPU: training compiles with the defaults.
_CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def mesh_of(params: Any) -> Mesh:
    """The mesh the parameters live on (generation runs where they are, sharded as they are)."""
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES)


@dataclass
class Generator:
    """Compiled generation programs for one model structure, one per shape bucket (reuse it)."""

    graphdef: Any
    window_shift: int = 1
    compilations: int = 0
    compile_seconds: float = 0.0  # total time spent compiling, apart from generating
    threads: int | None = None  # the most groups of rows run at once (`groups`); None: this process's cores

    def __post_init__(self) -> None:
        self._programs: dict[Any, Any] = {}
        self._dims: tuple[int, int] | None = None  # (n_positions, vocab_size), read at the first call
        self._split: tuple[list[weakref.ref], tuple[Any, ...]] | None = None  # (of which weights, layers)

    def __call__(
        self, params: Any, rows: Rows, *, sampling: Sampling, seed: int, stop_ids: Sequence[int], pad_id: int
    ) -> list[np.ndarray]:
        """Each row's tokens after its prompt, up to its end or stop (stop tokens included)."""
        n_rows = len(rows.prompts)
        groups = self.groups(params, n_rows)
        if self._dims is None:
            model = nnx.merge(self.graphdef, params)
            self._dims = (model.config.n_positions, model.vocab_size)
        ctx, vocab = self._dims
        width = min(bucket(max(len(p) for p in rows.prompts), 8), ctx)
        b = bucket(-(-n_rows // groups), 1)  # rows per program: every group runs the same one
        cut = [n_rows * g // groups for g in range(groups + 1)]  # rows cut[g]:cut[g + 1] in group g
        start = np.full(groups * b, width - 1, np.int32)  # dummy rows: one pad token, done at once
        end, min_end = start + 1, start.copy()
        ids = np.zeros(groups * b, np.int32)
        real = np.concatenate([np.arange(b * g, b * g + cut[g + 1] - cut[g]) for g in range(groups)])
        start[real] = [width - len(p) for p in rows.prompts]
        end[real] = start[real] + np.asarray(rows.totals, np.int32)
        min_end[real] = start[real] + np.asarray(rows.min_totals, np.int32)
        ids[real] = rows.row_ids
        n = bucket(int(end.max()), 64)
        buf = np.full((groups * b, n), pad_id, np.int32)
        for i, p in zip(real, rows.prompts, strict=True):
            buf[i, start[i] : width] = p
        stop_mask = np.zeros(vocab, bool)
        stop_mask[list(stop_ids)] = True
        r = {"buf": buf, "start": start, "end": end, "min_end": min_end, "row_ids": ids}
        s = {
            "temperature": np.float32(sampling.temperature),
            "top_k": np.int32(sampling.top_k),
            "top_p": np.float32(sampling.top_p),
            "repetition_penalty": np.float32(sampling.repetition_penalty),
            "seed": np.int32(seed % 2**31),
            "stop_mask": stop_mask,
            "pad_id": np.int32(pad_id),
        }
        cap = bucket(sampling.top_k, 8) if 0 < sampling.top_k < vocab else 0
        cap = cap if cap < vocab else 0  # top-k over (nearly) everything: the full-vocabulary path
        layers = self._layers(params)
        part = lambda g: {k: v[g * b : (g + 1) * b] for k, v in r.items()}
        program, mesh = self._program(params, layers, part(0), s, width, sampling.no_repeat_ngram_size, cap)

        def run(g: int) -> tuple[np.ndarray, int]:
            out, pos = program(params, layers, *_place(part(g), s, mesh))
            return np.asarray(out), int(pos)

        if groups == 1:
            done = [run(0)]
        else:  # each group's program runs in its own thread, at the same time as the others
            with ThreadPoolExecutor(groups) as pool:
                done = list(pool.map(run, range(groups)))
        outs = np.concatenate([out for out, _ in done])
        last = np.repeat([pos for _, pos in done], b)  # the first slot each row's program left
        return [outs[i, width : min(int(end[i]), int(last[i]))] for i in real]

    def groups(self, params: Any, n_rows: int) -> int:
        """How many programs one call's rows run as, at the same time, each on its own thread.
        XLA:CPU splits every op of a program over the cores, and a decode step's ops are small
        (the seed model at batch 8: ~150 ops of 10-80 us a token), so the two threads wait on
        each other: the same program ran 1.2x faster on one core than on two. The rows are
        independent (each computes what it would alone, with its own random stream), so on a
        single CPU device they split into up to one group per core, as long as the groups
        together read at most SPLIT_WEIGHT_BYTES of weights a token (each reads all of them):
        the seed model (30 MB) at batch 2 2.2x, batch 8 1.4x, batch 16 1.7x; GPT-2 124M (496 MB,
        one group) lost, 0.88x at batch 8, being bound by reading its weights."""
        devices = jax.tree.leaves(params)[0].sharding.device_set
        if len(devices) > 1 or next(iter(devices)).platform != "cpu":
            return 1
        weight_bytes = _nbytes(params)
        threads = self.threads or _cores()
        return max(1, min(threads, n_rows, SPLIT_WEIGHT_BYTES // weight_bytes))

    def _layers(self, params: Any) -> tuple[Any, ...] | None:
        """The blocks' weights one array per layer where the platform needs it (`decode_layers_apart`),
        made once per set of weights: the price is a second copy of the block weights (GPT-2 124M:
        340 MB), kept while those weights are alive, so that repeated calls pay no copy; it goes
        when they do (a training run's state moving on, a model dropped) or when new ones come."""
        leaves = jax.tree.leaves(params["h"])
        if not decode_layers_apart(next(iter(leaves[0].devices())).platform):
            return None
        if self._split is None or any(ref() is not x for ref, x in zip(self._split[0], leaves, strict=True)):
            self._split = None  # the old copy goes before the new one is made
            layers = _split_layers(params["h"])
            self._split = ([weakref.ref(x) for x in leaves], layers)
            weakref.finalize(leaves[0], self._forget, id(layers))
        return self._split[1]

    def _forget(self, which: int) -> None:
        if self._split is not None and id(self._split[1]) == which:
            self._split = None

    def _program(
        self, params: Any, layers: Any, r: dict, s: dict, width: int, ngram: int, cap: int
    ) -> tuple[Any, Mesh]:
        mesh = mesh_of(params)
        shardings = jax.tree.map(lambda x: x.sharding, (params, layers))
        key = (r["buf"].shape, width, ngram, cap, self.window_shift, jax.tree.structure((params, layers)),
               tuple(jax.tree.leaves(shardings)))  # fmt: skip
        if key not in self._programs:
            fn = functools.partial(
                _generate, self.graphdef, width=width, ngram=ngram, shift=self.window_shift, cap=cap
            )
            replicated = NamedSharding(mesh, PartitionSpec())
            jitted = jax.jit(
                fn,
                in_shardings=(*shardings, *_shardings(r, s, mesh)),
                out_shardings=(replicated, replicated),  # every process can read the tokens
            )
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):  # traced under the mesh: the model's constraints apply
                lowered = jitted.lower(params, layers, *_place(r, s, mesh))
                on_cpu = mesh.devices.flat[0].platform == "cpu"
                self._programs[key] = lowered.compile(_CPU_OPTIONS if on_cpu else None)
            self.compile_seconds += time.perf_counter() - t0
            self.compilations += 1
        return self._programs[key], mesh


def _nbytes(tree: Any) -> int:
    """The bytes of a tree's arrays (checkpoint.state_bytes is the same sum, but importing it
    would bring Orbax into generation, which never needs it)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shardings(r: dict, s: dict, mesh: Mesh) -> tuple[dict, dict]:
    """Per-row arrays split over the data axes (where the batch divides them); the rest replicated."""
    row = lambda x: NamedSharding(mesh, _fit(PartitionSpec(BATCH_AXES), x.shape, mesh))
    shared = lambda x: NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(row, r), jax.tree.map(shared, s)


def _place(r: dict, s: dict, mesh: Mesh) -> tuple[dict, dict]:
    """Host arrays -> global arrays with the program's shardings (identical on every process)."""
    put = lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda i: np.asarray(x)[i])
    rs, ss = _shardings(r, s, mesh)
    return jax.tree.map(put, r, rs), jax.tree.map(put, s, ss)
