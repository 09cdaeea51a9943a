"""Export to / import from Hugging Face: logits parity, tied head, tokenizer, pipeline, exact round trips,
and clear errors for weights that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals
from helpers import assert_same_params, flat_params, new_model

from gpt2_flax import GPT2, GPT2LMHeadModel, build_gpt2_config
from gpt2_flax.convert import load_hf_state_dict, read_weights, to_hf_state_dict
from gpt2_flax.errors import DataError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "ROMEO: The moon"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def randomize(model: GPT2LMHeadModel, seed: int) -> GPT2LMHeadModel:
    """Every parameter random (biases, LayerNorms too); the vocabulary padding rows stay zero."""
    state = nnx.state(model, nnx.Param)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    new = {}
    for path, value in flat.items():
        x = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
        if path[-1] == "scale":
            x += 1.0
        if path[0] == "wte":
            x[model.vocab_size :] = 0.0
        new[path] = jnp.asarray(x)
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(new))
    nnx.update(model, state)
    return model


def hf_logits(folder: Path, ids: np.ndarray) -> tuple[np.ndarray, object]:
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(torch.from_numpy(ids).long()).logits.numpy(), hf


@pytest.fixture(scope="module")
def random_export(tokenizer_files, tiny_config, tmp_path_factory: pytest.TempPathFactory):
    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config, seed=3)
    randomize(ai.model, seed=3)
    out = ai.save(tmp_path_factory.mktemp("random_export"))
    return ai, out


@pytest.mark.parametrize("which", ["random", "trained"])
def test_logits_match_transformers(which: str, random_export, trained_run) -> None:
    ai, folder = random_export if which == "random" else (trained_run.ai, trained_run.out_dir)
    texts = [
        PROMPT + " doth shine upon the garden wall. Thy name is sweeter than the stars!",
        "JULIET: My lord, I pray thee, good friend. Fair Verona hath stolen my heart?",
    ]
    ids = np.asarray([e.ids[:16] for e in ai.tokenizer.encode_batch(texts)], dtype=np.int32)
    ours = np.asarray(ai.model(jnp.asarray(ids)))
    theirs, hf = hf_logits(folder, ids)
    assert ours.shape == theirs.shape == (2, 16, ai.config.vocab_size)
    assert np.abs(ours - theirs).max() < 1e-4
    # The head is tied in the exported model: one storage, or at least equal values.
    lm_head, wte = hf.lm_head.weight, hf.transformer.wte.weight
    assert lm_head.data_ptr() == wte.data_ptr() or torch.equal(lm_head, wte)
    assert torch.equal(lm_head, wte)
    np.testing.assert_array_equal(
        wte.detach().numpy(), flat_params(ai.model)["wte.embedding"][: wte.shape[0]]
    )


def test_export_folder_contents_and_bin(random_export) -> None:
    ai, folder = random_export
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    # No temporary export folder left behind; the manifest records which run wrote the files.
    assert [n for n in names if n.startswith(".")] == [".gpt2_flax_export.json"]
    # pytorch_model.bin holds the same tensors as model.safetensors, and lm_head shares wte's storage.
    from safetensors.numpy import load_file

    st = load_file(str(folder / "model.safetensors"))
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert set(sd) == set(st) | {"lm_head.weight"}
    for k, v in st.items():
        assert np.array_equal(sd[k].numpy(), v), k
    assert (
        sd["lm_head.weight"].untyped_storage().data_ptr()
        == sd["transformer.wte.weight"].untyped_storage().data_ptr()
    )
    assert st["transformer.wte.weight"].shape == (ai.config.vocab_size, ai.config.n_embd)  # no padding rows


def test_autotokenizer_encodes_like_ours(random_export, corpus_file: Path) -> None:
    ai, folder = random_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = corpus_file.read_text().splitlines()[:20] + [
        "héllo 日本語 🙂 — tabs\tand  spaces\n\n  end ",
        "<|endoftext|>ROMEO: after a document break",
        "",
    ]
    for text in texts:
        ids = ai.tokenizer.encode(text).ids
        # The export prepends <|endoftext|> (every training document followed one), as GPT2.generate does.
        assert hf_tok(text)["input_ids"] == [ai.eos_token_id, *ids], text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == ai.eos_token_id == 0
    assert hf_tok.model_max_length == ai.config.n_positions


def test_pipeline_generates_text(trained_run) -> None:
    pipe = transformers.pipeline("text-generation", model=str(trained_run.out_dir), device="cpu")
    out = pipe("ROMEO:", max_new_tokens=12, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    assert out[0]["generated_text"].startswith("ROMEO:") and len(out[0]["generated_text"]) > len("ROMEO:")


def test_greedy_generation_matches_transformers(trained_run) -> None:
    ai = trained_run.ai
    ours = ai.generate(n=1, prompt="ROMEO:", max_length=24, temperature=0.0, seed=0, return_as_list=True)[0]
    hf = transformers.GPT2LMHeadModel.from_pretrained(trained_run.out_dir).eval()
    prompt_ids = [ai.eos_token_id, *ai.tokenizer.encode("ROMEO:").ids]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            max_length=25,
            do_sample=False,
            eos_token_id=ai.eos_token_id,
            pad_token_id=ai.eos_token_id,
        )[0].tolist()[1:]
    if ai.eos_token_id in out:
        out = out[: out.index(ai.eos_token_id)]
    assert ours == ai.tokenizer.decode(out) and ours.startswith("ROMEO:")


@pytest.mark.parametrize("source", ["folder", "safetensors", "bin", "state_dict"])
def test_round_trip_is_bit_exact(source: str, random_export, tokenizer_files, tiny_config) -> None:
    ai, folder = random_export
    vocab, merges = tokenizer_files
    if source == "folder":
        back = GPT2(model_folder=folder, seed=11).model
    elif source == "safetensors":
        back = GPT2(
            model=folder / "model.safetensors",
            config=folder / "config.json",
            vocab_file=vocab,
            merges_file=merges,
            seed=11,
        ).model
    elif source == "bin":
        back = GPT2(
            model=folder / "pytorch_model.bin",
            config=tiny_config,
            vocab_file=vocab,
            merges_file=merges,
            seed=11,
        ).model
    else:
        back = randomize(new_model(tiny_config, seed=11), seed=11)
        load_hf_state_dict(back, to_hf_state_dict(ai.model))
    assert_same_params(back, ai.model)
    padding = flat_params(back)["wte.embedding"][tiny_config.vocab_size :]
    assert padding.shape[0] > 0 and not padding.any()


def test_trained_export_round_trip_keeps_padding_zero(trained_run) -> None:
    trained = flat_params(trained_run.ai.model)["wte.embedding"]
    vocab_size = trained_run.ai.config.vocab_size
    assert not trained[vocab_size:].any()  # never trained, never decayed
    back = GPT2(model_folder=trained_run.out_dir)
    assert_same_params(back.model, trained_run.ai.model)


# ----------------------------------------------------------------------------- weights that do not fit


def _state_dict(config, seed: int = 0) -> dict[str, np.ndarray]:
    return to_hf_state_dict(randomize(new_model(config, seed=seed), seed))


def _fresh(config) -> GPT2LMHeadModel:
    return new_model(config)


def test_missing_weight_is_named(tiny_config) -> None:
    sd = _state_dict(tiny_config)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias"):
        load_hf_state_dict(_fresh(tiny_config), sd, source="my.safetensors")


def test_fewer_layers_than_the_config(tiny_config) -> None:
    one_layer = build_gpt2_config(
        vocab_size=tiny_config.vocab_size, max_length=32, n_embd=32, n_layer=1, n_head=4
    )
    with pytest.raises(ValueError, match=r"no weight 'h\.1\."):
        load_hf_state_dict(_fresh(tiny_config), _state_dict(one_layer))
    with pytest.raises(ValueError, match=r"no place for.*h\.1\."):  # more layers than the config
        load_hf_state_dict(_fresh(one_layer), _state_dict(tiny_config))


def test_wrong_shape_is_named(tiny_config) -> None:
    wider = build_gpt2_config(
        vocab_size=tiny_config.vocab_size, max_length=32, n_embd=64, n_layer=2, n_head=4
    )
    with pytest.raises(ValueError, match=r"shape .*64.*expects .*32"):
        load_hf_state_dict(_fresh(tiny_config), _state_dict(wider))


def test_wrong_vocabulary_is_named(tiny_config) -> None:
    bigger = build_gpt2_config(
        vocab_size=tiny_config.vocab_size + 10, max_length=32, n_embd=32, n_layer=2, n_head=4
    )
    with pytest.raises(
        ValueError,
        match=rf"vocabulary of {tiny_config.vocab_size + 10} .*vocab_size={tiny_config.vocab_size}",
    ):
        load_hf_state_dict(_fresh(tiny_config), _state_dict(bigger))


def test_untied_lm_head_is_refused(tiny_config, tmp_path: Path) -> None:
    sd = _state_dict(tiny_config)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 0.5
    with pytest.raises(ValueError, match="untied lm_head"):
        load_hf_state_dict(_fresh(tiny_config), sd)
    # A tied one (equal values) is accepted, with or without the "transformer." prefix.
    sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    model = _fresh(tiny_config)
    load_hf_state_dict(model, {k.removeprefix("transformer."): v for k, v in sd.items()})
    np.testing.assert_array_equal(
        flat_params(model)["wte.embedding"][: tiny_config.vocab_size], sd["lm_head.weight"]
    )
    # and through a .bin file
    sd["lm_head.weight"] = sd["transformer.wte.weight"] * 2
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, tmp_path / "untied.bin")
    with pytest.raises(ValueError, match="untied"):
        load_hf_state_dict(_fresh(tiny_config), read_weights(tmp_path / "untied.bin"), source="untied.bin")


def _touch(path: str) -> None:  # what a malicious pickle would run on load
    Path(path).write_text("pwned")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_bin_is_read_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.bin")
    with pytest.raises(DataError, match="objects other than tensors") as e:
        read_weights(tmp_path / "evil.bin")
    assert "weights_only=False" not in str(e.value)  # never the advice to run the pickle's code
    assert not marker.exists()


def test_missing_weights_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        read_weights(tmp_path)


def test_bin_with_non_tensor_value_gives_value_error(tmp_path: Path) -> None:
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "step": 3}, tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="step"):
        read_weights(tmp_path / "odd.bin")


def test_exported_config_is_plain_hugging_face(random_export) -> None:
    import json

    ai, folder = random_export
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == ai.eos_token_id == 0
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        assert cfg[key] == getattr(ai.config, key), key


def test_the_export_has_a_model_card_and_never_replaces_a_users_readme(trained_run, tmp_path) -> None:
    import yaml

    card = (trained_run.out_dir / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert (
        "| 2 | 32 | 4 | 32 |" in body
        and "GPTLMHeadModel" not in body
        and "GPT2LMHeadModel.from_pretrained" in body
    )
    last = json.loads((trained_run.out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"final training loss {last['loss']:.4f}" in body and "60 steps" in body
    assert "![training loss](loss.png)" in body
    # A README.md that is not ours stays as it is, with overwrite too; the model files are replaced.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    trained_run.ai.save(folder)
    trained_run.ai.save(folder, overwrite=True)
    assert (folder / "README.md").read_text() == "my notes\n" and (folder / "model.safetensors").is_file()
    # Ours, unchanged, is rewritten by the next export of the same model; edited, it is kept.
    fresh = tmp_path / "fresh"
    trained_run.ai.save(fresh)
    assert (fresh / "README.md").read_text().startswith("---\nlibrary_name: transformers")
    (fresh / "README.md").write_text("edited by hand\n")
    trained_run.ai.save(fresh)
    assert (fresh / "README.md").read_text() == "edited by hand\n"
