"""The seed walkthrough through the GPT2 facade: output folder, reloading, clear errors for bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import InterruptedAt, interrupted_at
from flax import nnx
from helpers import assert_same_params, fake_hub, small_config

from gpt2_flax import GPT2, ConfigError, TokenDataset, train_tokenizer
from gpt2_flax.checkpoint import TrainingError
from gpt2_flax.errors import HubError

PROMPT = "ROMEO:"


# ----------------------------------------------------------------------------- the walkthrough


def test_walkthrough_reload_and_generate(trained_run, tokenizer_files) -> None:
    vocab_file, merges_file = tokenizer_files
    out = trained_run.out_dir
    ai = GPT2(
        model=out / "pytorch_model.bin",
        vocab_file=vocab_file,
        merges_file=merges_file,
        config=out / "config.json",
    )
    sample = lambda model, seed: model.generate(
        n=3, prompt=PROMPT, max_length=64, temperature=0.7, top_k=50, seed=seed, return_as_list=True
    )
    texts = sample(ai, 1)
    assert isinstance(texts, list) and len(texts) == 3
    assert all(isinstance(t, str) and t.startswith(PROMPT) and len(t) > len(PROMPT) for t in texts)
    assert sample(ai, 1) == texts  # same seed, same texts
    assert sample(ai, 2) != texts
    assert sample(trained_run.ai, 1) == texts  # the reloaded model samples exactly like the trained one


def test_generate_prints_without_return_as_list(trained_run, capsys: pytest.CaptureFixture) -> None:
    assert trained_run.ai.generate(n=2, prompt=PROMPT, max_length=16, seed=0) is None
    assert capsys.readouterr().out.count(PROMPT) >= 2


def test_model_call_dtypes_and_shapes(trained_run) -> None:
    ai = trained_run.ai
    ids = jnp.asarray(np.arange(2 * 12).reshape(2, 12) % ai.config.vocab_size, dtype=jnp.int32)
    logits = ai.model(ids)
    assert logits.shape == (2, 12, ai.config.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_metrics_jsonl(trained_run) -> None:
    lines = (trained_run.out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    for r in records:
        for key in ("step", "loss", "learning_rate", "tokens_per_s"):
            assert isinstance(r[key], int | float), key
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["learning_rate"] > 0
    assert [r["step"] for r in trained_run.history] == [r["step"] for r in records]
    assert [r["loss"] for r in trained_run.history] == [r["loss"] for r in records]


def test_output_dir_contents(trained_run) -> None:
    names = {p.name for p in trained_run.out_dir.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "checkpoints",
        "metrics.jsonl",
    }
    assert expected <= names, expected - names
    assert (trained_run.out_dir / "checkpoints").is_dir()
    config = json.loads((trained_run.out_dir / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_positions"]) == (2, 32, 32)


@pytest.mark.parametrize("how", ["safetensors", "bin", "folder"])
def test_reload_is_bit_identical(how: str, trained_run, tokenizer_files) -> None:
    out = trained_run.out_dir
    vocab_file, merges_file = tokenizer_files
    if how == "folder":
        ai = GPT2(model_folder=out)
    else:
        weights = out / ("model.safetensors" if how == "safetensors" else "pytorch_model.bin")
        ai = GPT2(model=weights, vocab_file=vocab_file, merges_file=merges_file, config=out / "config.json")
    assert_same_params(ai.model, trained_run.ai.model)
    assert ai.config.to_dict()["n_layer"] == trained_run.ai.config.n_layer


def test_training_continues_from_reloaded_weights(trained_run, dataset, tmp_path: Path) -> None:
    ai = GPT2(model_folder=trained_run.out_dir)
    history = ai.train(
        dataset, batch_size=16, num_steps=10, output_dir=tmp_path / "more", log_every=1, progress=False
    )
    first = history[0]["loss"]
    assert abs(first - trained_run.history[-1]["loss"]) < 0.3
    assert first < math.log(ai.config.vocab_size) - 1.0  # not back at the untrained level
    assert [r["step"] for r in history] == list(range(1, 11))
    assert (tmp_path / "more" / "model.safetensors").is_file()


def test_train_records_the_datas_own_settings(trained_run, tmp_path: Path) -> None:
    # GPT2.train's Config (what run.json records) comes from the dataset as built, not defaults.
    ai = trained_run.ai
    csv = tmp_path / "lines.csv"
    csv.write_text("id,body\n" + "".join(f"{i},ROMEO: the moon doth shine {i}.\n" for i in range(200)))
    data = TokenDataset(
        csv,
        tokenizer=ai.tokenizer,
        block_size=16,
        cache_dir=tmp_path / "c",
        line_by_line=True,
        text_column="body",
    )
    cfg = ai.run_config(data, batch_size=8, num_steps=3)
    assert cfg.data.files == (str(csv),) and cfg.data.block_size == 16
    assert cfg.data.line_by_line and cfg.data.text_column == "body"
    assert cfg.model == ai.model_config and cfg.train.num_steps == 3


# ----------------------------------------------------------------------------- bad input


def test_missing_files(tokenizer_files, tiny_config, tmp_path: Path) -> None:
    vocab_file, merges_file = tokenizer_files
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(missing, vocab_size=300, save_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TokenDataset(missing, vocab_file=vocab_file, merges_file=merges_file, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no-vocab.json"):
        GPT2(vocab_file=tmp_path / "no-vocab.json", merges_file=merges_file, config=tiny_config)
    with pytest.raises(FileNotFoundError, match="no-model.bin"):
        GPT2(
            model=tmp_path / "no-model.bin",
            vocab_file=vocab_file,
            merges_file=merges_file,
            config=tiny_config,
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2(vocab_file=vocab_file, merges_file=merges_file, config=tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no model config"):
        GPT2(vocab_file=vocab_file, merges_file=merges_file)
    with pytest.raises(ConfigError, match="no tokenizer"):
        GPT2(config=tiny_config)


def test_empty_file(tokenizer_files, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(empty, vocab_size=300, save_path=tmp_path)
    vocab_file, merges_file = tokenizer_files
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        TokenDataset(empty, vocab_file=vocab_file, merges_file=merges_file, cache_dir=tmp_path / "c")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t\n")
    with pytest.raises(ValueError, match=r"blank\.txt.*(empty|whitespace)"):
        TokenDataset(blank, vocab_file=vocab_file, merges_file=merges_file, cache_dir=tmp_path / "c")


def test_fewer_tokens_than_one_block(tokenizer_files, tmp_path: Path) -> None:
    vocab_file, merges_file = tokenizer_files
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: The moon.")
    with pytest.raises(ValueError, match=r"short\.txt has only \d+ tokens.*block_size \+ 1 = 33"):
        TokenDataset(short, vocab_file=vocab_file, merges_file=merges_file, block_size=32, cache_dir=tmp_path)


def test_vocab_size_must_match_tokenizer(tokenizer_files, vocab_size: int) -> None:
    vocab_file, merges_file = tokenizer_files
    with pytest.raises(ConfigError, match=rf"vocab_size \({vocab_size + 100}\).*{vocab_size}"):
        GPT2(vocab_file=vocab_file, merges_file=merges_file, config=small_config(vocab_size + 100))


def test_dataset_from_another_tokenizer_is_refused(
    tokenizer_files, tiny_config, corpus_file, tmp_path
) -> None:
    other_vocab, other_merges = train_tokenizer(corpus_file, vocab_size=350, save_path=tmp_path, prefix="o")
    other = TokenDataset(
        corpus_file, vocab_file=other_vocab, merges_file=other_merges, block_size=32, cache_dir=tmp_path
    )
    vocab_file, merges_file = tokenizer_files
    ai = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=tiny_config)
    with pytest.raises(ConfigError, match="350-token tokenizer"):
        ai.train(other, batch_size=16, num_steps=2, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_block_size_larger_than_context(tokenizer_files, tiny_config, corpus_file, tmp_path: Path) -> None:
    vocab_file, merges_file = tokenizer_files
    long_blocks = TokenDataset(
        corpus_file, vocab_file=vocab_file, merges_file=merges_file, block_size=64, cache_dir=tmp_path / "c"
    )
    ai = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=tiny_config)
    with pytest.raises(ConfigError, match=r"block_size \(64\).*n_positions \(32\)"):
        ai.train(long_blocks, batch_size=16, num_steps=2, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_batch_not_divisible_by_devices(trained_run, dataset, tmp_path: Path) -> None:
    ai = GPT2(model_folder=trained_run.out_dir)
    with pytest.raises(ConfigError, match=r"batch_size=12.*8 data-parallel devices.*multiple of 8"):
        ai.train(dataset, batch_size=12, num_steps=2, output_dir=tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"batch_size=16.*grad_accum_steps=4.*multiple of 32"):
        ai.train(
            dataset,
            batch_size=16,
            num_steps=2,
            grad_accum_steps=4,
            output_dir=tmp_path / "o2",
            progress=False,
        )
    with pytest.raises(ConfigError, match="learning_rat"):  # a typo in a keyword names the valid ones
        ai.train(
            dataset, batch_size=16, num_steps=2, learning_rat=1e-3, output_dir=tmp_path / "o3", progress=False
        )


def test_save_pushes_the_export_to_the_hub(trained_run, tmp_path: Path, monkeypatch, capsys) -> None:
    calls = fake_hub(monkeypatch)
    out = trained_run.ai.save(tmp_path / "export", push_to_hub="me/tiny-gpt2")
    (_, repo, exist_ok), (_, repo2, folder, allowed, present) = calls
    assert (repo, exist_ok, repo2, folder) == ("me/tiny-gpt2", True, "me/tiny-gpt2", str(out))
    # The whole export, already written, and nothing else (a run's checkpoints share such folders).
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(allowed) <= set(present)
    assert ".gpt2_flax_export.json" in allowed and "uploaded" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not a Hugging Face Hub repo id"):
        trained_run.ai.save(tmp_path / "never", push_to_hub="me/two/slashes")
    assert not (tmp_path / "never").exists()


def test_push_to_hub_offline_says_the_export_is_complete(trained_run, tmp_path: Path, monkeypatch) -> None:
    calls = fake_hub(monkeypatch, fail=ConnectionError("Failed to resolve 'huggingface.co'"))
    out = tmp_path / "export"
    said = rf"'me/tiny' failed \(ConnectionError: Failed to .*The export in {re.escape(str(out))} is complete"
    with pytest.raises(HubError, match=said):
        trained_run.ai.save(out, push_to_hub="me/tiny")
    assert [c[0] for c in calls] == ["create_repo"]
    assert GPT2(model_folder=out).model_config == trained_run.ai.model_config  # the export is intact
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="'me/tiny': HF_HUB_OFFLINE is on.*is complete; to upload it"):
        trained_run.ai.save(out, push_to_hub="me/tiny")
    assert len(calls) == 1  # offline: the Hub is not even asked


def test_save_refuses_a_folder_holding_another_model(
    trained_run, tokenizer_files, vocab_size, tmp_path
) -> None:
    vocab_file, merges_file = tokenizer_files
    folder = tmp_path / "model"
    GPT2(vocab_file=vocab_file, merges_file=merges_file, config=small_config(vocab_size, n_layer=1)).save(
        folder
    )
    before = (folder / "config.json").read_text()
    with pytest.raises(FileExistsError, match=r"another model.*n_layer.*overwrite=True"):
        trained_run.ai.save(folder)
    assert (folder / "config.json").read_text() == before  # nothing replaced
    trained_run.ai.save(folder, overwrite=True)
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 2
    assert_same_params(GPT2(model_folder=folder).model, trained_run.ai.model)
    trained_run.ai.save(folder)  # the same architecture again: allowed


def test_training_dir_of_another_model_is_refused(
    trained_run, dataset, tokenizer_files, vocab_size, tmp_path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, run_dir)
    vocab_file, merges_file = tokenizer_files
    other = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=small_config(vocab_size, n_embd=64))
    run_json = (run_dir / "run.json").read_text()
    with pytest.raises(
        TrainingError, match=r"(?s)holds a run with other settings.*n_embd 32 -> 64.*overwrite=True"
    ):
        other.train(dataset, batch_size=16, num_steps=70, output_dir=run_dir, progress=False)
    assert (run_dir / "run.json").read_text() == run_json  # the other run is left as it was


def test_training_into_another_models_export_fails_before_training(
    tokenizer_files, vocab_size, dataset, tmp_path
) -> None:
    vocab_file, merges_file = tokenizer_files
    folder = tmp_path / "exported"
    GPT2(vocab_file=vocab_file, merges_file=merges_file, config=small_config(vocab_size, n_layer=1)).save(
        folder
    )
    ai = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=small_config(vocab_size))
    with pytest.raises(FileExistsError, match="another model"):
        ai.train(dataset, batch_size=16, num_steps=10, output_dir=folder, progress=False)
    assert not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()


def test_gpt2_still_usable_after_interrupted_training(
    tokenizer_files, tiny_config, dataset, tmp_path
) -> None:
    vocab_file, merges_file = tokenizer_files
    ai = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=tiny_config)
    # A device-side copy: reading the arrays to the host first would pin their buffers and hide the bug.
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(ai.model, nnx.Param)))
    with interrupted_at(dataset, 2), pytest.raises(InterruptedAt):
        ai.train(dataset, batch_size=16, num_steps=10, output_dir=tmp_path, progress=False)
    after = jax.tree.leaves(nnx.to_pure_dict(nnx.state(ai.model, nnx.Param)))
    assert not [x.shape for x in after if x.is_deleted()], "ai.model's parameter arrays were deleted"
    assert all(np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(before), strict=True))
    assert ai.generate(n=1, prompt=PROMPT, max_length=8, seed=0, return_as_list=True)[0].startswith(PROMPT)
