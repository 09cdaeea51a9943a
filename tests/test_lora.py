"""LoRA: only the adapters train, the base stays bitwise, resume is bitwise, the export is merged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import flat_params

from gpt2_flax import GPT2, ConfigError
from gpt2_flax.checkpoint import CheckpointError
from gpt2_flax.config import TrainConfig
from gpt2_flax.convert import export_checkpoint, read_weights

TARGETS = ("h.attn.c_attn.kernel", "h.attn.c_proj.kernel", "h.mlp.c_fc.kernel", "h.mlp.c_proj.kernel")
LORA = dict(batch_size=16, lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, warmup_steps=0)
LORA.update(log_every=1, progress=False)


def _train(base: Path, dataset, out: Path, **kw) -> tuple[GPT2, list[dict]]:
    ai = GPT2(model_folder=base)
    history = ai.train(dataset, output_dir=out, **{**LORA, **kw})
    return ai, history


@pytest.fixture(scope="module")
def new_text(tokenizer_files, tmp_path_factory: pytest.TempPathFactory):
    """Text the base model never saw, as a fine-tuning corpus is (same tokenizer)."""
    from gpt2_flax import TokenDataset

    root = tmp_path_factory.mktemp("new_text")
    (root / "new.txt").write_text("the king said to the queen that the night is dark and long. " * 300)
    vocab, merges = tokenizer_files
    return TokenDataset(root / "new.txt", vocab_file=vocab, merges_file=merges, block_size=32, cache_dir=root)


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _loss(ai: GPT2, dataset) -> float:
    from gpt2_flax.train import loss_sums

    batch = dataset.get_batch(0, 96, seed=42)  # the rows of the 6 training batches (train.seed)
    total, count = loss_sums(ai.model(np.asarray(batch["input_ids"])), batch)
    return float(total / count)


def test_lora_trains_the_adapters_alone_resumes_bitwise_and_exports_merged(
    trained_run, new_text, tmp_path: Path
) -> None:
    import torch
    import transformers

    base = trained_run.out_dir  # a model of ours, trained: LoRA adapts it
    start = GPT2(model_folder=base)
    before = flat_params(start.model)
    ai, _ = _train(base, new_text, tmp_path / "a", num_steps=6)
    assert _loss(ai, new_text) < _loss(start, new_text) - 0.1  # its 6 batches: 5.92 -> 5.70
    after = flat_params(ai.model)
    for name in before:  # the adapters are merged into the four projections; nothing else moves
        assert np.array_equal(before[name], after[name]) != (name in TARGETS), name
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["config"]["model"]["init_from"] == str(base)  # the base, by reference
    assert run["lora"]["rank"] == 4 and run["lora"]["base_weights"]

    # The checkpoint holds the adapters (and their moments) only, not the base.
    meta = (tmp_path / "a" / "checkpoints" / "6" / "params" / "_METADATA").read_text()
    assert "lora_a" in meta and "lora_b" in meta and "embedding" not in meta and "ln_1" not in meta

    # The export is an ordinary GPT-2 with the adapters merged: transformers computes our logits.
    ids = np.asarray(new_text.get_batch(0, 2, seed=0)["input_ids"])
    ours = np.asarray(ai.model(ids))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "a").eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # ... and the adapters alone, in PEFT's layout, on the untouched base compute them too.
    import peft

    adapter = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(base)
    base_hf = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    with torch.no_grad():
        plain = base_hf(torch.from_numpy(ids).long()).logits.numpy()
        tuned = peft.PeftModel.from_pretrained(base_hf, tmp_path / "a" / "adapter").eval()
        np.testing.assert_allclose(tuned(torch.from_numpy(ids).long()).logits.numpy(), theirs, atol=1e-4)
    assert not np.allclose(plain, theirs, atol=1e-3)  # (the adapters do change the logits)

    # Stopped at 3 and resumed to 6: bitwise the uninterrupted run (the base is loaded again).
    stopped, _ = _train(base, new_text, tmp_path / "b", num_steps=6, stop_at_step=3, save_every=3)
    assert stopped.stopped_early
    # The checkpoint exports too: its adapters merged into the base named in run.json.
    exported = read_weights(export_checkpoint(tmp_path / "b", tmp_path / "b_export"))
    manifest = json.loads((tmp_path / "b_export" / ".gpt2_flax_export.json").read_text())
    assert "adapter/adapter_model.safetensors" in manifest["files"]  # PEFT's files, vouched for
    kernel = flat_params(stopped.model)["h.mlp.c_fc.kernel"][0]
    np.testing.assert_array_equal(exported["transformer.h.0.mlp.c_fc.weight"], kernel)
    kept = _hashes(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"after a LoRA run they hold its adapters merged"):
        stopped.train(new_text, output_dir=tmp_path / "b", num_steps=6, **LORA)  # no base any more
    assert _hashes(tmp_path / "b") == kept
    resumed, history = _train(base, new_text, tmp_path / "b", num_steps=6, save_every=3)
    assert [r["step"] for r in history] == [4, 5, 6]
    for name, value in flat_params(resumed.model).items():
        assert np.array_equal(value, after[name]), name

    # Resuming with other LoRA settings is refused before anything is written.
    kept = _hashes(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"LoRA.*rank"):
        _train(base, new_text, tmp_path / "a", num_steps=8, lora_rank=8)
    assert _hashes(tmp_path / "a") == kept


def test_lora_adapter_targets_and_memory(trained_run, dataset, tmp_path: Path) -> None:
    import jax

    from gpt2_flax.config import Config, DataConfig
    from gpt2_flax.train import build, init_state

    ai = GPT2(model_folder=trained_run.out_dir)
    model_cfg = ai.model_config
    states = {}
    for rank, targets in ((0, ()), (2, ("h.attn.*",))):
        tc = TrainConfig(batch_size=16, lora_rank=rank, **({"lora_targets": targets} if rank else {}))
        cfg = Config(model=model_cfg, data=DataConfig(block_size=dataset.block_size), train=tc)
        states[rank] = init_state(build(ai.model, cfg), ai.model)
    lora = states[2].params["lora"]["h"]
    assert set(lora) == {"attn"} and set(lora["attn"]) == {"c_attn", "c_proj"}
    c, layers, heads = model_cfg.n_embd, model_cfg.n_layer, model_cfg.n_head
    assert lora["attn"]["c_attn"]["lora_a"].shape == (layers, c, 2)
    assert lora["attn"]["c_attn"]["lora_b"].shape == (layers, 2, 3, heads, c // heads)
    assert not np.any(np.asarray(lora["attn"]["c_attn"]["lora_b"]))  # B = 0: step 0 is the base
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    # Adam keeps moments for the adapters only: a full optimizer state is 2x the model.
    assert size(states[2].opt_state) < 2 * size(lora) + 10 < size(states[0].opt_state) / 20
    scale = 8.0 / 2
    assert math.isclose(build(ai.model, cfg).lora_scale, scale)


def test_lora_bad_values(tokenizer_files, tiny_config, trained_run, dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.lora_rank must be >= 0"):
        TrainConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match=r"train.lora_alpha must be a finite number > 0"):
        TrainConfig(lora_rank=4, lora_alpha=float("nan"))
    with pytest.raises(ConfigError, match=r"lora_rank already freezes.*train.freeze_layers"):
        TrainConfig(lora_rank=4, freeze_layers=True)
    with pytest.raises(ConfigError, match=r"lora_targets is empty"):
        TrainConfig(lora_rank=4, lora_targets=())
    vocab, merges = tokenizer_files
    scratch = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)  # random weights
    with pytest.raises(ConfigError, match=r"adapts a pretrained model.*GPT2\(model_folder=\.\.\.\)"):
        scratch.train(dataset, output_dir=tmp_path / "random", num_steps=2, **{**LORA, "progress": False})
    with pytest.raises(ConfigError, match=r"'h\.attn\.q' matches no block projection.*h\.mlp\.c_fc"):
        _train(trained_run.out_dir, dataset, tmp_path / "bad", num_steps=2, lora_targets=("h.attn.q",))
    assert not (tmp_path / "random").exists() and not (tmp_path / "bad").exists()
