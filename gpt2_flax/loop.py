"""The training loop: resume, feed prefetched batches to the jitted step, log, evaluate, save, stop.

Everything here runs on the host around `train.train_step`; the only device syncs are at log
points (metrics), at saves (the NaN check) and at evaluations.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from etils import epath

from gpt2_flax.checkpoint import Checkpointer, TrainingError, state_bytes, trim_metrics
from gpt2_flax.config import Config, TrainConfig
from gpt2_flax.errors import CheckpointError, spell
from gpt2_flax.metrics import (
    MetricsLogger,
    WandbRun,
    append_samples,
    check_wandb,
    flops_per_token,
    run_peak_flops,
    trim_samples,
)
from gpt2_flax.model import GPT2LMHeadModel, count_params
from gpt2_flax.preemption import StopRequest
from gpt2_flax.run_dir import RunDir, data_identity
from gpt2_flax.sharding import agree, process_codes
from gpt2_flax.train import Plan, TrainState, build, init_state, resumed_state, to_global


def restore(
    p: Plan, ckpt: Checkpointer, model: GPT2LMHeadModel, say: Callable[[str], None] = print
) -> TrainState | None:
    """The newest readable checkpoint as a TrainState on this plan's shardings (None: there is
    none). Its step is the checkpoint's name. One that cannot be read (damaged on disk) is moved
    aside, named in a warning, and never deleted. model: the run's model as it started (under
    LoRA the base, which the checkpoint holds by reference only)."""
    if ckpt.latest_step() is None:  # (RunDir.check refused a finished run already)
        return None
    target = p.abstract_state
    for step in reversed(ckpt.all_steps()):
        try:
            out = ckpt.restore(step, p.saved(target.params), target.opt_state)
        except Exception as e:  # Orbax/TensorStore raise many types for a damaged step
            kept = ckpt.set_aside(step)
            say(
                f"gpt2-flax: warning: checkpoint step {step} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); kept as {kept}, resuming from an older one"
            )
            continue
        return resumed_state(p, model, step, out["params"], out["opt_state"])
    say("gpt2-flax: warning: no checkpoint could be read; starting from step 0")
    return None


@dataclass(frozen=True)
class FitResult:
    state: TrainState  # the final one (its step: how far the run got)
    graphdef: Any
    params: Any  # the model's parameters at the end (state.params, LoRA adapters merged in)
    history: list[dict[str, Any]]
    stop_reason: str  # "finished", or "stopped" (a signal or stop_at_step: resume with the same output_dir)
    run_id: str = ""  # run.json's: the lineage of the export

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason != "finished"


def fit(
    model: GPT2LMHeadModel,
    dataset: Any,
    cfg: Config,
    *,
    tokenizer: Any,
    overwrite: bool = False,
    sample_fn: Callable[[Any, int], list[str]] | None = None,
    progress: bool = True,
    tokenizer_files: dict[str, str] | None = None,
) -> FitResult:
    """Trains `model` on `dataset` for cfg.train.num_steps, resuming from output_dir if it can.
    Every check on output_dir (and on the export that will go there) runs before anything is
    written to it; tokenizer_files (a tokenizer trained for this run) are written once they pass."""
    tc = cfg.train
    check_wandb(tc.wandb_project)
    p = build(model, cfg)
    run_dir = _open_run_dir(p, model, dataset, cfg, tokenizer, overwrite, tokenizer_files or {})
    out = epath.Path(str(run_dir.path))
    ckpt = Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every)
    logger = None
    try:
        resumed = restore(p, ckpt, model)
        state = resumed if resumed is not None else init_state(p, model)
        start = int(jax.device_get(state.step))
        trim_metrics(out, start)
        trim_samples(out, start)
        logger = _logger(out, model, dataset, tc, start, progress, run_dir.run_id)
        logger.config(cfg.to_dict(), start)
        if start:
            logger.write(f"gpt2-flax: resuming from checkpoint step {start} in {ckpt.directory}")
        with StopRequest() as stop, jax.set_mesh(p.mesh):  # every jitted call traces under the mesh
            run = _Run(p, dataset, tc, ckpt, logger, stop, sample_fn, run_dir)
            state, history, stopped = _loop(run, state)
        final = int(jax.device_get(state.step))
        _still_ours(run_dir)
        _save(p, ckpt, final, state, force=True)
        ckpt.wait()  # the last checkpoint is complete before we return (or the process exits)
        logger.write(logger.summary())
        if stopped:
            logger.write(
                f"gpt2-flax: stopped at step {final}; checkpoint written to {ckpt.directory}. "
                "Run the same command (same output_dir) to resume."
            )
    finally:
        if logger is not None:  # also after an error: the last TensorBoard events are flushed
            logger.close()
        ckpt.close()
        run_dir.close()
    reason = "stopped" if stopped else "finished"
    return FitResult(state, p.graphdef, p.merge_fn(state.params), history, reason, run_dir.run_id)


def _open_run_dir(
    p: Plan,
    model: GPT2LMHeadModel,
    dataset: Any,
    cfg: Config,
    tokenizer: Any,
    overwrite: bool,
    tokenizer_files: dict[str, str],
) -> RunDir:
    """Checks output_dir (and the export target) on every process, agrees, then process 0 takes
    the folder (lock, run.json, tokenizer files)."""
    from gpt2_flax.convert import check_export_target
    from gpt2_flax.tokenizer import tokenizer_fingerprint

    run_dir = RunDir(cfg.train.output_dir, overwrite=overwrite, take_over=cfg.train.take_over_lock)
    data = data_identity(dataset)
    writer = jax.process_index() == 0
    refused = None
    try:
        run_dir.check(
            cfg,
            tokenizer_fingerprint(tokenizer),
            data,
            checkpoint_bytes=state_bytes(p.abstract_state),
            # The export: safetensors + pytorch_model.bin, the parameters in float32 each.
            export_bytes=2 * state_bytes(p.abstract_state.params),
            primary=writer,
        )
        if not overwrite:
            check_export_target(cfg.train.output_dir, run_dir.run_id, model.config.to_hf_config())
    except Exception as e:  # all processes go on together or stop together
        refused = e
    run_dir.run_id = agree(refused, run_dir.run_id)
    failed = None
    if writer:
        for note in run_dir.notes:
            print(note)
        try:
            run_dir.open(cfg, tokenizer, data, tokenizer_files)
        except Exception as e:
            failed = e
    # Also a barrier: no process looks for checkpoints before an overwrite has removed the old ones.
    agree(failed, "")
    return run_dir


def _logger(
    out: epath.Path,
    model: GPT2LMHeadModel,
    dataset: Any,
    tc: TrainConfig,
    start: int,
    progress: bool,
    run_id: str,
) -> MetricsLogger:
    tokens_per_step = tc.batch_size * dataset.block_size
    flops = flops_per_token(
        count_params(model), model.config.n_layer, model.config.n_embd, dataset.block_size
    )
    return MetricsLogger(
        out,
        tc.num_steps,
        start,
        tokens_per_step,
        flops * tokens_per_step,
        enabled=jax.process_index() == 0,
        progress=progress,
        peak_flops=run_peak_flops(tc.peak_flops)[0],
        tensorboard=tc.tensorboard,
        wandb=WandbRun(tc.wandb_project, tc.wandb_mode, run_id) if tc.wandb_project else None,
    )


@dataclass
class _Run:
    """What the step loop works with, bundled (the loop body is long enough without 10 arguments)."""

    plan: Plan
    dataset: Any
    tc: TrainConfig
    ckpt: Checkpointer
    logger: MetricsLogger
    stop: StopRequest
    sample_fn: Callable[[Any, int], list[str]] | None
    run_dir: RunDir


def _loop(run: _Run, state: TrainState) -> tuple[TrainState, list[dict[str, Any]], bool]:
    """Feeds prefetched batches to the steps. Returns (final state, history, stopped early)."""
    tc = run.tc
    start = int(jax.device_get(state.step))
    end = min(tc.num_steps, tc.stop_at_step or tc.num_steps)
    # A background thread prepares the next batches (numpy only) while the device computes.
    batches = run.dataset.iter_batches(
        tc.batch_size,
        seed=tc.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_steps=end - start,
        prefetch=2,
    )
    guarded = _AgreedBatches(batches, end > start)
    try:
        state, history, stopped = _steps(run, state, guarded, start, end)
        guarded.check(int(jax.device_get(state.step)))  # before the final checkpoint
    finally:
        if hasattr(batches, "close"):
            batches.close()
    return state, history, stopped or end < tc.num_steps


class _AgreedBatches:
    """The batches, made safe to fail on one process of many. A process whose data fails at once (its
    part of a stream is empty, a file is unreadable) stops every process with its message (the first
    batch is read and agreed here), instead of leaving the others in the first step's collective until
    jax.distributed aborts them without one. A failure later keeps the process stepping on its last
    good batch, so that the collectives go on, until the next `check`, where every process stops
    together; the loop checks before every log, checkpoint and stop, so no state trained on a repeated
    batch is ever saved or logged. One process: a failure raises at once."""

    def __init__(self, batches: Any, expected: bool):
        self._it, self._last, self._error = iter(batches), None, None
        self._checked = -1  # the last step agreed on: one agreement per step
        self._first: list[Any] = []
        if not expected:
            return
        error = None
        try:
            self._first = [next(self._it)]
        except StopIteration:
            self._it = iter(())  # no batch where steps were due: _steps' strict zip says so
        except Exception as e:
            error = e
        agree(error, "", "could not read its first batch")

    def __iter__(self) -> _AgreedBatches:
        return self

    def __next__(self) -> Any:
        if self._first:
            self._last = self._first.pop()
            return self._last
        if self._error is not None:
            return self._last
        try:
            self._last = next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            if not _several_processes() or self._last is None:
                raise
            self._error = e  # raised by `check`, on every process
        return self._last

    def check(self, step: int) -> None:
        """Every process stops here if any one's data failed since the start (a collective, on every
        process at the same steps, once per step: several processes only)."""
        if _several_processes() and step != self._checked:
            agree(self._error, "", "could not read a batch; no step after it was logged or saved")
            self._checked = step


def _several_processes() -> bool:
    return jax.process_count() > 1


def _steps(
    run: _Run, state: TrainState, batches: _AgreedBatches, start: int, end: int
) -> tuple[TrainState, list[dict[str, Any]], bool]:
    """The step loop: one host sync per log point, checkpoints, samples, and the stop check."""
    p, tc = run.plan, run.tc
    history: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []  # device arrays: no sync until the log point
    last_save = time.monotonic()
    for step, local in zip(range(start, end), batches, strict=True):
        t0 = time.perf_counter()
        state, metrics = p.step_fn(state, to_global(local, p.mesh))
        pending.append(metrics)
        done = step + 1
        if step == start and done < end:  # one sync, once: compile time apart from tokens/s
            jax.block_until_ready(metrics)
            run.logger.first_step_done(time.perf_counter() - t0)
        timed_save = False
        eval_due = _eval_due(run.dataset, tc, done, end)
        if done % tc.log_every == 0 or done == end or eval_due:
            batches.check(done)
            extra = {}
            if eval_due:
                with _between_steps(run.logger, state):
                    extra = evaluate(p, state.params, run.dataset.validation, tc)
            history.append(_log(run.logger, pending, done, p.schedule, extra))
            pending = []
            timed_save = _time_to_save(tc, last_save)
        if done < end and (timed_save or (tc.save_every and done % tc.save_every == 0)):
            _check_finite(pending, done)  # never checkpoint a NaN state
            batches.check(done)
            _still_ours(run.run_dir)
            with _between_steps(run.logger, state):
                _save(p, run.ckpt, done, state)
            last_save = time.monotonic()
        if run.sample_fn is not None and tc.generate_every and done % tc.generate_every == 0:
            batches.check(done)
            with _between_steps(run.logger, state):
                texts = run.sample_fn(p.merge_fn(state.params), done)  # every process: a collective
            run.logger.write(append_samples(run.logger.output_dir, done, texts))
            run.logger.text("samples", "\n\n---\n\n".join(texts), done)
        if done < end and run.stop.should_stop(done):
            _check_finite(pending, done)
            return state, history, True
    return state, history, False


def _between_steps(logger: MetricsLogger, state: TrainState) -> contextlib.AbstractContextManager[None]:
    """Times what follows apart from the steps (MetricsLogger.between_steps), once the steps in
    flight are done: evaluation, checkpoints and samples wait for them anyway."""
    jax.block_until_ready(state)
    return logger.between_steps()


def _eval_due(dataset: Any, tc: TrainConfig, done: int, end: int) -> bool:
    if not tc.eval_every or getattr(dataset, "validation", None) is None:
        return False
    return done % tc.eval_every == 0 or done == end


def evaluate(p: Plan, params: Any, validation: Any, tc: TrainConfig) -> dict[str, float]:
    """Mean loss over the validation batches (every real token weighs the same) and its perplexity."""
    total, count = 0.0, 0.0
    batches = lambda: validation.eval_batches(
        tc.batch_size,
        tc.eval_batches or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for local in _agreed_eval_batches(batches):
        s, n = jax.device_get(p.eval_fn(params, to_global(local, p.mesh)))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


_READ, _ENDED, _FAILED = 0, 1, 2  # what a process did with its next validation batch


def _agreed_eval_batches(make: Callable[[], Any]) -> Any:
    """The validation batches of `make()`, made safe to fail on one process of many: before each batch
    every process says whether it has one, has none left or failed (one all-gather), so that a
    process whose validation data fails (or runs out first) stops every process with a message at
    that batch, instead of leaving the others in the eval step's collective until jax.distributed
    aborts them without one. Nothing of the evaluation is logged and nothing is saved. One process: a
    failure raises at once."""
    it = None
    while True:
        local, error = None, None
        try:
            it = iter(make()) if it is None else it
            local = next(it)
        except StopIteration:
            pass
        except Exception as e:
            if not _several_processes():
                raise
            error = e
        if _several_processes():
            codes = process_codes(_FAILED if error is not None else _ENDED if local is None else _READ)
            if error is not None:
                raise error
            if (codes == _FAILED).any():
                bad = [int(i) for i in np.flatnonzero(codes == _FAILED)]
                raise TrainingError(
                    f"process(es) {bad} of this run could not read a validation batch; their log says why. "
                    "This evaluation was not logged and nothing was saved after the last checkpoint."
                )
            if (codes == _ENDED).any() and not (codes == _ENDED).all():
                short = [int(i) for i in np.flatnonzero(codes == _ENDED)]
                raise TrainingError(
                    f"the validation batches of process(es) {short} ran out before the others': every "
                    "process must evaluate as many; pass "
                    f"{spell('train.eval_batches', '<N>')}, a number all of them have."
                )
        if local is None:
            return
        yield local


def _time_to_save(tc: TrainConfig, last_save: float) -> bool:
    """Minutes-based saves, decided by process 0 so that every host saves at the same step."""
    if not tc.save_every_minutes:
        return False
    due = time.monotonic() - last_save >= 60 * tc.save_every_minutes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return due


def _still_ours(run_dir: RunDir) -> None:
    """Before a checkpoint: every process stops if process 0's lock renewal found the folder taken
    over by another run (two writers would corrupt each other's checkpoints)."""
    error = None
    try:
        run_dir.held()
    except CheckpointError as e:
        error = e
    agree(error, "", "lost the output folder to another run")


def _save(plan: Plan, ckpt: Checkpointer, step: int, state: TrainState, force: bool = False) -> None:
    seed = plan.train.seed
    ckpt.save(step, plan.saved(state.params), state.opt_state, {"seed": seed}, force=force)


def _check_finite(pending: list[dict[str, jax.Array]], step: int) -> None:
    """The loss of every pending step, and the parameters after it, must be finite: a step can
    return a finite loss and still write inf/NaN parameters."""
    for m in jax.device_get(pending):
        bad = [k for k in ("loss", "param_norm") if not math.isfinite(float(m[k]))]
        if bad:
            raise TrainingError(
                f"{' and '.join(bad)} became {float(m[bad[0]])} by step {step}; the last good checkpoint "
                "is kept. Lower the learning rate or check the data."
            )


def _log(
    logger: MetricsLogger,
    pending: list[dict[str, jax.Array]],
    step: int,
    schedule: Any,
    extra: dict[str, float],
) -> dict[str, Any]:
    host = jax.device_get(pending)  # the one sync per log interval
    _check_finite(host, step)
    metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    metrics["learning_rate"] = float(schedule(step - 1))
    return logger.log(step, {**metrics, **extra})
