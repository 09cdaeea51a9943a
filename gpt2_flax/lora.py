"""LoRA: low-rank adapters on the block projections; only they train, the base stays as loaded.

For a target kernel W (L, in, *out) of the stacked blocks (c_attn's out is (3, H, D)) the adapters
are A (L, in, r) and B (L, r, *out), and the model runs with

    W' = W + (alpha / r) * A @ B        (per layer: (in, r) @ (r, out))

A starts like PEFT's (uniform in +-1/sqrt(in)), B at zero, so step 0 is the base model exactly.

The adapters are merged into the weights inside the jitted step rather than run as a side branch
(x @ A @ B): the model keeps one code path (its 2-D matmuls, the fused attention, the scan) and
the merge costs L*in*r*out FLOPs per target, next to B*T*in*out for the matmul itself (GPT-2
124M, B*T = 4096, r = 8: 0.2%). The price: the backward still forms the full weight gradient of
each target (dW', then dA = dW' @ B^T, dB = A^T @ dW'). A step is still cheaper than full
fine-tuning (no gradients for the embeddings, norms and biases, no AdamW over the base): seed
model, r=8, `benchmarks/bench_lora.py`: 1.25x the steps/s; and LoRA saves memory (no gradients or
Adam moments for the base: train state 87 -> 32 MB there) and checkpoint size (adapters and their
moments only, 87 -> 3 MB; the base is kept by reference, `model.init_from`). Dropout on the
adapters' input (PEFT's lora_dropout) needs the side branch and is not offered.

State layout under LoRA: ``TrainState.params = {"base": model parameters, "lora": adapters}``;
the optimizer and the checkpoint see ``params["lora"]`` alone.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gpt2_flax.config import ConfigError, TrainConfig

# The block projections (stacked over layers: one adapter pair per target covers every block).
TARGETS = ("h.attn.c_attn", "h.attn.c_proj", "h.mlp.c_fc", "h.mlp.c_proj")


def enabled(tc: TrainConfig) -> bool:
    return tc.lora_rank > 0


def scale(tc: TrainConfig) -> float:
    return tc.lora_alpha / tc.lora_rank


def targets(params: dict[str, Any], tc: TrainConfig) -> list[str]:
    """The module paths (e.g. "h.mlp.c_fc") whose kernels get adapters: every block projection
    matching one of train.lora_targets (fnmatch). A pattern that matches none is an error."""
    chosen = []
    for pattern in tc.lora_targets:
        hits = [t for t in TARGETS if fnmatch.fnmatchcase(t, pattern)]
        if not hits:
            raise ConfigError(
                f"train.lora_targets: {pattern!r} matches no block projection; LoRA adapts "
                f"{', '.join(TARGETS)} (patterns allowed, e.g. 'h.attn.*')"
            )
        chosen += [t for t in hits if t not in chosen]
    for t in chosen:
        _kernel(params, t)  # (a KeyError here would be a model without that projection)
    return [t for t in TARGETS if t in chosen]


def _kernel(params: dict[str, Any], target: str) -> Any:
    node = params
    for key in target.split("."):
        node = node[key]
    return node["kernel"]


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, value in flat.items():
        node = out
        *parents, leaf = target.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _walk(adapters: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"h.mlp.c_fc": {"lora_a": A, "lora_b": B}, ...} of the nested adapter tree."""
    if "lora_a" in adapters:
        return {prefix: adapters}
    out = {}
    for key, value in adapters.items():
        out.update(_walk(value, f"{prefix}.{key}" if prefix else key))
    return out


def abstract_adapters(params: dict[str, Any], tc: TrainConfig) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings when the kernels have them) of the adapters of `params`
    (concrete or abstract). A follows the kernel's layer and input sharding, B its layer and
    output sharding, so W + A @ B lands where W is without any resharding."""
    r = tc.lora_rank
    flat = {}
    for t in targets(params, tc):
        k = _kernel(params, t)
        n_layers, n_in, *out = k.shape
        sharding_a = sharding_b = getattr(k, "sharding", None)  # (one device: the same)
        if isinstance(sharding_a, NamedSharding):
            spec = tuple(k.sharding.spec) + (None,) * (k.ndim - len(k.sharding.spec))
            sharding_a = NamedSharding(k.sharding.mesh, PartitionSpec(spec[0], spec[1], None))
            sharding_b = NamedSharding(k.sharding.mesh, PartitionSpec(spec[0], None, *spec[2:]))
        flat[t] = {
            "lora_a": jax.ShapeDtypeStruct((n_layers, n_in, r), jnp.float32, sharding=sharding_a),
            "lora_b": jax.ShapeDtypeStruct((n_layers, r, *out), jnp.float32, sharding=sharding_b),
        }
    return _nest(flat)


def init_adapters(abstract: dict[str, Any], seed: int) -> dict[str, Any]:
    """Step 0's adapters, placed as `abstract` says: A uniform in +-1/sqrt(in) (PEFT's
    kaiming_uniform(a=sqrt(5)) bound), B zero. A function of the seed and the target names only."""

    def init() -> dict[str, Any]:
        flat = {}
        for i, (t, ab) in enumerate(sorted(_walk(abstract).items())):
            a = ab["lora_a"]
            bound = 1.0 / math.sqrt(a.shape[1])
            key = jax.random.fold_in(jax.random.key(seed), i)
            flat[t] = {
                "lora_a": jax.random.uniform(key, a.shape, jnp.float32, -bound, bound),
                "lora_b": jnp.zeros(ab["lora_b"].shape, jnp.float32),
            }
        return _nest(flat)

    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(init, out_shardings=shardings)()


def merge(base: dict[str, Any], adapters: dict[str, Any], factor: float) -> dict[str, Any]:
    """The model parameters with W + factor * A @ B in each target kernel (traceable, no copy of
    the parameters that have no adapter)."""
    out = jax.tree.map(lambda x: x, base)  # new containers; the leaves are shared
    for t, ab in _walk(adapters).items():
        node = out
        for key in t.split("."):
            node = node[key]
        delta = jnp.einsum("lir,lr...->li...", ab["lora_a"], ab["lora_b"])
        node["kernel"] = node["kernel"] + (factor * delta).astype(node["kernel"].dtype)
    return out


# ----------------------------------------------------------------------------- PEFT's layout

PEFT_FOLDER = "adapter"  # export/adapter/: PeftModel.from_pretrained(base, "export/adapter")


def peft_files(adapters: dict[str, Any], tc: TrainConfig, base: str | None) -> tuple[dict[str, Any], dict]:
    """The adapters as PEFT writes them for transformers' GPT2LMHeadModel: (the tensors of
    adapter_model.safetensors, adapter_config.json). GPT-2's projections are Conv1D (weight
    (in, out)), so PEFT runs them with fan_in_fan_out: its lora_A is a Linear(in, r) of weight
    (r, in) = A[i].T, lora_B a Linear(r, out) of weight (out, r) = B[i].T, and its delta
    (B A)^T * alpha / r is ours, A[i] @ B[i] * alpha / r."""
    import numpy as np

    from gpt2_flax.convert import to_host  # (every process gathers: a collective on multi-host)

    tensors = {}
    for target, ab in _walk(adapters).items():
        a, b = to_host(ab["lora_a"]), to_host(ab["lora_b"])
        b = b.reshape(b.shape[0], b.shape[1], -1)  # c_attn's (r, 3, H, D) -> (r, 3C)
        module = target.removeprefix("h.")
        for i in range(a.shape[0]):
            name = f"base_model.model.transformer.h.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    modules = "|".join(t.removeprefix("h.").replace(".", r"\.") for t in sorted(_walk(adapters)))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": tc.lora_rank,
        "lora_alpha": tc.lora_alpha,
        "lora_dropout": 0.0,
        "fan_in_fan_out": True,  # GPT-2's Conv1D
        "bias": "none",
        # A regex (PEFT full-matches a string): "c_proj" alone would also pick the other c_proj.
        "target_modules": rf"transformer\.h\.\d+\.({modules})",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    return tensors, config
