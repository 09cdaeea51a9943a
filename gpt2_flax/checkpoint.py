"""Checkpoints that never lose a run: Orbax, asynchronous, atomic, restorable onto any mesh.

Layout under ``output_dir`` (a local path or ``gs://...``)::

    checkpoints/<step>/params/     parameters (Orbax, one folder per step)
    checkpoints/<step>/opt_state/  optimizer state
    checkpoints/<step>/meta/       JSON: step, seed (the data position is a function of the step)
    run.json                       the resolved config of the run (what a resume must match)
    run_tokenizer.json             the run's tokenizer (what an export from a checkpoint needs)
    metrics.jsonl                  one JSON line per logged step

Orbax writes each step into a temporary folder and renames it when complete, so a crash or a
``kill -9`` mid-save leaves the previous step as the latest: ``latest_step`` never returns a
half-written one, and the next run resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gpt2_flax.config import Config
from gpt2_flax.tokenizer import tokenizer_fingerprint


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, an output location that cannot hold the run...)."""


class CheckpointError(TrainingError):
    """The output location cannot hold this run (not writable, full, another model's run)."""


class Checkpointer:
    """A thin wrapper so the train loop speaks in steps and states, not Orbax arguments.

    keep: the most recent checkpoints kept; keep_every: steps that are multiples of it are kept
    forever besides (0 = none)."""

    def __init__(self, directory: str | Path, keep: int = 2, keep_every: int = 0, async_save: bool = True):
        d = str(directory)
        self.directory = d if "://" in d else str(Path(d).absolute())  # Orbax wants absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_saved: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, params: Any, opt_state: Any, meta: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts an asynchronous save; training continues while it is written. Parameters and
        optimizer state are separate items so an export can restore parameters alone. A step that
        is already saved (a stop signal right after a periodic save, a resume that stops at once)
        is not written again."""
        if step == self._last_saved or step in self._manager.all_steps():
            return False
        self._last_saved = step
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, params: Any, opt_state: Any | None = None) -> dict[str, Any]:
        """Restores onto the shardings of the abstract targets (jax.ShapeDtypeStruct leaves with
        .sharding), whatever mesh the checkpoint was written from. opt_state=None: parameters only."""
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return {k: out[k] for k in items}

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _identity(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    # What a resumed run must share with the checkpoint: the model and the tokenizer.
    return {"model": cfg.to_dict()["model"], "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


def state_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def open_run_dir(cfg: Config, tokenizer: Any, *, overwrite: bool, checkpoint_bytes: int = 0) -> epath.Path:
    """Checks the output location before the first step (writable, room for two checkpoints, not
    another model's run) and records the run's config and tokenizer there."""
    out = epath.Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to output_dir {out}: {e}; choose a writable folder") from e
    if "://" not in str(out) and checkpoint_bytes:
        free = shutil.disk_usage(str(out)).free
        if free < 2 * checkpoint_bytes:  # the newest checkpoint is written before the oldest is deleted
            raise CheckpointError(
                f"output_dir {out} has {free / 2**30:.2f} GiB free but two checkpoints need "
                f"{2 * checkpoint_bytes / 2**30:.2f} GiB; free space or choose another folder"
            )
    ident = _identity(cfg, tokenizer)
    run_file, ckpts = out / "run.json", out / "checkpoints"
    if run_file.exists() and ckpts.exists() and not overwrite:
        old = json.loads(run_file.read_text())
        if {k: old.get(k) for k in ident} != ident:
            raise CheckpointError(
                f"{out} holds the checkpoints of another model or tokenizer; choose another "
                "output_dir, or pass overwrite=True (CLI: --overwrite) to replace that run"
            )
    elif overwrite and jax.process_index() == 0:
        if ckpts.exists():
            ckpts.rmtree()
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
    if jax.process_index() == 0:
        run_file.write_text(json.dumps({**ident, "config": cfg.to_dict()}, indent=2, sort_keys=True))
        (out / "run_tokenizer.json").write_text(tokenizer.to_str())
    return out


def trim_metrics(out: epath.Path, step: int) -> None:
    """On resume, drops metric lines logged after the checkpoint (they are logged again)."""
    path = out / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
