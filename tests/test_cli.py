"""The gpt2-flax command line: train -> export -> generate on a tiny config, help, config errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import fake_hub

from gpt2_flax import cli
from gpt2_flax.config import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_yaml_config_parses() -> None:
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny.yaml", "seed.yaml", "demo.yaml", "gpt2-124m.yaml"}
    for path in paths:
        assert isinstance(load_config(path), Config), path


def test_demo_yaml_equals_builtin_demo() -> None:
    # `gpt2-flax train` with no --config runs cli.DEMO; configs/demo.yaml documents the same values.
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config(None, **cli.DEMO)


def test_presets_by_name_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/ ships inside the package: `--config seed` (or the README's configs/seed.yaml) reads
    it wherever the command runs; an unknown name lists the presets; an existing file wins."""
    from gpt2_flax.config import PRESETS, presets

    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "configs").glob("*.yaml")
    )
    assert presets() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # no configs/ here
    want = load_config(ROOT / "configs" / "seed.yaml")
    for name in ("seed", "seed.yaml", "configs/seed.yaml"):
        assert load_config(name) == want, name
    assert load_config("gpt2-1.5b") == load_config(ROOT / "configs" / "gpt2-1.5b.yaml")  # a dot in the name
    Path("seed.yaml").write_text("model: {n_layer: 3}\n")  # the user's own file is read first
    assert load_config("seed").model.n_layer == 8 and load_config("seed.yaml").model.n_layer == 3
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for bad in ("sede", "elsewhere/seed.yaml", "seed.yml"):
        with pytest.raises(
            ConfigError, match=f"config file {bad} does not exist.*preset by name: demo, .*seed, tiny"
        ):
            load_config(bad)
    assert cli.main(["train", "--config", "sede"]) != 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written or changed


def test_seed_yaml_is_the_seed_page_model() -> None:
    m = load_config(ROOT / "configs" / "seed.yaml").model
    assert (m.vocab_size, m.n_positions, m.n_embd, m.n_layer, m.n_head, m.dropout) == (
        5000,
        32,
        256,
        8,
        8,
        0.0,
    )


def test_overrides_and_types() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.learning_rate=3e-4", "mesh.data=2"])
    assert cfg.train.learning_rate == 3e-4 and cfg.mesh.data == 2 and cfg.model.n_layer == 2
    assert cli.split_overrides(["--train.seed", "7", "--model.n_layer=3"]) == [
        "train.seed=7",
        "model.n_layer=3",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.learnign_rate=1"], "unknown config key"),
        (["nosuch.key=1"], "unknown config key"),
        (["train.num_steps=many"], "train.num_steps"),
        (["model.n_head=5"], "divisible"),
        (["data.block_size=64"], "block_size"),
        (["train.batch_size=0"], "batch_size"),
        (["train.wandb_mode=offline"], "needs train.wandb_project"),
        (["train.wandb_project=p", "train.wandb_mode=cloud"], "online or offline"),
    ],
)
def test_bad_config_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_help_lists_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpt2_flax.cli", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for key in ("--train.learning_rate", "--model.n_layer", "--mesh.fsdp", "--data.files", "--overwrite"):
        assert key in out.stdout
    # Every config key with its default and its description (the config's own comments).
    assert "--model.n_layer=12\n      transformer blocks" in out.stdout
    assert "--train.lr_schedule='cosine'\n      After warmup: cosine" in out.stdout
    from gpt2_flax.config import field_docs

    for section in (ModelConfig, DataConfig, TrainConfig, MeshConfig):
        docs = field_docs(section)
        assert all(docs.get(f.name) for f in dataclasses.fields(section)), section
    for command in ("train-tokenizer", "generate", "export"):
        sub = subprocess.run([sys.executable, "-m", "gpt2_flax.cli", command, "--help"], capture_output=True)
        assert sub.returncode == 0


def test_cli_error_exits_nonzero_with_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2_flax.cli",
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--data",
            str(tmp_path / "missing.txt"),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "missing.txt" in out.stderr and "error" in out.stderr
    assert cli.main(["train", "--config", "nope.yaml"]) == 2
    assert cli.main(["train", "--train.nosuch=1"]) == 2


def test_train_tokenizer_command(corpus_file: Path, tmp_path: Path) -> None:
    assert (
        cli.main(["train-tokenizer", str(corpus_file), "--vocab-size", "300", "--save-path", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "gpt2_flax-vocab.json").is_file() and (tmp_path / "gpt2_flax-merges.txt").is_file()
    assert (tmp_path / "gpt2_flax.tokenizer.json").is_file()


def test_train_on_a_csv_trains_its_tokenizer_on_the_text_column(tmp_path: Path, monkeypatch) -> None:
    """`gpt2-flax train --data x.csv` without a tokenizer trains it on data.text_column alone, with the
    run's options; stopped right after (the training itself is test_train_export_generate's)."""
    import csv

    from gpt2_flax import api, train_tokenizer
    from gpt2_flax.tokenizer import load_tokenizer, tokenizer_fingerprint

    texts = [f"the cat {w} on a mat" for w in ("sat", "ran", "slept", "sat down")] * 40
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["note", "body"], *(["zzyzx qqq", t] for t in texts)])
    seen = []

    class Stop(Exception):
        pass

    def run_dataset(cfg: Config, files: list[str], tokenizer) -> None:
        seen.append(tokenizer)
        raise Stop

    monkeypatch.setattr(api, "_run_dataset", run_dataset)
    run = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", str(tmp_path / "d.csv")]
    with pytest.raises(Stop):
        cli.main([*args, "--output-dir", str(run), "--data.text_column=body", "--no-progress"])
    vocab = set(seen[0].get_vocab())
    assert "Ġcat" in vocab and not [t for t in vocab if "zz" in t or "qq" in t or "note" in t]
    # The same tokenizer as train_tokenizer on that column with tiny.yaml's sizes; nothing written yet.
    v, m = train_tokenizer(tmp_path / "d.csv", 400, 1, tmp_path / "tok", text_column="body")
    assert tokenizer_fingerprint(seen[0]) == tokenizer_fingerprint(load_tokenizer(v, m))
    assert not run.exists()


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_train_export_generate(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--data",
        str(corpus_file),
        "--output-dir",
        str(run),
        "--no-progress",
        "--samples",
        "2",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "training finished" in printed
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json"):
        assert (run / name).is_file(), name
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
    # run.json records the CLI's own resolved config, data section included (not rebuilt on the way).
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert recorded["data"]["cache_dir"] == str(tmp_path / "cache")
    assert recorded["data"]["files"] == [str(corpus_file)]
    assert recorded["train"]["log_every"] == 5 and recorded["model"]["n_layer"] == 2

    # Export the step-10 checkpoint; it differs from the final weights, and loads in PyTorch.
    assert (
        cli.main(["export", "--checkpoint", str(run), "--step", "10", "--output", str(tmp_path / "e10")]) == 0
    )
    from safetensors.numpy import load_file

    w10 = load_file(str(tmp_path / "e10" / "model.safetensors"))
    w20 = load_file(str(run / "model.safetensors"))
    assert w10.keys() == w20.keys()
    assert not np.array_equal(w10["transformer.h.0.mlp.c_fc.weight"], w20["transformer.h.0.mlp.c_fc.weight"])
    assert cli.main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "e20")]) == 0
    w20b = load_file(str(tmp_path / "e20" / "model.safetensors"))
    assert all(np.array_equal(w20[k], w20b[k]) for k in w20)

    capsys.readouterr()
    assert (
        cli.main(
            [
                "generate",
                "--model-folder",
                str(run),
                "--prompt",
                "ROMEO:",
                "-n",
                "2",
                "--seed",
                "0",
                "--max-length",
                "20",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("ROMEO:") == 2

    # The same run again: already finished -> a clear error, nothing overwritten.
    assert cli.main(args) == 2
    # A different model into the same folder -> refused without --overwrite.
    assert cli.main([*args, "--model.n_layer=3"]) == 2
    assert json.loads((run / "config.json").read_text())["n_layer"] == 2


def test_yaml_holds_only_differences() -> None:
    # Every key in every shipped YAML is a real config key (load_config would raise otherwise) and
    # differs from the default, so a YAML file shows exactly what makes that config special.
    default = Config().to_dict()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for section, values in (yaml.safe_load(path.read_text()) or {}).items():
            for key, value in values.items():
                assert default[section][key] != value, f"{path.name}: {section}.{key} equals the default"


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_encode_then_train_from_cache_with_validation(
    corpus_file: Path, tokenizer_files, tmp_path: Path
) -> None:
    # `encode` tokenizes once (line by line: each line is a document); `train` reads that cache and
    # logs validation loss on a held-out 10%.
    from gpt2_flax import load_tokenizer

    tok_json = tmp_path / "tok.json"
    tok_json.write_text(load_tokenizer(*tokenizer_files).to_str())
    cache = tmp_path / "tokens"
    assert (
        cli.main(
            [
                "encode",
                str(corpus_file),
                "--tokenizer-file",
                str(tok_json),
                "--line-by-line",
                "--output",
                str(cache),
                "--cache-dir",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (cache / "tokens.bin").is_file() and (cache / "tokenizer.json").is_file()
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--output-dir",
        str(run),
        "--no-progress",
        "--samples",
        "0",
        f"--data.from_cache={cache}",
        "--data.validation_split=0.1",
        "--train.eval_every=10",
        "--model.vocab_size=400",
    ]
    assert cli.main(args) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[0]["val_perplexity"] > 1


def test_info_says_what_a_folder_holds(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = trained_run.out_dir
    assert cli.main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: a training run" in out and "n_layer=2, n_embd=32" in out
    assert "step 60 of 60 (finished)" in out and "checkpoints: " in out and "loss: " in out
    assert "export: model.safetensors" in out and "gpt2-flax export --checkpoint" in out
    export = tmp_path / "export"
    shutil.copytree(run, export, ignore=shutil.ignore_patterns("checkpoints", "run.json", "metrics.jsonl"))
    assert cli.main(["info", str(export)]) == 0
    out = capsys.readouterr().out
    assert "an exported model" in out and "written by gpt2_flax" in out and "from_pretrained" in out
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_info_on_a_stopped_run_says_how_far_and_how_to_resume(
    tokenizer_files, tiny_config, dataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from gpt2_flax import GPT2

    vocab, merges = tokenizer_files
    # (num_steps=6 as in test_metrics' trainings: the same train step, compiled once per session)
    GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config).train(
        dataset, batch_size=16, num_steps=6, stop_at_step=2, output_dir=tmp_path, log_every=2, progress=False
    )
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "progress: step 2 of 6 (resumable)" in out
    assert f"checkpoints: 2 in {tmp_path / 'checkpoints'}" in out
    assert "at step 2" in out and "export: none yet" in out
    assert "next: run the same train command (same output_dir) to resume" in out
    assert f"gpt2-flax export --checkpoint {tmp_path} --step 2 --output DIR" in out


def test_export_pushes_to_the_hub_or_says_in_one_line_why_not(
    trained_run, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    calls = fake_hub(monkeypatch)
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(trained_run.out_dir), "--output", str(out), "--push-to-hub", "me/t"]
    assert cli.main(args) == 0
    assert [c[:3] for c in calls] == [("create_repo", "me/t", True), ("upload_folder", "me/t", str(out))]
    assert "uploaded" in capsys.readouterr().out
    fake_hub(monkeypatch, fail=ConnectionError("Failed to establish a new connection"))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-flax export: error: pushing to the Hugging Face Hub repo 'me/t' failed")
    assert err.count("\n") == 1 and f"The export in {out} is complete" in err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_loss_plot_at_the_end_of_a_run_and_on_demand(
    trained_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    pytest.importorskip("matplotlib")
    png = (trained_run.out_dir / "loss.png").read_bytes()  # written when the run finished
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert cli.main(["plot", str(trained_run.out_dir), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the [plot] extra
    assert cli.main(["plot", str(trained_run.out_dir), "--output", str(tmp_path / "x.png")]) == 2
    assert "pip install 'gpt2_flax[plot]'" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
