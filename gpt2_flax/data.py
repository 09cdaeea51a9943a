"""Token datasets: encode text once into a cached token file, then serve training batches from it.

Encoding (sources.py reads the inputs): every document becomes its token ids followed by
`<|endoftext|>` (line_by_line: `<|endoftext|> text <|endoftext|>`), all concatenated into one token file
(uint16 when the vocab has < 65536 entries, else uint32) plus JSON metadata, in a cache folder keyed by
the tokenizer, the inputs and the options. The file is memory-mapped, so corpora larger than RAM work
and every process of a multi-host job can open the same cache.

Batches are a pure function of (seed, step, process index), so resuming needs only the step number:
- concatenated (default): windows of block_size + 1 tokens cut at multiples of block_size.
- line_by_line: whole documents packed into rows of block_size tokens (best fit, never crossing a row);
  each token has a segment id (1..k within its row, 0 = padding) and a position restarting at 0 in every
  document; labels are the next token of the same document and -1 elsewhere, so with the model's
  `segment_ids` / `positions` nothing is attended to or predicted across documents.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gpt2_flax.sources import (
    EncodeOptions,
    EncodeSettings,
    encode_stream,
    iter_pieces,
    resolve_sources,
)
from gpt2_flax.tokenizer import PathLike, eos_token_id, load_tokenizer, tokenizer_fingerprint

__all__ = ["TokenDataset", "Blocks", "PackedBlocks", "DocumentBlocks", "MergedDataset", "merge_datasets"]
__all__ += ["prefetch", "encode_main", "encode_sources", "save_cache_folder", "default_cache_dir"]
__all__ += ["iter_pieces"]  # re-exported: the exact chunking lives in sources.py

logger = logging.getLogger(__name__)

# Text per work item / map batch: ~1 MB of text (~250k tokens) is encoded at once per worker.
CHUNK_CHARS = 1 << 20
# Target length of the pieces a long text is split into; encode_batch encodes pieces in parallel in Rust.
PIECE_CHARS = 1 << 16
# Bump when the token layout changes so old caches are not reused.
CACHE_VERSION = 2
EVAL_SEED = 0  # eval_batches visits validation rows in this fixed order
_SPLIT_SEED = 20240229  # which blocks / documents validation_split holds out: never the training seed


def default_cache_dir() -> Path:
    """`$GPT2_FLAX_CACHE` if set, else `~/.cache/gpt2_flax/tokens`."""
    env = os.environ.get("GPT2_FLAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2_flax" / "tokens"


def _encode_batch(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    # add_special_tokens=False: raw ids only, whatever post-processor the tokenizer carries.
    return [np.asarray(e.ids, dtype) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


# ----------------------------------------------------------------------------- the token cache


def read_cache(entry: Path, identity: dict | None = None) -> dict | None:
    """The metadata of a complete cache folder (that matches `identity` if given), else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        size = (entry / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if identity is not None and {k: meta.get(k) for k in identity} != identity:
        return None
    if size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    if meta["options"]["line_by_line"] and not (entry / "doc_offsets.npy").is_file():
        return None
    return meta


def _write_offsets(lengths_file: Path, out: Path, num_documents: int) -> None:
    """doc_offsets.npy (num_documents + 1 int64) = cumulative lengths, streamed in 8 MB chunks."""
    with open(lengths_file, "rb") as src, open(out, "wb") as dst:
        np.lib.format.write_array_header_1_0(
            dst, {"descr": "<i8", "fortran_order": False, "shape": (num_documents + 1,)}
        )
        total = np.zeros(1, np.int64)
        total.tofile(dst)
        while (chunk := np.fromfile(src, np.int64, count=1 << 20)).size:
            (np.cumsum(chunk) + total[0]).tofile(dst)
            total[0] += chunk.sum()


def build_token_cache(
    tok: Tokenizer, sources: list, cache_dir: PathLike | None, options: dict, opts: EncodeOptions
) -> tuple[Path, dict]:
    """Encode `sources` into the folder `<cache_dir>/<key>/`, or reuse it; returns (folder, metadata).

    The folder holds tokens.bin, meta.json (and doc_offsets.npy in line_by_line mode). It is built
    under a temporary name and renamed at the end, so an interrupted run never leaves a cache that
    looks complete, and concurrent processes building the same cache keep whichever finishes first.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tok),
        "options": options,
        "sources": [s.identity() for s in sources],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    entry = cache / key
    if (meta := read_cache(entry, identity)) is not None:
        logger.info("Reusing token cache %s (%d tokens)", entry, meta["num_tokens"])
        return entry, meta
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot create cache dir {cache} ({e}): pass cache_dir= or set GPT2_FLAX_CACHE."
        ) from e
    if tok.truncation is not None or tok.padding is not None:  # would cut or pad every piece: turn off
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)
    lines, errors = options["line_by_line"], options["encoding_errors"]
    settings = EncodeSettings(tok, _encode_batch, dtype, eos_token_id(tok), lines, errors, PIECE_CHARS)
    opts = dataclasses.replace(opts, chunk_chars=CHUNK_CHARS)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f"{key}.", suffix=".tmp"))  # unique per process
    try:
        start = time.perf_counter()
        counts = encode_stream(sources, work, settings, opts)
        meta = {**identity, "dtype": dtype.name, "vocab_size": vocab_size, "eos_token_id": settings.eos}
        meta.update(counts, encode_seconds=round(time.perf_counter() - start, 3))
        done = work / "entry"
        done.mkdir()
        os.replace(work / "tokens.bin", done / "tokens.bin")
        if lines:
            _write_offsets(work / "lengths.bin", done / "doc_offsets.npy", counts["num_documents"])
        (done / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in (done, *done.iterdir()):  # mkdtemp makes 0700: other users/hosts may share the cache
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            os.rename(done, entry)
        except OSError:  # another process finished the same cache first (use theirs), or a broken one
            if read_cache(entry, identity) is None:
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(done, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if counts["replaced"]:
        warnings.warn(
            f"Replaced {counts['replaced']} invalid UTF-8 sequence(s) with U+FFFD (encoding_errors="
            "'replace').",
            stacklevel=3,
        )
    logger.info("Encoded %d tokens in %.1f s into %s", counts["num_tokens"], meta["encode_seconds"], entry)
    return entry, meta


# ----------------------------------------------------------------------------- batches


def _rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size < 1 or process_count < 1:
        raise ValueError(f"batch_size ({batch_size}) and process_count ({process_count}) must be >= 1.")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: use a global "
            f"batch size that is a multiple of {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return batch_size // process_count


class Blocks:
    """Training rows addressed by block index 0..num_blocks-1; subclasses define `_gather(blocks)`.

    Global sample j = step*batch_size + row is block permutation(seed, epoch)[j % num_blocks] with
    epoch = j // num_blocks: each epoch visits every block once, and any step can be recomputed
    without replaying earlier ones. Process p of process_count reads only its contiguous rows
    [p*rows, (p+1)*rows) of each global batch, rows = batch_size // process_count.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()  # a prefetch thread and the caller may both ask for orders

    def __len__(self) -> int:
        return self.num_blocks

    def _gather(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def block_order(self, seed: int, epoch: int) -> np.ndarray:
        """The order blocks are visited in during `epoch`: a permutation of range(num_blocks)."""
        with self._lock:
            if (seed, epoch) not in self._orders:
                if len(self._orders) >= 2:  # a batch spans at most two epochs: keep 2 permutations
                    self._orders.pop(next(iter(self._orders)))
                self._orders[seed, epoch] = np.random.default_rng([seed, epoch]).permutation(self.num_blocks)
            return self._orders[seed, epoch]

    def blocks_for(self, samples: np.ndarray, seed: int) -> np.ndarray:
        """Block index of each global sample index."""
        epochs, positions = np.divmod(samples, self.num_blocks)
        blocks = np.empty(samples.shape[0], dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            blocks[in_epoch] = self.block_order(seed, int(epoch))[positions[in_epoch]]
        return blocks

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: int32 arrays (rows, block_size), numpy only.

        Keys: input_ids, labels (-1 = not trained); line_by_line adds segment_ids and positions.
        """
        rows = _rows_per_process(batch_size, process_index, process_count)
        if step < 0 or seed < 0:
            raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0.")
        samples = step * batch_size + process_index * rows + np.arange(rows, dtype=np.int64)
        return self._gather(self.blocks_for(samples, seed))

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_steps: int | None = None,
        prefetch: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """get_batch for steps start_step, start_step + 1, ... (forever, or num_steps batches);
        prefetch=N computes up to N batches ahead in a background thread."""
        _rows_per_process(batch_size, process_index, process_count)  # fail now, not at first next()
        steps = (
            itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)
        )
        batches = (self.get_batch(step, batch_size, seed, process_index, process_count) for step in steps)
        return _prefetch(batches, prefetch) if prefetch else batches

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fixed evaluation batches: every block once (at most num_batches batches), in one fixed order.

        Rows past the last block are padding with labels -1, so a loss that skips labels < 0 is the
        exact mean over the blocks; the same call always yields the same batches.
        """
        rows = _rows_per_process(batch_size, process_index, process_count)
        total = -(-self.num_blocks // batch_size)
        order = self.block_order(EVAL_SEED, 0)
        count = total if num_batches is None else min(num_batches, total)

        def gen() -> Iterator[dict[str, np.ndarray]]:
            for b in range(count):
                first = b * batch_size + process_index * rows
                part = self._gather(order[first : first + rows])
                yield {k: _pad_rows(v, rows, -1 if k == "labels" else 0) for k, v in part.items()}

        return gen()


def _pad_rows(x: np.ndarray, rows: int, fill: int) -> np.ndarray:
    return (
        x
        if x.shape[0] == rows
        else np.concatenate([x, np.full((rows - x.shape[0], x.shape[1]), fill, x.dtype)])
    )


class PackedBlocks(Blocks):
    """Concatenated mode: block i is the window tokens[i*block_size : i*block_size + block_size + 1].

    Inputs are its first block_size tokens and labels its last block_size, so all block_size positions
    are trained and consecutive blocks share one token. `block_ids` restricts the dataset to a subset of
    the blocks (validation_split); block k of the dataset is then block block_ids[k] of the file.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, name: str = "dataset", block_ids: np.ndarray | None = None
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if tokens.shape[0] < block_size + 1:
            raise ValueError(
                f"{name} has only {tokens.shape[0]} tokens, but one training block needs block_size + 1 = "
                f"{block_size + 1}: use a smaller block_size or add more text."
            )
        self.tokens = tokens
        self.num_tokens = int(tokens.shape[0])
        self.block_ids = block_ids
        # -1: the last window needs one token past its block for the final label.
        total = (self.num_tokens - 1) // block_size
        super().__init__(total if block_ids is None else len(block_ids), block_size)

    def _gather(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        if self.block_ids is not None:
            blocks = self.block_ids[blocks]
        # (rows, block_size + 1) token windows, gathered from the memmap.
        offsets = blocks[:, None] * self.block_size + np.arange(self.block_size + 1)
        windows = np.asarray(self.tokens[offsets], dtype=np.int32)
        return {"input_ids": windows[:, :-1].copy(), "labels": windows[:, 1:].copy()}  # C-contiguous


def pack_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Best fit in input order: each piece goes into the open row with the least room that still fits
    it (the oldest such row), else into a new row. Returns each piece's row, numbered by creation."""
    rows: list[int] = []
    stacks: dict[int, deque[int]] = {}  # room left -> rows with exactly that much room, oldest first
    rooms: list[int] = []  # sorted keys of `stacks`
    num_rows = 0
    for n in lengths.tolist():
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = stacks[room].popleft()
            if not stacks[room]:
                del stacks[room], rooms[k]
        else:
            row, room, num_rows = num_rows, capacity, num_rows + 1
        rows.append(row)
        if (room := room - n) >= 2:  # a piece of < 2 tokens trains nothing
            if room not in stacks:
                stacks[room] = deque()
                bisect.insort(rooms, room)
            stacks[room].append(row)
    return np.asarray(rows, dtype=np.int64)


def document_pieces(
    doc_offsets: np.ndarray, doc_ids: np.ndarray | None, block_size: int, long_documents: str
) -> tuple[np.ndarray, np.ndarray]:
    """(token start, length) of every piece: documents, with over-long ones split or truncated.

    "split" cuts a document of L > block_size tokens into ceil((L-1)/(block_size-1)) pieces that
    overlap by one token, so each of its L-1 next-token predictions is trained exactly once.
    """
    starts, lengths = np.asarray(doc_offsets[:-1]), np.diff(doc_offsets)
    if doc_ids is not None:
        starts, lengths = starts[doc_ids], lengths[doc_ids]
    if long_documents == "truncate":
        return starts, np.minimum(lengths, block_size)
    step = block_size - 1
    count = np.where(lengths > block_size, -(-(lengths - 1) // step), 1)
    doc = np.repeat(np.arange(lengths.size), count)
    k = np.arange(doc.size) - np.repeat(np.cumsum(count) - count, count)
    return starts[doc] + k * step, np.minimum(lengths[doc] - k * step, block_size)


class DocumentBlocks(Blocks):
    """line_by_line mode: rows of block_size tokens, each holding whole documents (or pieces of long ones).

    The packing (pieces sorted by row + row pointers) is computed once and stored next to the token
    file as `<index_path>.pieces.npy` / `.rows.npy`, then memory-mapped.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        block_size: int,
        doc_ids: np.ndarray | None = None,
        long_documents: str = "split",
        index_path: Path | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"line_by_line needs block_size >= 2, got {block_size}.")
        self.tokens = tokens
        lengths = np.diff(doc_offsets) if doc_ids is None else np.diff(doc_offsets)[doc_ids]
        if (num_long := int((lengths > block_size).sum())) > 0:
            action = "split into block-sized pieces" if long_documents == "split" else "truncated"
            warnings.warn(
                f"{num_long} of {lengths.size} documents are longer than block_size={block_size} tokens "
                f"(longest: {lengths.max()} tokens, EOS included) and were {action}: pass a larger "
                "block_size, or long_documents='split' / 'truncate' to choose.",
                stacklevel=4,
            )
        pieces, row_ptr = self._load_index(index_path)
        if pieces is None:
            starts, plen = document_pieces(doc_offsets, doc_ids, block_size, long_documents)
            rows = pack_rows(plen, block_size)
            order = np.argsort(rows, kind="stable")
            pieces = np.stack([starts[order], plen[order]], axis=1)
            row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows))]).astype(np.int64)
            self._save_index(index_path, pieces, row_ptr)
        self.piece_start, self.piece_len, self.row_ptr = pieces[:, 0], pieces[:, 1], row_ptr
        super().__init__(len(row_ptr) - 1, block_size)

    @staticmethod
    def _load_index(index_path: Path | None) -> tuple[Any, Any]:
        if index_path is None:
            return None, None
        try:
            rows = np.load(f"{index_path}.rows.npy", mmap_mode="r")  # written last: the commit marker
            return np.load(f"{index_path}.pieces.npy", mmap_mode="r"), rows
        except (OSError, ValueError, TypeError):
            return None, None

    @staticmethod
    def _save_index(index_path: Path | None, pieces: np.ndarray, row_ptr: np.ndarray) -> None:
        if index_path is None:
            return
        try:
            for suffix, array in ((".pieces.npy", pieces), (".rows.npy", row_ptr)):
                with tempfile.NamedTemporaryFile(dir=index_path.parent, suffix=".tmp", delete=False) as f:
                    np.save(f, array)
                os.chmod(f.name, 0o644)
                os.replace(f.name, f"{index_path}{suffix}")
        except OSError as e:  # a read-only saved cache: keep the packing in memory only
            logger.info("Not saving the packing index next to %s: %s", index_path, e)

    def _gather(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        n, width = blocks.shape[0], self.block_size
        first = np.asarray(self.row_ptr[blocks])
        count = np.asarray(self.row_ptr[blocks + 1]) - first  # pieces per row, >= 1
        row_base = np.cumsum(count) - count  # index of each row's first piece in this batch
        piece = np.repeat(first - row_base, count) + np.arange(count.sum())
        length, start = np.asarray(self.piece_len[piece]), np.asarray(self.piece_start[piece])
        flat = np.cumsum(length) - length  # offset of each piece in the batch's flattened tokens
        col0 = flat - np.repeat(flat[row_base], count)  # column where each piece starts in its row
        pos = np.arange(length.sum()) - np.repeat(flat, length)  # (tokens,) position in document
        r = np.repeat(np.repeat(np.arange(n), count), length)
        c = np.repeat(col0, length) + pos
        src = np.repeat(start, length) + pos
        last = pos == np.repeat(length - 1, length)
        nxt = np.asarray(self.tokens[np.minimum(src + 1, self.tokens.shape[0] - 1)], np.int32)
        out = {k: np.zeros((n, width), np.int32) for k in ("input_ids", "segment_ids", "positions")}
        out["labels"] = np.full((n, width), -1, np.int32)
        out["input_ids"][r, c] = self.tokens[src]
        out["labels"][r, c] = np.where(last, -1, nxt)
        out["segment_ids"][r, c] = np.repeat(np.arange(piece.size) - np.repeat(row_base, count) + 1, length)
        out["positions"][r, c] = pos
        return out


# ----------------------------------------------------------------------------- mixing and prefetch


class MergedDataset(Blocks):
    """Rows sampled from several datasets with fixed probabilities; see merge_datasets."""

    def __init__(self, datasets: Sequence[Blocks], weights: np.ndarray) -> None:
        self.datasets, self.weights = list(datasets), weights
        first = self.datasets[0]
        super().__init__(sum(d.num_blocks for d in self.datasets), first.block_size)
        for name in ("tokenizer", "vocab_size", "eos_token_id"):
            setattr(self, name, getattr(first, name, None))
        vals = [getattr(d, "validation", None) for d in self.datasets]
        self.validation = MergedDataset(vals, weights) if all(v is not None for v in vals) else None

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """Each row of global batch `step` comes from dataset k with probability weights[k] (a pure
        function of (seed, step)); that dataset serves its own sample j = step*batch_size + row."""
        rows = _rows_per_process(batch_size, process_index, process_count)
        if step < 0 or seed < 0:
            raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0.")
        rng = np.random.default_rng([seed, step, len(self.datasets)])
        which = rng.choice(len(self.datasets), size=batch_size, p=self.weights)
        first = process_index * rows
        which = which[first : first + rows]
        samples = step * batch_size + first + np.arange(rows, dtype=np.int64)
        parts = {}
        for k, ds in enumerate(self.datasets):
            if (sel := np.flatnonzero(which == k)).size:
                parts[k] = (sel, ds._gather(ds.blocks_for(samples[sel], seed)))
        keys = {key for _, part in parts.values() for key in part}
        out = {key: np.full((rows, self.block_size), -1 if key == "labels" else 0, np.int32) for key in keys}
        for sel, part in parts.values():
            part.setdefault("segment_ids", np.ones_like(part["input_ids"]))  # concatenated rows: one segment
            part.setdefault("positions", np.broadcast_to(np.arange(self.block_size), part["input_ids"].shape))
            for key in keys:
                out[key][sel] = part[key]
        return out

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fixed sampled batches (seed EVAL_SEED); num_batches defaults to one pass over all blocks."""
        _rows_per_process(batch_size, process_index, process_count)
        count = -(-self.num_blocks // batch_size) if num_batches is None else num_batches
        return (self.get_batch(s, batch_size, EVAL_SEED, process_index, process_count) for s in range(count))


def merge_datasets(
    datasets: Sequence[Blocks], weights: Sequence[float] | None = None, equalize: bool = False
) -> MergedDataset:
    """One dataset whose rows come from `datasets` with probabilities `weights` (normalised), or equal
    ones with equalize=True; default: proportional to size. Sampling, never truncation: every block of
    every dataset stays reachable. All datasets need the same block_size and tokenizer."""
    datasets = list(datasets)
    if not datasets:
        raise ValueError("merge_datasets needs at least one dataset.")
    if weights is not None and equalize:
        raise ValueError("Pass weights= or equalize=True, not both.")
    if {d.block_size for d in datasets} != {datasets[0].block_size}:
        raise ValueError(f"Datasets have block sizes {[d.block_size for d in datasets]}: use one block_size.")
    prints = {tokenizer_fingerprint(d.tokenizer) for d in datasets if getattr(d, "tokenizer", None)}
    if len(prints) > 1:
        raise ValueError(
            "Datasets were encoded with different tokenizers: encode them all with one tokenizer."
        )
    if equalize:
        weights = [1.0] * len(datasets)
    w = np.asarray([d.num_blocks for d in datasets] if weights is None else weights, dtype=np.float64)
    if w.shape != (len(datasets),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights={list(w)} must be {len(datasets)} non-negative numbers, not all zero.")
    return MergedDataset(datasets, w / w.sum())


def prefetch(iterable: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Yield the items of `iterable`, computed up to `depth` items ahead in a background thread.

    Exceptions are re-raised in the consumer; closing the generator stops the thread.
    """
    if depth < 1:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))

    threading.Thread(target=produce, name="gpt2_flax-prefetch", daemon=True).start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()


_prefetch = prefetch  # Blocks.iter_batches has an argument named `prefetch`


# ----------------------------------------------------------------------------- the dataset


def _holdout(n: int, fraction: float, what: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(training ids, validation ids): a fixed random `fraction` of range(n) held out, both sorted."""
    if not fraction:
        return None, None
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}.")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(
            f"validation_split={fraction} of {n} {what} leaves none for training: use a smaller "
            "validation_split, more text, or validation_files=."
        )
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def encode_sources(
    tokenizer: Tokenizer,
    file_or_files: Any,
    texts: str | Sequence[str] | None,
    cache_dir: PathLike | None,
    *,
    line_by_line: bool = False,
    text_column: str | int | None = None,
    header: bool = True,
    encoding_errors: str = "strict",
    num_proc: int = 1,
    progress: bool = False,
) -> tuple[list, Path, dict]:
    """Resolve the inputs and encode them into the cache (or reuse it): (sources, folder, metadata)."""
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}.")
    sources = resolve_sources(file_or_files, texts)
    if not sources:
        raise ValueError("No training text given: pass file_or_files (path, folder, glob or list) or texts.")
    options = {"line_by_line": line_by_line, "encoding_errors": encoding_errors}
    options.update(text_column=text_column, header=header)
    opts = EncodeOptions(text_column, header, num_proc, progress)
    return (sources, *build_token_cache(tokenizer, sources, cache_dir, options, opts))


def save_cache_folder(entry: Path, tokenizer: Tokenizer, path: PathLike) -> Path:
    """Copy a cache folder's tokens and metadata, plus the tokenizer, into the new folder `path`."""
    dest = Path(path).expanduser()
    if dest.exists():
        raise FileExistsError(f"{dest} already exists: choose a new folder or delete it first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for name in ("tokens.bin", "doc_offsets.npy", "meta.json"):
            if (entry / name).is_file():
                shutil.copyfile(entry / name, tmp / name)
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class TokenDataset(Blocks):
    """Training text encoded once into a cached token file, served as batches (see the module doc).

    file_or_files: text files, folders or globs (one document per file); .csv / .jsonl / .parquet files
    (one document per row, column `text_column`; CSV with header=False: text_column is an index); a
    `datasets.Dataset`; "hub:NAME[:CONFIG]" (needs internet); or a list mixing these. texts: strings,
    one document each. The tokenizer comes from `tokenizer=` or tokenizer_file / vocab_file + merges_file.

    line_by_line: every line (text files; blank lines skipped) / row / string is a document, packed
    into rows without crossing (see DocumentBlocks); long_documents="split" | "truncate" for documents
    longer than block_size. encoding_errors="strict" | "replace" for invalid UTF-8. validation_split
    holds out a fixed fraction of blocks (line_by_line: documents); validation_files encodes separate
    files; either gives `self.validation`, a dataset with get_batch and eval_batches. num_proc: worker
    processes for encoding; progress: show progress bars while encoding.

    The cache (cache_dir, default $GPT2_FLAX_CACHE or ~/.cache/gpt2_flax/tokens) is keyed by the
    tokenizer, each input's path, size and mtime (or content) and the encoding options; block_size,
    long_documents and validation_split can change without re-encoding.
    """

    def __init__(
        self,
        file_or_files: Any = None,
        vocab_file: PathLike | None = None,
        merges_file: PathLike | None = None,
        tokenizer_file: PathLike | None = None,
        block_size: int = 1024,
        cache_dir: PathLike | None = None,
        tokenizer: Tokenizer | None = None,
        texts: str | Sequence[str] | None = None,
        *,
        line_by_line: bool = False,
        text_column: str | int | None = None,
        header: bool = True,
        long_documents: str = "split",
        encoding_errors: str = "strict",
        validation_split: float = 0.0,
        validation_files: Any = None,
        num_proc: int = 1,
        progress: bool = False,
    ) -> None:
        if tokenizer is None:
            tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
        if long_documents not in ("split", "truncate"):
            raise ValueError(f"long_documents must be 'split' or 'truncate', got {long_documents!r}.")
        if validation_split and validation_files is not None:
            raise ValueError("Pass validation_split= or validation_files=, not both.")
        enc = {"line_by_line": line_by_line, "text_column": text_column, "header": header}
        enc.update(encoding_errors=encoding_errors, num_proc=num_proc, progress=progress)
        sources, entry, meta = encode_sources(tokenizer, file_or_files, texts, cache_dir, **enc)
        self.files = [s.path for s in sources if s.path is not None]
        name = f"Input file {self.files[0]}" if len(sources) == 1 and self.files else "The training text"
        self._open(entry, meta, tokenizer, block_size, long_documents, validation_split, name)
        if validation_files is not None:
            self.validation = TokenDataset(
                validation_files, block_size=block_size, cache_dir=cache_dir, tokenizer=tokenizer, **enc
            )

    def _open(
        self,
        entry: Path,
        meta: dict,
        tokenizer: Tokenizer,
        block_size: int,
        long_documents: str,
        validation_split: float,
        name: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id(tokenizer)
        self.cache_entry, self.cache_path, self.meta = entry, entry / "tokens.bin", meta
        self.num_documents = int(meta["num_documents"])
        self.line_by_line = bool(meta["options"]["line_by_line"])
        self.tokens = np.memmap(self.cache_path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.num_tokens = int(self.tokens.shape[0])
        self.validation: Any = None
        if self.line_by_line:
            offsets = np.load(entry / "doc_offsets.npy", mmap_mode="r")
            train, val = _holdout(self.num_documents, validation_split, "documents")
            stem = entry / f"pack1-b{block_size}-{long_documents}-v{validation_split}"  # 1: packing version
            args = (self.tokens, offsets, block_size)
            blocks: Blocks = DocumentBlocks(*args, train, long_documents, Path(f"{stem}-train"))
            if val is not None:
                self.validation = DocumentBlocks(*args, val, long_documents, Path(f"{stem}-val"))
        else:
            total = PackedBlocks(self.tokens, block_size, name).num_blocks  # raises if too few tokens
            train, val = _holdout(total, validation_split, "blocks")
            blocks = PackedBlocks(self.tokens, block_size, name, train)
            if val is not None:
                self.validation = PackedBlocks(self.tokens, block_size, name, val)
        self._blocks = blocks
        super().__init__(blocks.num_blocks, block_size)

    def _gather(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        return self._blocks._gather(blocks)

    def save_cache(self, path: PathLike) -> Path:
        """Copy the encoded tokens, metadata and tokenizer into a new folder `path`;
        `TokenDataset.from_cache(path)` loads it (on any machine) without re-encoding."""
        return save_cache_folder(self.cache_entry, self.tokenizer, path)

    @classmethod
    def from_cache(
        cls,
        path: PathLike,
        vocab_file: PathLike | None = None,
        merges_file: PathLike | None = None,
        tokenizer_file: PathLike | None = None,
        block_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        *,
        long_documents: str = "split",
        validation_split: float = 0.0,
    ) -> TokenDataset:
        """Load a folder written by save_cache (or a cache folder); the tokenizer defaults to the one
        saved with it, and any tokenizer given must be the one the tokens were encoded with."""
        entry = Path(path).expanduser()
        meta = read_cache(entry)
        if meta is None:
            raise FileNotFoundError(
                f"{entry} is not a complete token cache (tokens.bin + meta.json): write one with "
                "TokenDataset.save_cache(path) or `gpt2-flax encode --output`."
            )
        if tokenizer is None and (vocab_file or merges_file or tokenizer_file):
            tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_file=entry / "tokenizer.json")
        if (fp := tokenizer_fingerprint(tokenizer)) != meta["tokenizer"]:
            fix = "pass the tokenizer it was built with (its tokenizer.json is in the folder) or re-encode"
            raise ValueError(
                f"Token cache {entry} was encoded with another tokenizer (fingerprint "
                f"{meta['tokenizer'][:12]}, given {fp[:12]}): {fix} the text with this tokenizer."
            )
        ds = cls.__new__(cls)
        ds.files = []
        ds._open(entry, meta, tokenizer, block_size, long_documents, validation_split, f"Token cache {entry}")
        return ds

    def __repr__(self) -> str:
        fields = {
            "num_tokens": f"{self.num_tokens:,}",
            "num_documents": f"{self.num_documents:,}",
            "block_size": self.block_size,
            "num_blocks": f"{self.num_blocks:,}",
            "line_by_line": self.line_by_line,
            "vocab_size": self.vocab_size,
            "dtype": self.tokens.dtype,
            "cache": repr(str(self.cache_path)),
        }
        return f"TokenDataset({', '.join(f'{k}={v}' for k, v in fields.items())})"


def encode_main(
    file_or_files: Any,
    *,
    tokenizer_file: PathLike | None = None,
    vocab_file: PathLike | None = None,
    merges_file: PathLike | None = None,
    cache_dir: PathLike | None = None,
    output: PathLike | None = None,
    line_by_line: bool = False,
    text_column: str | int | None = None,
    header: bool = True,
    encoding_errors: str = "strict",
    num_proc: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """`gpt2-flax encode`: build the token cache up front (with progress bars), so training starts at
    once; with `output`, also save a copy for TokenDataset.from_cache. Returns a summary dict."""
    tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
    start = time.perf_counter()
    enc = {"line_by_line": line_by_line, "text_column": text_column, "header": header}
    enc.update(encoding_errors=encoding_errors, num_proc=num_proc, progress=progress)
    sources, entry, meta = encode_sources(tokenizer, file_or_files, None, cache_dir, **enc)
    seconds = time.perf_counter() - start
    mb = sum(s.path.stat().st_size for s in sources if s.path is not None) / 1e6
    summary = {"cache": str(entry), "num_tokens": meta["num_tokens"], "num_documents": meta["num_documents"]}
    summary.update(
        input_mb=round(mb, 3), seconds=round(seconds, 3), mb_per_s=round(mb / max(seconds, 1e-9), 3)
    )
    if output is not None:
        summary["saved"] = str(save_cache_folder(entry, tokenizer, output))
    return summary
