"""Checkpoints that never lose a run: Orbax, asynchronous, atomic, restorable onto any mesh.

Layout under ``output_dir`` (a local path or ``gs://...``)::

    checkpoints/<step>/params/     parameters (Orbax, one folder per step)
    checkpoints/<step>/opt_state/  optimizer state
    checkpoints/<step>/meta/       JSON: the seed (the step is the folder's name; the data position
                                   is a function of it)
    run.json                       the resolved config of the run (what a resume must match)
    run_tokenizer.json             the run's tokenizer (what an export from a checkpoint needs)
    metrics.jsonl                  one JSON line per logged step

Orbax writes each step into a temporary folder and renames it when complete, so a crash or a
``kill -9`` mid-save leaves the previous step as the latest: ``latest_step`` never returns a
half-written one, and the next run resumes from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import PartitionSpec

from gpt2_flax.errors import CheckpointError, TrainingError  # noqa: F401  (re-exported)


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
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),  # the step is the folder's name, nowhere else
        )
        self.wait()  # the previous save's error names its own step (Orbax would wait here anyway)
        self._last_saved = step
        with self._writing(step):
            return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, params: Any, opt_state: Any | None = None) -> dict[str, Any]:
        """Restores onto the shardings of the abstract targets (jax.ShapeDtypeStruct leaves with
        .sharding), whatever mesh the checkpoint was written from. opt_state=None: parameters only.
        A checkpoint of an older gpt2_flax, whose parameter layout differs (`_legacy_shape`), is
        read in that layout and reshaped, so upgrading never strands a run."""
        targets = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
        try:
            return self._restore(step, targets)
        except Exception:
            legacy = _legacy_targets(targets)
            if legacy is None:
                raise
        try:  # a checkpoint of an older gpt2_flax, in the parameter layout of its day
            out = self._restore(step, legacy)
        except Exception:
            return self._restore(step, targets)  # raises the error of the current layout again
        return {**out, **jax.tree.map(_to_target, {k: out[k] for k in targets}, targets)}

    def _restore(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        items = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        out = self._manager.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
        return {k: out[k] for k in (*targets, "meta")}

    def set_aside(self, step: int) -> str:
        """Moves an unreadable step out of Orbax's sight (renamed, never deleted), so the run can go
        on from an older one and later save this step again; returns the new name."""
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory) / f"{step}.unreadable-{int(time.time())}"
        src.rename(dst)
        self._manager.reload()
        return str(dst)

    def wait(self) -> None:
        with self._writing(self._last_saved):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """An I/O error of a save, raised here or, for an asynchronous save, later from Orbax's
        background thread (at the next save, wait or close): one CheckpointError naming the step
        and the way on. Orbax writes a step under a temporary name and renames it when complete,
        so the older checkpoints are intact and a rerun resumes from the newest of them."""
        try:
            yield
        except Exception as e:
            cause = _os_error(e)
            if cause is None:
                raise
            if cause.errno == errno.ENOSPC:
                why = f"the disk is full ({cause.filename or self.directory}); free space"
            else:
                why = f"{type(cause).__name__}: {cause}"
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.directory}: {why}. The older "
                "checkpoints are intact: run again to resume from the newest of them"
            ) from e


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (Orbax and asyncio wrap the one a write raised), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _legacy_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a parameter (or its Adam moment) had in checkpoints written before 2026-12-01:
    c_attn as HF's (L, C, 3C) / (L, 3C), where it is now (L, C, 3, H, D) / (L, 3, H, D)."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "c_attn" not in keys:
        return None
    if keys[-1] == "kernel" and len(shape) == 5:
        return (*shape[:2], math.prod(shape[2:]))
    if keys[-1] == "bias" and len(shape) == 4:
        return (shape[0], math.prod(shape[1:]))
    return None


def _legacy_targets(targets: dict[str, Any]) -> dict[str, Any] | None:
    """The restore targets in the old layout (None: nothing in them changed layout). An old leaf
    is placed like the new one on its leading (layer, embed) dimensions, its fused one whole."""
    changed = False

    def old(path: tuple, x: Any) -> Any:
        nonlocal changed
        shape = _legacy_shape(path, tuple(x.shape))
        if shape is None:
            return x
        changed = True
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
            sharding = jax.sharding.NamedSharding(sharding.mesh, PartitionSpec(*spec[: len(shape) - 1], None))
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

    legacy = jax.tree_util.tree_map_with_path(old, targets)
    return legacy if changed else None


def _to_target(x: jax.Array, target: Any) -> jax.Array:
    if tuple(x.shape) == tuple(target.shape):
        return x
    return jax.jit(lambda a: a.reshape(target.shape), out_shardings=target.sharding)(x)


def state_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def trim_metrics(out: epath.Path, step: int) -> None:
    """On resume, drops metric lines logged after the checkpoint (they are logged again)."""
    path = out / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
