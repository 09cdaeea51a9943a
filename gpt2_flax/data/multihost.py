"""One tokenizer and one token cache per slice: how the processes of a multi-process run (the hosts
of a TPU pod slice; 2 CPU processes in tests/test_sharding.py) share the data work.

Tokenizer (`one_tokenizer`): process 0 trains it; the others wait and receive its files (vocab.json,
merges.txt, tokenizer.json: 0.5 MB at 5000 tokens, 1.7 MB at 15714, measured; ~5 MB at 50257) by
broadcast, and write them into their own save_path unless process 0's are already there, byte for
byte (shared storage). Exactly one training, with or without a shared disk.

Token cache (`one_cache`): process 0 leaves a marker file in the cache folder, and each other process
looks for it. Those that see it (a shared folder: NFS, Filestore, gcsfuse) wait while process 0
encodes, then reuse its cache; those that do not (each host's own disk) encode their own copy at the
same time. Either way every process then compares the sha256 of its tokens and the tokenizer's
fingerprint with process 0's, so all of them train on the same tokens (a host with another copy of
the data is an error on every process, not a silent divergence). A process that misses the marker
(e.g. NFS caching) just encodes its own: slower, never wrong.

A failure on one process (bad data, a full disk) is raised on all of them, none is left waiting in a
collective. Single-process runs (no jax.distributed) never import jax here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_flax.errors import DataError

logger = logging.getLogger(__name__)


def active() -> bool:
    """True in a multi-process JAX run (jax.distributed initialized, more than one process)."""
    jax = sys.modules.get("jax")  # not imported: no distributed run (and no backend to start)
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _first() -> bool:
    import jax

    return jax.process_index() == 0


def _broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (any length: its size goes first)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = data if _first() else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode("utf-8")


def _agree(error: BaseException | None, what: str, token: str = "") -> str:
    from gpt2_flax.sharding import agree

    return agree(error, token, what=what)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as e:  # raised on this process after every process heard of it (_agree)
        return None, e


def one_tokenizer(train: Callable[[], dict[str, str]], folder: Path) -> None:
    """Process 0 runs `train` (which writes the tokenizer files into `folder` and returns them as
    {file name: text}); every other process gets them by broadcast and writes what `folder` lacks."""
    files, error = _attempt(train) if _first() else ({}, None)
    _agree(error, "could not train the tokenizer")
    files = json.loads(_broadcast_text(json.dumps(files, ensure_ascii=False)))
    written, error = (0, None) if _first() else _attempt(lambda: _write_missing(folder, files))
    _agree(error, "could not write the tokenizer files")
    if not _first():
        logger.info("Received the tokenizer from process 0 (%d file(s) written to %s)", written, folder)


def _write_missing(folder: Path, files: dict[str, str]) -> int:
    """Write each file that `folder` does not already hold byte for byte; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, text in files.items():
        path = folder / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue  # shared storage: process 0 wrote it
        tmp = path.with_name(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written += 1
    return written


def _sees_process0(folder: Path) -> bool:
    """Whether this process sees process 0's `folder` (shared storage): process 0 leaves a marker in
    it, every other process looks for it, then process 0 removes it. False on process 0."""
    marker, error = "", None
    if _first():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker = f".gpt2_flax-shared-{uuid.uuid4().hex}"  # 50 chars (agree carries 64)
            (folder / marker).write_text("")
        except OSError as e:
            error = DataError(
                f"Cannot create cache dir {folder} ({e}): pass cache_dir= or set GPT2_FLAX_CACHE."
            )
    marker = _agree(error, "could not create the token cache folder", marker)
    seen = not _first() and (folder / marker).exists()
    _agree(None, "")  # every process has looked before the marker goes
    if _first():
        (folder / marker).unlink(missing_ok=True)
    return seen


def one_cache(
    build: Callable[[], tuple[Path, dict]], folder: Path, digest: Callable[[Path, dict], str]
) -> Any:
    """`build()` (encode or reuse the token cache in `folder`) on every process, process 0 first
    where the folder is shared; then all check that `digest(entry, meta)` is process 0's."""
    shared = _sees_process0(folder)
    result, error = (None, None) if shared else _attempt(build)
    _agree(error, "could not build its token cache")
    if shared:  # process 0's cache is complete: reused (or encoded here if this host's files differ)
        result, error = _attempt(build)
    _agree(error, "could not read the token cache")
    same_everywhere(result[0], digest(*result))
    return result


def same_everywhere(entry: Path, digest: str) -> None:
    """Raise on every process unless each one's cache `entry` has process 0's `digest`."""
    first = _agree(None, "", digest)
    differs = None
    if digest != first:
        differs = DataError(
            f"This process's token cache {entry} holds other tokens (or another tokenizer) than "
            "process 0's: every host must read the same data files (same bytes, same order) with the "
            "same tokenizer. Fix: give every host the same copy, or one shared URL (gs://...)."
        )
    _agree(differs, "holds other tokens than process 0")
