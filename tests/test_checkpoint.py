"""Checkpoints that never lose a run: bitwise resume (API and CLI), SIGTERM and SIGKILL, restore
onto another device layout, the keep policy, NaN stops, and failing before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import RESUME_TRAIN
from safetensors.numpy import load_file

from gpt2_flax import GPT2
from gpt2_flax.checkpoint import Checkpointer, CheckpointError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
# warmup 8 puts the warmup boundary inside the second half of a 6 + 6 split; the corpus holds many
# more blocks than 12 x 16 rows, so the split is mid-epoch.
TRAIN = RESUME_TRAIN
STEPS = TRAIN["num_steps"]  # 12


def _fresh(tokenizer_files, tiny_config) -> GPT2:
    vocab, merges = tokenizer_files
    return GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config, seed=0)


def _metrics(out: Path) -> list[dict]:
    # Timing fields differ between runs; everything the model computed must not.
    keep = ("step", "loss", "grad_norm", "learning_rate")
    return [
        {k: r[k] for k in keep} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def _params(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "model.safetensors"))


def _assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit-identical, not merely close


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_files, tiny_config, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _fresh(tokenizer_files, tiny_config).train(dataset, output_dir=out, progress=False, **TRAIN)
    return out


@pytest.mark.parametrize("stop_at", [5, 7], ids=["before-warmup-end", "mid-warmup-last-save-6"])
def test_api_resume_is_bitwise(
    tokenizer_files, tiny_config, dataset, uninterrupted, tmp_path, stop_at
) -> None:
    ai = _fresh(tokenizer_files, tiny_config)
    ai.train(dataset, output_dir=tmp_path, progress=False, stop_at_step=stop_at, **TRAIN)
    assert ai.stopped_early and not (tmp_path / "model.safetensors").exists()  # no export of a partial run
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == stop_at
    # A new process would start from scratch: so does a new GPT2 object (fresh weights, seed 1).
    vocab, merges = tokenizer_files
    again = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config, seed=1)
    again.train(dataset, output_dir=tmp_path, progress=False, **TRAIN)
    _assert_bitwise(_params(tmp_path), _params(uninterrupted))
    assert _metrics(tmp_path) == _metrics(uninterrupted)


def test_stop_right_after_a_periodic_save(
    tokenizer_files, tiny_config, dataset, uninterrupted, tmp_path, monkeypatch
) -> None:
    # A SIGTERM that lands on a save step (save_every=3, stop after step 6): one checkpoint at 6,
    # exit cleanly, and the resumed run still ends bit-identical.
    from gpt2_flax.preemption import StopRequest

    monkeypatch.setattr(StopRequest, "should_stop", lambda self, step: step == 6)
    ai = _fresh(tokenizer_files, tiny_config)
    ai.train(dataset, output_dir=tmp_path, progress=False, **TRAIN)
    assert ai.stopped_early and Checkpointer(tmp_path / "checkpoints").latest_step() == 6
    monkeypatch.undo()
    _fresh(tokenizer_files, tiny_config).train(dataset, output_dir=tmp_path, progress=False, **TRAIN)
    _assert_bitwise(_params(tmp_path), _params(uninterrupted))
    # Resuming with stop_at_step at the checkpoint itself trains nothing and fails nothing.
    again = _fresh(tokenizer_files, tiny_config)
    again.train(dataset, output_dir=tmp_path / "b", progress=False, stop_at_step=3, **TRAIN)
    again.train(dataset, output_dir=tmp_path / "b", progress=False, stop_at_step=3, **TRAIN)
    assert again.stopped_early and Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 3


def test_train_further_after_finishing(tokenizer_files, tiny_config, dataset, uninterrupted) -> None:
    # The finished run's folder refuses the same num_steps, with the ways forward in the message.
    with pytest.raises(TrainingError, match="already holds a run trained to step 12"):
        _fresh(tokenizer_files, tiny_config).train(dataset, output_dir=uninterrupted, progress=False, **TRAIN)


def _cli(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gpt2_flax.cli",
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--no-progress",
        "--samples",
        "0",
        "--train.log_every=1",
        f"--data.cache_dir={out.parent / 'cache'}",
        *extra,
    ]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


CLI_STEPS = ("--train.num_steps=28", "--train.save_every=4")


@pytest.fixture(scope="module")
def cli_reference(corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "straight"
    subprocess.run(_cli(out, corpus_file, *CLI_STEPS), env=ENV, check=True, capture_output=True, timeout=600)
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# One run folder goes through every kind of stop in turn, each resumed by the same command; the
# end must be bitwise the uninterrupted reference (one chain per kind of exit: 3 processes each,
# not 2 per case, since each CLI process costs ~10 s of imports and setup on this machine).


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_cli_stop_at_step_and_sigterm_then_resume_are_bitwise(corpus_file, cli_reference, tmp_path) -> None:
    out = tmp_path / "run"
    args = _cli(out, corpus_file, *CLI_STEPS)
    first = subprocess.run(
        [*args, "--train.stop_at_step=9"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped at step 9" in first.stderr
    # Resumed, then SIGTERM: it saves where it is and exits 0, saying how to go on.
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged(out) >= 13, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from checkpoint step 9" in err and "Run the same command" in err
    step = Checkpointer(out / "checkpoints").latest_step()
    assert step is not None and 13 <= step < 28
    assert subprocess.run(args, env=ENV, capture_output=True, timeout=600).returncode == 0
    _assert_bitwise(_params(out), _params(cli_reference))
    assert _metrics(out) == _metrics(cli_reference)


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_sigkill_during_a_save_and_mid_step_never_breaks_resume(corpus_file, cli_reference, tmp_path) -> None:
    out = tmp_path / "run"
    args = _cli(out, corpus_file, *CLI_STEPS)
    ckpts = out / "checkpoints"
    # Killed the moment step 8's folder appears: Orbax is still writing it (asynchronously).
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: ckpts.exists() and any(p.name.startswith("8") for p in ckpts.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Resumed (from 4, or 8 if it was complete), then killed between saves, mid-step.
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged(out) >= 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint step" in resumed.stderr
    _assert_bitwise(_params(out), _params(cli_reference))
    assert _metrics(out) == _metrics(cli_reference)


def test_keep_policy(tokenizer_files, tiny_config, dataset, tmp_path) -> None:
    _fresh(tokenizer_files, tiny_config).train(
        dataset,
        output_dir=tmp_path,
        progress=False,
        keep_checkpoints=2,
        keep_every=4,
        **{**TRAIN, "save_every": 2},
    )
    # Saved at 2, 4, ..., 12: the last two (10, 12) and every multiple of 4 (4, 8) remain.
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 8, 10, 12]


def test_nan_stops_and_keeps_last_good_checkpoint(tokenizer_files, tiny_config, dataset, tmp_path) -> None:
    ai = _fresh(tokenizer_files, tiny_config)
    # lr 1e6 blows the weights up within a few steps; with save_every=1 a NaN state would be saved
    # at once if it were not checked first.
    with pytest.raises(TrainingError, match="(loss|param_norm) became (nan|inf) by step"):
        ai.train(
            dataset,
            output_dir=tmp_path,
            progress=False,
            **{**TRAIN, "learning_rate": 1e6, "save_every": 1, "warmup_steps": 0, "max_grad_norm": 0.0},
        )
    from gpt2_flax.convert import export_checkpoint

    for step in Checkpointer(tmp_path / "checkpoints").all_steps():  # all that is left is finite
        export_checkpoint(tmp_path, tmp_path / f"e{step}", step=step)
        assert all(np.isfinite(v).all() for v in _params(tmp_path / f"e{step}").values())


def test_fails_before_first_step(tokenizer_files, tiny_config, dataset, tmp_path, monkeypatch) -> None:
    ai = _fresh(tokenizer_files, tiny_config)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write to output_dir"):
        ai.train(dataset, output_dir=blocker / "run", progress=False, **TRAIN)
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match="GiB free but the run needs"):
        ai.train(dataset, output_dir=tmp_path / "full", progress=False, **TRAIN)
    assert not (tmp_path / "full" / "checkpoints").exists()


def _restore_logits(run: Path, mesh: dict[str, int], ids: np.ndarray) -> np.ndarray:
    """Restores the latest checkpoint of `run` onto `mesh` (whatever mesh wrote it) -> logits."""
    from flax import nnx

    from gpt2_flax.config import config_from_dict
    from gpt2_flax.loop import restore
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import build

    cfg = config_from_dict(json.loads((run / "run.json").read_text())["config"])
    cfg = config_from_dict({**cfg.to_dict(), "mesh": mesh})
    model = GPT2LMHeadModel(cfg.model)
    plan = build(model, cfg)
    state = restore(plan, Checkpointer(run / "checkpoints"), model)
    assert state is not None and int(state.step) > 0
    leaf = state.params["h"]["mlp"]["c_fc"]["kernel"]
    assert tuple(leaf.sharding.spec) == (None, "fsdp", "tensor")  # restored onto THIS mesh's layout
    return np.asarray(nnx.merge(plan.graphdef, state.params)(ids))


def _export_logits(run: Path, tmp: Path, ids: np.ndarray) -> np.ndarray:
    from gpt2_flax.convert import export_checkpoint

    out = export_checkpoint(run, tmp / "export")  # parameters only, onto one device
    return np.asarray(GPT2(model_folder=out).model(ids))


def test_restore_onto_other_layouts(tokenizer_files, tiny_config, dataset, cli_reference, tmp_path) -> None:
    ids = dataset.get_batch(0, 8)["input_ids"]
    # Written by an 8-device FSDP run; restored on one device and on 8-way data parallel.
    ai = _fresh(tokenizer_files, tiny_config)
    ai.train(
        dataset,
        output_dir=tmp_path / "fsdp",
        progress=False,
        stop_at_step=6,
        mesh={"data": 1, "fsdp": 8},
        **TRAIN,
    )
    trained = np.asarray(ai.model(ids))
    np.testing.assert_allclose(_export_logits(tmp_path / "fsdp", tmp_path, ids), trained, atol=1e-5)
    np.testing.assert_allclose(_restore_logits(tmp_path / "fsdp", {"data": 8}, ids), trained, atol=1e-5)
    # And the other way: written by a 2-device data-parallel process, restored on 8-way FSDP here.
    ids = np.asarray(ids)[:, :16] % 256  # valid ids for any byte-level vocabulary
    single = _export_logits(cli_reference, tmp_path / "cli", ids)
    np.testing.assert_allclose(_restore_logits(cli_reference, {"data": 1, "fsdp": 8}, ids), single, atol=1e-5)


def test_checkpoint_in_the_old_c_attn_layout_still_resumes(tmp_path) -> None:
    # Checkpoints written before c_attn kept its heads as an axis hold it as HF's (L, C, 3C): a
    # resume after upgrading reads them in that layout and reshapes, bit for bit.
    import jax

    from gpt2_flax.config import load_config
    from gpt2_flax.loop import restore
    from gpt2_flax.model import GPT2LMHeadModel
    from gpt2_flax.train import build, init_state, to_global

    cfg = load_config(
        None,
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        model={"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 300, "n_positions": 16},
        train={"batch_size": 8},
    )
    model = GPT2LMHeadModel(cfg.model)
    plan = build(model, cfg)
    ids = np.random.default_rng(0).integers(0, 300, (8, 17)).astype(np.int32)
    with jax.set_mesh(plan.mesh):  # one step, so Adam's moments are not all zero
        state, _ = plan.step_fn(
            init_state(plan, model), to_global({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, plan.mesh)
        )

    def old_layout(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if "c_attn" in keys and keys[-1] == "kernel":
            return np.asarray(x).reshape(*x.shape[:2], -1)  # (L, C, 3, H, D) -> (L, C, 3C)
        if "c_attn" in keys and keys[-1] == "bias":
            return np.asarray(x).reshape(x.shape[0], -1)
        return np.asarray(x)

    old = jax.tree_util.tree_map_with_path(old_layout, (state.params, state.opt_state))
    assert old[0]["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, *old, {"seed": 42})
    ckpt.wait()
    back = restore(plan, ckpt, model, say=pytest.fail)  # nothing set aside, no warning
    ckpt.close()
    assert back is not None and int(back.step) == 1
    for a, b in zip(
        jax.tree.leaves((state.params, state.opt_state)),
        jax.tree.leaves((back.params, back.opt_state)),
        strict=True,
    ):
        assert a.shape == b.shape and a.sharding == b.sharding
        assert np.array_equal(np.asarray(a), np.asarray(b))
