"""Helpers shared by the test modules (the worker scripts in this folder run as subprocesses)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from flax.nnx import traversals

from gpt2_flax import build_gpt2_config
from gpt2_flax.config import ModelConfig
from gpt2_flax.model import GPT2LMHeadModel

# The bitwise-resume runs' settings (test_checkpoint, test_stream): one set, so their train steps
# compile once per session. Warmup 8 puts the warmup boundary inside the second half of a 6 + 6 split.
RESUME_TRAIN = dict(
    batch_size=16, num_steps=12, log_every=1, save_every=3, warmup_steps=8, learning_rate=3e-3
)


def small_config(vocab_size: int, **kwargs: Any) -> Any:
    """The tests' GPT2Config: 2 layers of 32 features, 4 heads, context 32 (kwargs override)."""
    args = dict(vocab_size=vocab_size, max_length=32, n_embd=32, n_layer=2, n_head=4)
    return build_gpt2_config(**{**args, **kwargs})


def ours(config: Any, **extra: Any) -> ModelConfig:
    """Our ModelConfig of a transformers GPT2Config; extra: dtype, remat, vocab_multiple."""
    return ModelConfig.from_hf_config(config, **extra)


def new_model(config: Any, seed: int = 0, **extra: Any) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel of a GPT2Config (or a ModelConfig), initialised from `seed`."""
    cfg = config if isinstance(config, ModelConfig) else ours(config, **extra)
    return GPT2LMHeadModel(cfg, rngs=nnx.Rngs(seed))


def flat_params(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {".".join(map(str, k)): np.asarray(v) for k, v in traversals.flatten_mapping(pure).items()}


def assert_same_params(a: GPT2LMHeadModel, b: GPT2LMHeadModel) -> None:
    """Bitwise-equal parameters, same names."""
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name


def small_tokenizer(root: Any, text: str, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on `text` (written to root/corpus.txt)."""
    from gpt2_flax import load_tokenizer, train_tokenizer

    (root / "corpus.txt").write_text(text, encoding="utf-8")
    train_tokenizer(root / "corpus.txt", vocab_size=vocab_size, save_path=root, prefix="tiny")
    return load_tokenizer(tokenizer_file=root / "tiny.tokenizer.json")


def fake_hub(monkeypatch: Any, fail: Exception | None = None) -> list[tuple[Any, ...]]:
    """huggingface_hub.HfApi replaced by one that records its calls and uploads nothing (or raises
    `fail` as create_repo would offline). Returns the calls; upload_folder's holds the folder's
    files at upload time."""
    from pathlib import Path

    import huggingface_hub

    calls: list[tuple[Any, ...]] = []

    class FakeHfApi:
        def create_repo(self, repo_id: str, exist_ok: bool = False, **kwargs: Any) -> str:
            calls.append(("create_repo", repo_id, exist_ok))
            if fail is not None:
                raise fail
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id: str, folder_path: str, allow_patterns: Any, **kw: Any) -> None:
            present = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload_folder", repo_id, folder_path, sorted(allow_patterns), present))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return calls


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (and the folder's file list): what must not change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
