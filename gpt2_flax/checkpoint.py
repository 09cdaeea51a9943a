"""Orbax checkpoints of the whole training state: asynchronous, atomic, restorable onto any mesh.

Layout under ``output_dir``::

    checkpoints/<step>/params/     parameters (Orbax, one folder per step)
    checkpoints/<step>/opt_state/  optimizer state
    checkpoints/<step>/meta/       JSON: step, seed (the data position is a function of the step)
    run.json                       the resolved config of the run (what a resume must match)
    run_tokenizer.json             the tokenizer of the run (what an export from a checkpoint needs)

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous step as the latest; ``latest_step`` never returns a half-written one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper so the train loop speaks in steps and states, not Orbax arguments."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        # Orbax wants an absolute path; gs:// paths pass through unchanged.
        d = str(directory)
        self.directory = d if "://" in d else str(Path(d).absolute())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, params: Any, opt_state: Any, meta: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts an asynchronous save; training continues while it is written. Parameters and
        optimizer state are separate items so an export can restore parameters alone."""
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
