"""Flax <-> Hugging Face PyTorch GPT-2: one rename table, the tied head and vocab padding in one place.

An export folder loads with no gpt2_flax installed::

    config.json  model.safetensors  pytorch_model.bin (with torch)  generation_config.json
    vocab.json  merges.txt  tokenizer.json  tokenizer_config.json

``transformers.GPT2LMHeadModel.from_pretrained(dir)``, ``AutoTokenizer.from_pretrained(dir)`` and
``pipeline("text-generation", model=dir)`` all read it. Files are written to a temporary folder
first and moved into place one by one, each move atomic, so an interrupted export never leaves a
truncated file where a good one stood.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from flax import nnx
from flax.nnx import traversals
from transformers import GPT2Config

from gpt2_flax import model_card
from gpt2_flax.data.remote import file_sha256
from gpt2_flax.errors import DataError, ExportError, spell
from gpt2_flax.model import GPT2LMHeadModel
from gpt2_flax.run_dir import MANIFEST

# Our per-layer path (under the stacked `h`) -> HF name under `transformer.h.{i}.`
_BLOCK_NAMES = {
    "ln_1.scale": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.c_attn.kernel": "attn.c_attn.weight",
    "attn.c_attn.bias": "attn.c_attn.bias",
    "attn.c_proj.kernel": "attn.c_proj.weight",
    "attn.c_proj.bias": "attn.c_proj.bias",
    "ln_2.scale": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.kernel": "mlp.c_fc.weight",
    "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.kernel": "mlp.c_proj.weight",
    "mlp.c_proj.bias": "mlp.c_proj.bias",
}
_TOP_NAMES = {
    "wte.embedding": "transformer.wte.weight",
    "wpe.embedding": "transformer.wpe.weight",
    "ln_f.scale": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
}
# Buffers that HF checkpoints may carry and that hold no learned weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
ARCH_KEYS = ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def _flat_params(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = traversals.flatten_mapping(pure)
    return {".".join(str(p) for p in path): to_host(v) for path, v in flat.items()}


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded over hosts) array as numpy on this process; a collective on multi-host."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Multi-host: every process must take part in the gather, even those that write nothing.
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_hf_state_dict(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """float32 numpy arrays under HF GPT2LMHeadModel names, true vocabulary, no `lm_head` (tied)."""
    flat = _flat_params(model)
    out: dict[str, np.ndarray] = {}
    for ours, theirs in _TOP_NAMES.items():
        out[theirs] = flat[ours]
    out["transformer.wte.weight"] = out["transformer.wte.weight"][: model.vocab_size]
    for ours, theirs in _BLOCK_NAMES.items():
        stacked = _hf_layout(ours, flat[f"h.{ours}"])  # (L, ...)
        for i in range(stacked.shape[0]):
            out[f"transformer.h.{i}.{theirs}"] = stacked[i]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Ours -> HF's shape of a stacked parameter: c_attn (L, C, 3, H, D) -> (L, C, 3C) and
    (L, 3, H, D) -> (L, 3C), the [q|k|v] columns in HF's order (a reshape: no data moves)."""
    if name == "attn.c_attn.kernel":
        return (*shape[:2], math.prod(shape[2:]))
    if name == "attn.c_attn.bias":
        return (shape[0], math.prod(shape[1:]))
    return tuple(shape)


def _hf_layout(name: str, stacked: np.ndarray) -> np.ndarray:
    return stacked.reshape(_hf_shape(name, stacked.shape))


def load_hf_state_dict(model: GPT2LMHeadModel, state_dict: dict[str, Any], source: str = "weights") -> None:
    """Loads HF GPT-2 weights (with or without the `transformer.` prefix) into `model` in place."""
    sd = {k.removeprefix("transformer."): np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    lm_head = sd.pop("lm_head.weight", None)
    flat = _flat_params(model)
    want: dict[str, np.ndarray] = {}
    n_layer = model.config.n_layer
    for ours, theirs in _TOP_NAMES.items():
        want[ours] = _take(sd, theirs.removeprefix("transformer."), source)
    for ours, theirs in _BLOCK_NAMES.items():
        stacked = np.stack([_take(sd, f"h.{i}.{theirs}", source) for i in range(n_layer)])
        ours_shape = flat[f"h.{ours}"].shape
        if _hf_shape(ours, ours_shape) == stacked.shape:
            stacked = stacked.reshape(ours_shape)  # HF's layout -> ours (c_attn); a wrong one is named below
        want[f"h.{ours}"] = stacked
    if sd:
        raise DataError(
            f"{source} holds weights this GPT2Config has no place for: {sorted(sd)[:8]}; "
            "is the config (n_layer, ...) the one these weights were trained with?"
        )
    wte = want["wte.embedding"]
    if lm_head is not None and not np.array_equal(lm_head, wte):
        raise DataError(f"{source} has an untied lm_head; gpt2_flax GPT-2 ties lm_head to wte")
    if wte.shape[0] != model.vocab_size:
        raise DataError(
            f"{source} has a vocabulary of {wte.shape[0]} tokens but the config says "
            f"vocab_size={model.vocab_size}; use the config.json saved with these weights"
        )
    padded = flat["wte.embedding"].shape[0]
    want["wte.embedding"] = np.concatenate([wte, np.zeros((padded - wte.shape[0], wte.shape[1]), np.float32)])
    for name, value in want.items():
        if value.shape != flat[name].shape:
            raise DataError(
                f"{source}: {name} has shape {value.shape}, the config expects {flat[name].shape}; "
                "use the config.json saved with these weights"
            )
    state = nnx.state(model, nnx.Param)
    # Each weight goes where the parameter it replaces lives (GPT2 builds parameters sharded), so
    # a loaded model is placed like a fresh one, not left as host numpy arrays.
    old = traversals.flatten_mapping(nnx.to_pure_dict(state))
    placed = {k: _place_like(want[".".join(map(str, k))], v) for k, v in old.items()}
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(placed))
    nnx.update(model, state)


def _place_like(value: np.ndarray, like: Any) -> Any:
    import jax

    sharding = getattr(like, "sharding", None)
    if sharding is None:
        return value
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _path(name: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _take(sd: dict[str, np.ndarray], key: str, source: str) -> np.ndarray:
    if key not in sd:
        raise DataError(f"{source} has no weight {key!r}; is it a GPT-2 checkpoint for this config?")
    return sd.pop(key)


# ----------------------------------------------------------------------------- files


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """HF weights from `model.safetensors`, `pytorch_model.bin` (torch.load weights_only) or a folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        errors = []
        for file in found:  # a damaged one falls back to the other
            try:
                return read_weights(file)
            except (DataError, ImportError) as e:
                errors.append(str(e))
        raise DataError("; and ".join(errors))
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(
                f"{path} cannot be read as safetensors ({e}): the file is truncated or damaged; "
                "export the model again"
            ) from None
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'gpt2_flax[torch]', or use model.safetensors"
        ) from e
    # weights_only=True: a .bin is a pickle, and only plain tensors may come out of it.
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors, and weights_only refusing other objects
        # torch's own message advises weights_only=False (running the pickle's code): not echoed.
        what = "objects other than tensors" if "weights_only" in str(e) else "a damaged or truncated file"
        raise DataError(
            f"{path} cannot be read as a PyTorch state dict of tensors ({what}: {type(e).__name__}); "
            "gpt2_flax loads only plain tensors from .bin files. Use a model.safetensors, or export "
            "the model again"
        ) from None
    if not isinstance(sd, dict):
        raise DataError(f"{path} is not a state dict (it holds a {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{path} is not a state dict of tensors (non-tensor entries: {bad[:5]})")
    return {k: v.float().numpy() for k, v in sd.items()}


# Names an export writes; a folder holding any of them already holds a model.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "adapter/adapter_model.safetensors",  # a LoRA run's adapters alone, in PEFT's layout
    "adapter/adapter_config.json",
)


def read_manifest(folder: Any) -> dict[str, Any] | None:
    """The record an export leaves: which model lineage wrote it and the sha256 of every file."""
    path = epath.Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def check_export_target(out_dir: Any, lineage: str, config: GPT2Config | None = None) -> None:
    """Refuses a folder that holds another model: one whose files were not all written, unchanged,
    by an export of this lineage (this run, or the model folder this model was loaded from). Its
    config, tokenizer and weights all count: a folder with the same architecture but other weights
    or another tokenizer is another model. Checked before anything is written; nothing is read but
    the manifest and the files it lists."""
    folder = epath.Path(out_dir)
    if "://" in str(out_dir) or not folder.is_dir():
        return
    present = [n for n in EXPORT_FILES if (folder / n).exists()]
    if not present:
        return
    manifest = read_manifest(folder)
    if manifest is None:
        why = f"its {', '.join(present)} were not written by a gpt2_flax export"
    elif manifest.get("lineage") != lineage:
        why = "it was exported from another run or model"
    else:
        files = manifest.get("files", {})
        changed = [n for n in present if n not in files or file_sha256(Path(folder / n)) != files[n]]
        if not changed:
            return
        why = f"{', '.join(changed)} changed since gpt2_flax wrote them"
    arch = ""
    if config is not None and (folder / "config.json").exists():
        try:
            old = json.loads((folder / "config.json").read_text())
            new = config.to_dict()
            diff = {k: (old.get(k), new.get(k)) for k in ARCH_KEYS if old.get(k) != new.get(k)}
            arch = f" (config differs: {diff})" if diff else ""
        except (OSError, json.JSONDecodeError):
            arch = ""
    raise ExportError(
        f"{out_dir} already holds another model: {why}{arch}. Nothing was written. Choose another "
        f"folder, or pass {spell('overwrite', True)} to replace the model files there (other files "
        "in the folder are left alone)"
    )


def export_pretrained(
    model: GPT2LMHeadModel,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    lineage: str | None = None,
    push_to_hub: str | None = None,
    peft: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Writes the PyTorch-ready folder for `model` and its `tokenizers.Tokenizer`. `lineage` names
    where the model comes from (a run id, or the folder it was loaded from): a folder exported
    before with the same lineage, untouched since, is replaced without `overwrite`. push_to_hub:
    then upload the folder to this Hugging Face Hub repo (hub.py). peft: a LoRA run's adapters
    (`lora.peft_files`), also written alone in PEFT's layout to adapter/ (the model files hold
    them merged)."""
    import jax

    from gpt2_flax import hub
    from gpt2_flax.tokenizer import eos_token_id, save_transformers_tokenizer

    if push_to_hub is not None:
        hub.check_repo(push_to_hub, out_dir)  # a bad repo id fails before anything is written
    out_dir = epath.Path(out_dir)
    config = model.config.to_hf_config(eos_token_id(tokenizer))  # the boundary: config.json
    state_dict = to_hf_state_dict(model)  # a collective on multi-host runs: every process gathers
    if jax.process_index() != 0:  # only process 0 writes files
        return out_dir
    lineage = lineage or uuid.uuid4().hex
    if not overwrite:
        check_export_target(out_dir, lineage, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    remote = "://" in str(out_dir)
    old = (read_manifest(out_dir) or {}).get("files", {})
    # Local: a temporary folder beside the target so each os.replace is an atomic rename.
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=None if remote else out_dir))
    try:
        _write_weights(state_dict, tmp)
        config = GPT2Config.from_dict(config.to_dict())
        config.architectures = ["GPT2LMHeadModel"]
        config.save_pretrained(tmp)
        generation_config(config).save_pretrained(tmp)
        save_transformers_tokenizer(tokenizer, tmp, model_max_length=config.n_positions)
        if not remote and model_card.may_write(out_dir, old):  # never a README.md that is not ours
            (tmp / model_card.CARD).write_text(model_card.model_card(config, tokenizer, out_dir))
        if peft is not None:
            _write_peft(*peft, tmp / "adapter")
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        for f in files:
            f.chmod(0o644)  # ordinary permissions (mkstemp-style 0600 otherwise, e.g. safetensors)
        names = {f: f.relative_to(tmp).as_posix() for f in files}  # "adapter/..." for PEFT's files
        manifest = {"lineage": lineage, "files": {names[f]: file_sha256(f) for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / MANIFEST).chmod(0o644)
        names[tmp / MANIFEST] = MANIFEST
        for f in [*files, tmp / MANIFEST]:  # the manifest last: it vouches for the files before it
            if remote:  # object stores replace a whole object at once
                epath.Path(f).copy(out_dir / names[f], overwrite=True)
            else:
                (out_dir / names[f]).parent.mkdir(exist_ok=True)
                os.replace(f, out_dir / names[f])
        # Model files not written now (a .bin from a run that had torch): ours from last time, or,
        # with overwrite, the replaced model's. A stale .bin beside new safetensors is a wrong model.
        stale = (set(old) | (set(EXPORT_FILES) if overwrite else set())) - {model_card.CARD}
        for name in sorted(stale - set(manifest["files"])):
            if (out_dir / name).exists():
                (out_dir / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub is not None:
        # The export's own files, and loss.png: not in the manifest, but the model card shows it.
        sent = [*manifest["files"], MANIFEST, *(["loss.png"] if (out_dir / "loss.png").exists() else [])]
        print(f"gpt2-flax: uploaded {out_dir} to {hub.push_folder(Path(out_dir), push_to_hub, sent)}")
    return out_dir


def _write_peft(tensors: dict[str, Any], config: dict[str, Any], folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def generation_config(config: GPT2Config) -> Any:
    """generation_config.json: bos/eos/pad = <|endoftext|> and GPT2.generate's sampling defaults, so
    `GPT2LMHeadModel.generate` and `pipeline` sample as we do unless told otherwise."""
    from transformers import GenerationConfig

    from gpt2_flax.sampling import GenerateArgs

    d = GenerateArgs()
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,
        do_sample=True,
        temperature=d.temperature,
        top_k=d.top_k,
        top_p=d.top_p,
        max_length=min(d.max_length, config.n_positions),  # HF's GPT-2 cannot pass its context
    )


def _write_weights(sd: dict[str, np.ndarray], folder: Path) -> None:
    from safetensors.numpy import save_file

    # metadata format=pt: transformers refuses safetensors files without it.
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        import torch
    except ImportError:
        return
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}  # owned, writable copies
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: shares storage, no extra bytes
    torch.save(tensors, folder / "pytorch_model.bin")


def _lora_base(init_from: str | None) -> Path:
    from gpt2_flax.api import pretrained_folder

    if init_from is None:  # (GPT2.fit never starts a LoRA run without one)
        raise ExportError("this LoRA run records no base model (model.init_from) to merge into")
    path = Path(init_from).expanduser()
    return path if path.is_file() else pretrained_folder(init_from)


def export_checkpoint(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
) -> Path:
    """Exports a training checkpoint (parameters only: no optimizer state is read) for PyTorch;
    push_to_hub: then upload it to this Hugging Face Hub repo. A LoRA run's checkpoint holds
    adapters: they are merged into its base (model.init_from)."""
    import jax

    from gpt2_flax import lora
    from gpt2_flax.checkpoint import Checkpointer
    from gpt2_flax.config import config_from_dict
    from gpt2_flax.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training output_dir (it has no run.json)")
    run_cfg = config_from_dict(json.loads(run_file.read_text())["config"])
    cfg = run_cfg.model
    tokenizer = load_tokenizer(tokenizer_file=run_dir / "run_tokenizer.json")
    abstract = nnx.eval_shape(lambda: GPT2LMHeadModel(cfg))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    base = target
    if lora.enabled(run_cfg.train):
        target = lora.abstract_adapters(base, run_cfg.train)
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        steps = ckpt.all_steps()
        step = steps[-1] if (step is None and steps) else step
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"{run_dir}/checkpoints has no checkpoint for step {step}; it has {steps}"
            )
        params = ckpt.restore(step, target)["params"]
    finally:
        ckpt.close()
    lineage = json.loads(run_file.read_text()).get("run_id") or f"run:{run_dir.resolve()}"
    peft = None
    if lora.enabled(run_cfg.train):
        peft = lora.peft_files(params, run_cfg.train, cfg.init_from)
        model = nnx.merge(graphdef, jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), base))
        load_hf_state_dict(model, read_weights(_lora_base(cfg.init_from)), source=str(cfg.init_from))
        params = lora.merge(nnx.to_pure_dict(nnx.state(model)), params, lora.scale(run_cfg.train))
    model = nnx.merge(graphdef, params)
    return export_pretrained(
        model, tokenizer, out_dir, overwrite=overwrite, lineage=lineage, push_to_hub=push_to_hub, peft=peft
    )
