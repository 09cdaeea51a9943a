"""Starting from an existing GPT-2: a folder written by transformers' save_pretrained (issue 13).

The folder is made here, offline: a randomly initialised transformers GPT2LMHeadModel of a tiny
width but GPT-2's real 50257-token vocabulary, whose <|endoftext|> is id 50256 (not 0 as in the
tokenizers gpt2_flax trains), and a GPT-2-style byte-level tokenizer of the same 50257 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_flax import GPT2, ConfigError, cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS_ID = 50256


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's 256 base symbols)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-gpt2")
    byte_tokens = list(bytes_to_unicode().values())  # GPT-2's 256 byte-level symbols, ids 0..255
    vocab = {t: i for i, t in enumerate(byte_tokens)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    while len(vocab) < EOS_ID:  # the rest of GPT-2's merge results: never produced here
        vocab[f"unused{len(vocab)}"] = len(vocab)
    vocab["<|endoftext|>"] = EOS_ID
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)  # writes vocab, merges, tokenizer.json
    tok.save_pretrained(folder)
    config = transformers.GPT2Config(
        vocab_size=EOS_ID + 1,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    return folder


def test_a_transformers_folder_loads_with_its_logits(hf_folder: Path) -> None:
    ai = GPT2(model_folder=hf_folder)
    assert ai.model_config.vocab_size == 50257 and ai.eos_token_id == EOS_ID
    ids = np.array([[EOS_ID, 5, 300, 50255, 7, 1000, 42, EOS_ID]], np.int32)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ai.model(ids)), want, atol=1e-4, rtol=1e-4)
    # Generation starts from <|endoftext|> = 50256, as HF's GPT-2 does.
    assert isinstance(ai.generate_one(prompt="the", max_length=12, seed=0), str)


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_cli_trains_further_from_it(hf_folder: Path, corpus_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(Path(__file__).parents[1] / "configs/tiny.yaml"),
        "--data",
        str(corpus_file),
    ]
    args += ["--output-dir", str(run), "--no-progress", "--samples", "0", f"--model.init_from={hf_folder}"]
    args += [
        "--train.num_steps=4",
        "--train.log_every=1",
        "--train.warmup_steps=0",
        f"--data.cache_dir={tmp_path / 'c'}",
    ]
    assert cli.main(args) == 0
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]  # fine-tuning lowers the loss
    recorded = json.loads((run / "run.json").read_text())["config"]["model"]
    assert (
        recorded["init_from"] == str(hf_folder) and recorded["n_embd"] == 16
    )  # the folder's, not tiny.yaml's
    exported = json.loads((run / "config.json").read_text())
    assert exported["vocab_size"] == 50257 and exported["eos_token_id"] == EOS_ID
    assert not (run / "tokenizer").exists()  # no tokenizer was trained
    hf = transformers.GPT2LMHeadModel.from_pretrained(run)
    assert hf.config.n_layer == 2


def test_bad_init_from_values_are_clear_errors(hf_folder: Path, tmp_path: Path, monkeypatch) -> None:
    from gpt2_flax.api import pretrained_folder

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in hf_folder.iterdir():
        if f.suffix not in (".safetensors", ".bin"):
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor pytorch_model.bin"):
        GPT2(model_folder=no_weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained_folder(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="fetching it from the Hugging Face Hub failed.*local folder"):
        pretrained_folder("openai-community/gpt2-not-here")
    args = [
        "train",
        "--model.init_from",
        str(hf_folder),
        "--data.tokenizer_file",
        str(hf_folder / "tokenizer.json"),
    ]
    assert (
        cli.main(
            [args[0], f"{args[1]}={args[2]}", f"{args[3]}={args[4]}", "--output-dir", str(tmp_path / "r")]
        )
        == 2
    )
    assert not (tmp_path / "r").exists()
