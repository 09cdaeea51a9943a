"""Shared fixtures: a small generated corpus, a ~400-token tokenizer trained on it, a tiny GPT-2 config.

Eight fake CPU devices are set up before anything imports jax, so `GPT2.train` runs its default
8-way data-parallel mesh here too (batch sizes in the tests are multiples of 8).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# A per-session XLA compilation cache, set in the environment before JAX (or any test module, some
# of which copy os.environ for their subprocesses at import) is loaded: the many identical tiny
# programs compile once, in this process and in the subprocesses (CLI runs, SIGKILL/SIGTERM, the
# 2-process runs). A CLI training compiles its init, train step and sampler otherwise: 30 s -> 10 s
# with the cache on this 2-core machine. An entry a killed process left half-written is read as a
# miss (JAX warns and compiles), so the fault tests stay sound.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="gpt2_flax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import contextlib  # noqa: E402
import random  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

VOCAB_SIZE = 400
BLOCK_SIZE = 32

_SPEAKERS = ["ROMEO", "JULIET", "NURSE", "MERCUTIO", "BENVOLIO", "TYBALT", "FRIAR LAURENCE", "CAPULET"]
_SUBJECTS = ["the moon", "my lord", "the night", "fair Verona", "this love", "the sun", "thy name", "a rose"]
_VERBS = ["doth shine upon", "is sweeter than", "shall not forget", "hath stolen", "will defend", "loves"]
_OBJECTS = ["the garden wall", "my heart", "the sweet morning", "thine eyes", "the stars", "our house"]
_ENDINGS = [".", "!", "?", ", I pray thee.", ", good friend.", ", and so farewell."]


def make_corpus(seed: int = 0, lines: int = 600) -> str:
    """Play-like English text: speaker names, then short sentences from a small grammar."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            sentences.append(f"{subject.capitalize()} {verb} {obj}{rng.choice(_ENDINGS)}")
        out.append(f"{rng.choice(_SPEAKERS)}: {' '.join(sentences)}")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_files(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from gpt2_flax import train_tokenizer

    return train_tokenizer(
        corpus_file, vocab_size=VOCAB_SIZE, save_path=tmp_path_factory.mktemp("tok"), prefix="tiny"
    )


@pytest.fixture(scope="session")
def vocab_size(tokenizer_files: tuple[str, str]) -> int:
    from gpt2_flax import load_tokenizer

    return load_tokenizer(*tokenizer_files).get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="session")
def tiny_config(vocab_size: int):
    from gpt2_flax import build_gpt2_config

    return build_gpt2_config(vocab_size=vocab_size, max_length=BLOCK_SIZE, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="session")
def dataset(corpus_file: Path, tokenizer_files: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    from gpt2_flax import TokenDataset

    vocab, merges = tokenizer_files
    return TokenDataset(
        corpus_file,
        vocab_file=vocab,
        merges_file=merges,
        block_size=BLOCK_SIZE,
        cache_dir=tmp_path_factory.mktemp("token_cache"),
    )


@dataclass
class TrainedRun:
    ai: Any  # the GPT2 after training (and saving again into out_dir); tests must not change it
    history: list[dict[str, Any]]
    out_dir: Path


@pytest.fixture(scope="session")
def trained_run(
    tokenizer_files, tiny_config, dataset, tmp_path_factory: pytest.TempPathFactory
) -> TrainedRun:
    """The seed walkthrough's training half: 60 steps on the 8-way data-parallel mesh, then ai.save
    into the same folder (allowed: it holds this very model)."""
    from gpt2_flax import GPT2

    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    out = tmp_path_factory.mktemp("trained_model")
    history = ai.train(dataset, batch_size=16, num_steps=60, output_dir=out, log_every=10, progress=False)
    ai.save(out)
    return TrainedRun(ai, history, out)


class InterruptedAt(Exception):
    pass


@contextlib.contextmanager
def interrupted_at(dataset, step: int):
    """Within it, asking `dataset` for batch `step` fails, like a Ctrl-C or a preempted VM would."""
    real = dataset.get_batch

    def get_batch(s, *args, **kwargs):
        if s == step:
            raise InterruptedAt(s)
        return real(s, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "get_batch", get_batch)
        yield
