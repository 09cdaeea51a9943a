"""The one training case that every device layout must reproduce (tests/test_sharding.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from conftest import make_corpus

STEPS = 10


def run_case(
    workdir: str | Path, mesh: dict[str, int], tag: str, report: bool = False, **train: Any
) -> tuple[list[float], dict]:
    """Trains a tiny GPT-2 for 10 steps on `mesh`; returns logged losses and final parameters (HF names).

    report=True (the 2-process run): no tokenizer or token cache is reused from the 1-device run.
    Each process names its own tokenizer folder (as hosts without a shared disk do) and all share
    one new cache folder; each writes what it trained on to report-<tag>-<process>.json."""
    import jax

    from gpt2_flax import GPT2, TokenDataset, build_gpt2_config, train_tokenizer
    from gpt2_flax.convert import to_hf_state_dict

    workdir = Path(workdir)
    corpus = workdir / "corpus.txt"
    if not corpus.exists():  # written by the test before any worker starts
        corpus.write_text(make_corpus(seed=3, lines=300))
    tok_dir, cache = workdir / "tok", workdir / "cache"
    if report:
        tok_dir, cache = workdir / f"tok-{tag}-p{jax.process_index()}", workdir / f"cache-{tag}"
    if not (tok_dir / "case-vocab.json").exists():
        train_tokenizer(corpus, vocab_size=300, save_path=tok_dir, prefix="case")
    vocab, merges = str(tok_dir / "case-vocab.json"), str(tok_dir / "case-merges.txt")
    data = TokenDataset(corpus, vocab_file=vocab, merges_file=merges, block_size=16, cache_dir=cache)
    if report:
        _report(data, workdir, f"{tag}-{jax.process_index()}", {"vocab_file": vocab, "merges_file": merges})
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


def _report(data: Any, workdir: Path, name: str, tok: dict[str, str]) -> None:
    """What this process trains on (tokenizer fingerprint, cache content digest, global batches of a
    few steps), and more caches: one in a folder of this process's own (both processes encode and
    agree), a saved copy of it loaded with from_cache (they agree), and one of a data copy that
    differs on process 1 (an error on every process); and a tokenizer that process 0 cannot train
    (an error on every process)."""
    from gpt2_flax import TokenDataset, train_tokenizer
    from gpt2_flax.data.cache import cache_digest
    from gpt2_flax.errors import GPT2FlaxError
    from gpt2_flax.tokenizer import tokenizer_fingerprint

    batches = hashlib.sha256()
    for step in (0, 3, STEPS - 1):
        for value in data.get_batch(step, 16, seed=42).values():  # (16, 16): the global batch
            batches.update(np.ascontiguousarray(value).tobytes())
    own = TokenDataset(data.files, block_size=16, cache_dir=workdir / f"cache-own-{name}", **tok)
    saved = TokenDataset.from_cache(own.save_cache(workdir / f"saved-{name}"), block_size=16)  # a copy each
    copy = workdir / f"corpus-{name}.txt"
    copy.write_text(data.files[0].read_text() + ("" if name.endswith("-0") else "one more line\n"))
    try:
        TokenDataset(copy, block_size=16, cache_dir=workdir / f"cache-copy-{name}", **tok)
        mismatch = ""
    except GPT2FlaxError as e:
        mismatch = f"{type(e).__name__}: {e}"
    same = {
        "tokenizer": tokenizer_fingerprint(data.tokenizer),
        "cache": cache_digest(data.cache_entry, data.meta),
        "own_cache": cache_digest(own.cache_entry, own.meta),
        "saved_cache": cache_digest(saved.cache_entry, saved.meta),
        "batches": batches.hexdigest(),
    }
    try:  # process 0 cannot train: every process hears of it
        train_tokenizer(workdir / "missing.txt", vocab_size=300, save_path=workdir / f"tok-bad-{name}")
        failed = ""
    except Exception as e:  # FileNotFoundError on process 0, TrainingError on the others
        failed = f"{type(e).__name__}: {e}"
    report = {"same": same, "mismatch": mismatch, "tokenizer_failure": failed}
    (workdir / f"report-{name}.json").write_text(json.dumps(report))


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
