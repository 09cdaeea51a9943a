"""The one training case that every device layout must reproduce (tests/test_sharding.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from conftest import make_corpus

STEPS = 10


def run_case(workdir: str | Path, mesh: dict[str, int], tag: str, **train: Any) -> tuple[list[float], dict]:
    """Trains a tiny GPT-2 for 10 steps on `mesh`; returns logged losses and final parameters (HF names)."""
    from gpt2_flax import GPT2, TokenDataset, build_gpt2_config, train_tokenizer
    from gpt2_flax.convert import to_hf_state_dict

    workdir = Path(workdir)
    corpus = workdir / "corpus.txt"
    if not corpus.exists():  # written by the test before any worker starts
        corpus.write_text(make_corpus(seed=3, lines=300))
    tok_dir = workdir / "tok"
    if not (tok_dir / "case-vocab.json").exists():
        train_tokenizer(corpus, vocab_size=300, save_path=tok_dir, prefix="case")
    vocab, merges = str(tok_dir / "case-vocab.json"), str(tok_dir / "case-merges.txt")
    data = TokenDataset(
        corpus, vocab_file=vocab, merges_file=merges, block_size=16, cache_dir=workdir / "cache"
    )
    config = build_gpt2_config(vocab_size=data.vocab_size, max_length=16, n_embd=32, n_layer=2, n_head=4)
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=config, seed=0)
    history = ai.train(
        data,
        batch_size=16,
        num_steps=STEPS,
        output_dir=workdir / f"run-{tag}",
        mesh=mesh,
        log_every=1,
        learning_rate=3e-3,
        warmup_steps=2,
        progress=False,
        **train,
    )
    return [h["loss"] for h in history], to_hf_state_dict(ai.model)


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
