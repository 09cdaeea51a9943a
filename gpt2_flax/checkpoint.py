"""Orbax checkpoints of the whole training state: asynchronous, atomic, restorable onto any mesh.

Layout under ``output_dir``::

    checkpoints/<step>/state/...   parameters, optimizer state, step (Orbax, one folder per step)
    checkpoints/<step>/meta/...    JSON: config, tokenizer fingerprint, data position
    run.json                       the resolved config of the run (what a resume must match)

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous step as the latest; ``latest_step`` never returns a half-written one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
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

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts an asynchronous save; training continues while it is written."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with
        .sharding), whatever mesh the checkpoint was written from."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out.state, out.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each array's sharding: the restore target for Orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
