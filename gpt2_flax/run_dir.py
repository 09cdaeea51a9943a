"""The one owner of a training output folder: it checks, locks and writes; nothing else does.

Layout (the checkpoints themselves are checkpoint.py's)::

    run.json              the true record of the run: run id, the full resolved config, the model,
                          the tokenizer's fingerprint and the data (token cache key, files, sizes)
    run_tokenizer.json    the run's tokenizer (a resume and `gpt2-flax export` read it back)
    tokenizer/            the vocab.json / merges.txt a run trained itself
    metrics.jsonl         one JSON line per logged step
    samples.txt           samples written during training
    tensorboard/          TensorBoard event files (metrics.py)
    wandb/                W&B's own files (train.wandb_project); kept by --overwrite: an offline
                          run there may not be synced yet
    checkpoints/          Orbax steps
    .gpt2_flax.lock       pid, host and lease of the run writing here now (lock.py)

Every check runs before the first byte is written (`RunDir.check`), so a refused run leaves the
folder exactly as it was. `RunDir.open` then takes the lock and writes run.json; `close` frees it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2_flax.config import Config, ModelConfig
from gpt2_flax.errors import CheckpointError, spell
from gpt2_flax.lock import LOCK_FILE, FolderLock, read_lock

__all__ = ["LOCK_FILE", "RunDir", "read_lock"]  # the lock is lock.py's; info.py and tests read it here

RUN_FILE, TOKENIZER_FILE = "run.json", "run_tokenizer.json"
# An export's record of what it wrote (files and their sha256, lineage): convert.py writes it.
MANIFEST = ".gpt2_flax_export.json"
# What a run writes: the only names `--overwrite` removes (never anything else in the folder).
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "samples.txt",
    "tensorboard",
    "loss.png",
    RUN_FILE,
    TOKENIZER_FILE,
    "tokenizer",
)
# What a resume must share with the run in the folder, and how to say it in a message.
_IDENTITY = {
    "model": "the model (model.*)",
    "tokenizer_fingerprint": "the tokenizer",
    "data": "the training data",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "frozen": "what is frozen (train.freeze_layers, num_layers_freeze, freeze)",
    "lora": "LoRA (train.lora_rank, lora_alpha, lora_targets) or its base model's weights",
}


def data_identity(dataset: Any) -> dict[str, Any]:
    """What the run trains on, as run.json records it: the token cache key (a hash of every input
    file's path, size and mtime, the tokenizer and the encoding options) and the files."""
    parts = getattr(dataset, "datasets", None) or [dataset]
    identity = {
        "token_cache_keys": [Path(str(getattr(p, "cache_entry", ""))).name for p in parts],
        "files": [str(f) for p in parts for f in getattr(p, "files", [])],
        "num_tokens": int(sum(getattr(p, "num_tokens", 0) for p in parts)),
        "block_size": int(dataset.block_size),
    }
    if getattr(dataset, "streaming", False):  # a stream's length is unknown: num_tokens counts cached parts
        import jax

        identity["streamed"] = True
        # Each process streams its own part (stream.py), so the order depends on the process count.
        identity["stream_processes"] = jax.process_count()
    return identity


def checkpoint_steps(folder: Path | str) -> list[int]:
    """Complete checkpoint steps on disk or in a bucket (Orbax names each step's folder by its
    number; one being written has a temporary name)."""
    from etils import epath

    ckpts = epath.Path(str(folder)) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())


@dataclass
class RunDir:
    """An output folder for one run. `remote` (gs://...) folders skip the local-only checks (writable,
    free space); Orbax and the object store keep their writes atomic. Both kinds are locked (lock.py)."""

    path: Path
    overwrite: bool = False
    take_over: bool = False  # train.take_over_lock: the holder of a live-looking lock is known to be gone
    run_id: str = ""
    notes: list[str] = field(default_factory=list)  # what the checks found worth saying (resume, ...)

    def __post_init__(self) -> None:
        self.path = Path(self.path) if "://" not in str(self.path) else self.path
        self.remote = "://" in str(self.path)
        self._lock = FolderLock(self.path)

    # ------------------------------------------------------------------ reading
    def previous(self) -> dict[str, Any] | None:
        """run.json of the run already in this folder, if it has checkpoints to resume from."""
        if self.remote:
            from etils import epath

            run = epath.Path(str(self.path)) / RUN_FILE
            return json.loads(run.read_text()) if run.exists() else None
        run = self.path / RUN_FILE
        if not run.is_file() or not checkpoint_steps(self.path):
            return None
        try:
            return json.loads(run.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{run} cannot be read ({e}); it records the run whose checkpoints are in "
                f"{self.path / 'checkpoints'}. Restore it, or pass {spell('overwrite', True)} to "
                "start a new run there"
            ) from e

    # ------------------------------------------------------------------ checks (no writes)
    def check(
        self,
        cfg: Config,
        tokenizer_fingerprint: str,
        data: dict[str, Any],
        *,
        checkpoint_bytes: int = 0,
        export_bytes: int = 0,
        primary: bool = True,
    ) -> None:
        """Every reason this run cannot use the folder, raised before anything is written. In a
        multi-process run every process checks (each may have its own disk), but only the
        primary, which takes the lock, checks the lock: the others would find the primary's."""
        if not self.remote:
            self._check_writable()
            self._check_room(cfg, checkpoint_bytes, export_bytes)
        if primary:
            note = self._lock.check(self.take_over)
            if note:
                self.notes.append(note)
        old = None if self.overwrite else self.previous()
        self.run_id = (old or {}).get("run_id") or uuid.uuid4().hex
        if old is not None:
            self._check_resume(old, cfg, tokenizer_fingerprint, data)
        if not self.overwrite:  # also for checkpoints without a run.json (an older version's)
            self._check_unfinished(cfg)

    def _check_writable(self) -> None:
        probe = self.path
        while not probe.exists():  # the nearest existing folder must let us create the rest
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise CheckpointError(
                f"cannot write to output_dir {self.path} ({probe} is not a writable folder); "
                "choose a writable folder"
            )

    def _check_room(self, cfg: Config, checkpoint_bytes: int, export_bytes: int) -> None:
        if not checkpoint_bytes:
            return
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        # During a save the new checkpoint is complete before the oldest kept one is deleted.
        n = cfg.train.keep_checkpoints + 1
        need = n * checkpoint_bytes + export_bytes - sum(_size(p) for p in self._reusable())
        free = shutil.disk_usage(probe).free
        if free < need:
            raise CheckpointError(
                f"output_dir {self.path} has {free / 2**30:.2f} GiB free but the run needs "
                f"{need / 2**30:.2f} GiB ({n} checkpoints of {checkpoint_bytes / 2**30:.2f} GiB and the "
                f"export); free space, lower train.keep_checkpoints, or choose another folder"
            )

    def _reusable(self) -> list[Path]:
        # Checkpoints an overwrite deletes count as room; a resume keeps its own within `keep`.
        return [self.path / "checkpoints"] if self.overwrite else []

    def _check_resume(self, old: dict[str, Any], cfg: Config, fingerprint: str, data: dict[str, Any]) -> None:
        new = identity(cfg, fingerprint, data)
        if cfg.train.resume_with_new_data:
            new["data"] = old.get("data")
        if isinstance(old.get("model"), dict):  # model keys added since that run have their defaults
            old = {**old, "model": {**dataclasses.asdict(ModelConfig()), **old["model"]}}
        diff = [key for key in _IDENTITY if key in old and old.get(key) != new[key]]
        if diff:
            lines = [f"  {_IDENTITY[k]}: {_describe(k, old.get(k), new[k])}" for k in diff]
            raise CheckpointError(
                f"{self.path} holds a run with other settings, which this call would continue:\n"
                + "\n".join(lines)
                + f"\nUse another output_dir for a new run, pass {spell('overwrite', True)} to "
                "replace that run"
                + (
                    f", or {spell('train.resume_with_new_data', True)} to continue it on the new data"
                    if diff == ["data"]
                    else ""
                )
            )
        latest = (checkpoint_steps(self.path) or [0])[-1]
        old_steps = (old.get("config") or {}).get("train", {}).get("num_steps")
        if old_steps is not None and old_steps != cfg.train.num_steps and latest < cfg.train.num_steps:
            self.notes.append(_schedule_note(old_steps, cfg, latest))

    def _check_unfinished(self, cfg: Config) -> None:
        latest = (checkpoint_steps(self.path) or [0])[-1]
        if latest >= cfg.train.num_steps:
            raise CheckpointError(
                f"{self.path} already holds a run trained to step {latest} (num_steps="
                f"{cfg.train.num_steps}); pass num_steps > {latest} to train it further, another "
                f"output_dir for a new run, or {spell('overwrite', True)} to start over there"
            )

    # ------------------------------------------------------------------ writes
    def open(
        self, cfg: Config, tokenizer: Any, data: dict[str, Any], tokenizer_files: dict[str, str]
    ) -> None:
        """Takes the lock, clears what an overwrite replaces (only our own outputs) and writes
        run.json, run_tokenizer.json and a trained tokenizer. Process 0 only."""
        from etils import epath

        from gpt2_flax.tokenizer import tokenizer_fingerprint

        out = epath.Path(str(self.path))
        out.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        if self.overwrite:
            for name in RUN_OUTPUTS:
                p = out / name
                if p.is_dir():
                    p.rmtree()
                elif p.exists():
                    p.unlink()
        if tokenizer_files:
            (out / "tokenizer").mkdir(exist_ok=True)
            for name, text in tokenizer_files.items():
                (out / "tokenizer" / name).write_text(text)
        record = {
            "run_id": self.run_id,
            **identity(cfg, tokenizer_fingerprint(tokenizer), data),
            "config": cfg.to_dict(),
        }
        (out / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        (out / TOKENIZER_FILE).write_text(tokenizer.to_str())

    def held(self) -> None:
        """Raises if another run took the folder over while this one trained (the lock's renewal
        found its token): checked before every checkpoint."""
        self._lock.held()

    def close(self) -> None:
        self._lock.release()


def identity(cfg: Config, tokenizer_fingerprint: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": cfg.to_dict()["model"],
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "data": data,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        # The optimizer state's structure follows it: a resume with other freezing cannot restore.
        "frozen": [cfg.train.freeze_layers, cfg.train.num_layers_freeze, list(cfg.train.freeze)],
        # The checkpoint holds only the adapters: the base must be the very weights they adapt.
        "lora": _lora_identity(cfg),
    }


def _lora_identity(cfg: Config) -> dict[str, Any] | None:
    tc = cfg.train
    if not tc.lora_rank:
        return None
    base = Path(str(cfg.model.init_from)).expanduser()
    files = [base] if base.is_file() else sorted(base.glob("*.safetensors")) + sorted(base.glob("*.bin"))
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    return {
        "rank": tc.lora_rank,
        "alpha": tc.lora_alpha,
        "targets": list(tc.lora_targets),
        "base": str(cfg.model.init_from),
        "base_weights": weights or None,  # (a Hub id resolves to its cached snapshot's files)
    }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _describe(key: str, old: Any, new: Any) -> str:
    if key == "model":
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
    if key == "tokenizer_fingerprint":
        return f"fingerprint {str(old)[:12]}... -> {str(new)[:12]}..."
    if key == "data":
        old, new = old or {}, new or {}
        if old.get("files") != new.get("files"):
            return f"files {old.get('files')} -> {new.get('files')}"
        if bool(old.get("streamed")) != bool(new.get("streamed")):
            return "cached -> streamed" if new.get("streamed") else "streamed -> cached"
        if old.get("stream_processes") != new.get("stream_processes"):
            return (
                f"streamed by {old.get('stream_processes')} -> {new.get('stream_processes')} processes "
                "(each streams its own part, so the order of the rows would change)"
            )
        return f"the same files changed since (tokens {old.get('num_tokens')} -> {new.get('num_tokens')})"
    return f"{old!r} -> {new!r}"


def _schedule_note(old_steps: int, cfg: Config, step: int) -> str:
    from gpt2_flax.train import lr_schedule

    old_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=old_steps))
    before, after = float(lr_schedule(old_cfg.train)(step)), float(lr_schedule(cfg.train)(step))
    how = "stretches" if cfg.train.num_steps > old_steps else "shortens"
    jump = "" if math.isclose(before, after, rel_tol=1e-6) else f" (from {before:.3g} to {after:.3g})"
    return (
        f"gpt2-flax: num_steps {old_steps} -> {cfg.train.num_steps}: the cosine learning-rate schedule "
        f"{how} to the new end, so at step {step} the learning rate changes{jump}"
    )
