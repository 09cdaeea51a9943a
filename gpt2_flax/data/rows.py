"""Batches as a pure function of (seed, step, process index): the Rows base class, its simplest
layout PackedRows (concatenated mode), MixedRows (rows sampled from several, for merge_datasets),
plus `prefetch` to compute batches ahead in a thread.

A dataset is a numbered list of training rows of block_size tokens; subclasses say how to gather
rows, Rows says which rows make up each process's part of each step's batch, so resuming needs only
the step.
Only numpy here: no jax arrays are built inside the data loader.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gpt2_flax.errors import DataError

EVAL_SEED = 0  # eval_batches visits validation rows in this fixed order


def _rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size < 1 or process_count < 1:
        raise DataError(f"batch_size ({batch_size}) and process_count ({process_count}) must be >= 1.")
    if batch_size % process_count:
        raise DataError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: use a global "
            f"batch size that is a multiple of {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count}).")
    return batch_size // process_count


class Rows:
    """Training rows addressed by row index 0..num_rows-1; subclasses define `_gather(ids)`.

    Global sample j = step*batch_size + row is row permutation(seed, epoch)[j % num_rows] with
    epoch = j // num_rows: each epoch visits every row once, and any step can be recomputed
    without replaying earlier ones. Process p of process_count reads only its contiguous rows
    [p*rows, (p+1)*rows) of each global batch, rows = batch_size // process_count.
    """

    def __init__(self, num_rows: int, block_size: int) -> None:
        self.num_rows, self.block_size = num_rows, block_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()  # a prefetch thread and the caller may both ask for orders

    def __len__(self) -> int:
        return self.num_rows

    def _gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows with indices `ids`: int32 arrays (len(ids), block_size) by key."""
        raise NotImplementedError

    def row_order(self, seed: int, epoch: int) -> np.ndarray:
        """The order rows are visited in during `epoch`: a permutation of range(num_rows)."""
        with self._lock:
            if (seed, epoch) not in self._orders:
                if len(self._orders) >= 2:  # a batch spans at most two epochs: keep 2 permutations
                    self._orders.pop(next(iter(self._orders)))
                self._orders[seed, epoch] = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
            return self._orders[seed, epoch]

    def rows_for(self, samples: np.ndarray, seed: int) -> np.ndarray:
        """Row index of each global sample index."""
        epochs, positions = np.divmod(samples, self.num_rows)
        ids = np.empty(samples.shape[0], dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            ids[in_epoch] = self.row_order(seed, int(epoch))[positions[in_epoch]]
        return ids

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: int32 arrays (rows, block_size), numpy only.

        Keys: input_ids, labels (-1 = not trained); line_by_line adds segment_ids and positions.
        """
        rows = _rows_per_process(batch_size, process_index, process_count)
        if step < 0 or seed < 0:
            raise DataError(f"step ({step}) and seed ({seed}) must be >= 0.")
        samples = step * batch_size + process_index * rows + np.arange(rows, dtype=np.int64)
        return self._gather(self.rows_for(samples, seed))

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
        """Fixed evaluation batches: every row once (at most num_batches batches), in one fixed order.

        Rows past the last one are padding with labels -1, so a loss that skips labels < 0 is the
        exact mean over the rows; the same call always yields the same batches.
        """
        rows = _rows_per_process(batch_size, process_index, process_count)
        total = -(-self.num_rows // batch_size)
        order = self.row_order(EVAL_SEED, 0)
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


class PackedRows(Rows):
    """Concatenated mode: row i is the window tokens[i*block_size : i*block_size + block_size + 1].

    Inputs are its first block_size tokens and labels its last block_size, so all block_size positions
    are trained and consecutive rows share one token. `row_ids` restricts the dataset to a subset of
    the rows (validation_split); row k of the dataset is then row row_ids[k] of the file.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, name: str = "dataset", row_ids: np.ndarray | None = None
    ) -> None:
        if block_size < 1:
            raise DataError(f"block_size must be >= 1, got {block_size}.")
        if tokens.shape[0] < block_size + 1:
            raise DataError(
                f"{name} has only {tokens.shape[0]} tokens, but one training row needs block_size + 1 = "
                f"{block_size + 1}: use a smaller block_size or add more text."
            )
        self.tokens = tokens
        self.num_tokens = int(tokens.shape[0])
        self.row_ids = row_ids
        # -1: the last window needs one token past its row for the final label.
        total = (self.num_tokens - 1) // block_size
        super().__init__(total if row_ids is None else len(row_ids), block_size)

    def _gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        if self.row_ids is not None:
            ids = self.row_ids[ids]
        # (rows, block_size + 1) token windows, gathered from the memmap.
        offsets = ids[:, None] * self.block_size + np.arange(self.block_size + 1)
        windows = np.asarray(self.tokens[offsets], dtype=np.int32)
        return {"input_ids": windows[:, :-1].copy(), "labels": windows[:, 1:].copy()}  # C-contiguous


def mix_choice(seed: int, step: int, batch_size: int, weights: np.ndarray) -> np.ndarray:
    """Which part each row of global batch `step` comes from: (batch_size,) ints drawn with
    probabilities `weights`, a pure function of (seed, step) (MixedRows, and stream.py's mixtures)."""
    rng = np.random.default_rng([seed, step, len(weights)])
    return rng.choice(len(weights), size=batch_size, p=weights)


def combine_parts(
    gathered: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]], rows: int, block_size: int
) -> dict[str, np.ndarray]:
    """One batch of `rows` rows from (row indices, rows) pairs; a concatenated part's rows get the
    segment ids and positions of one document, so they mix with line_by_line rows."""
    keys = {key for _, got in gathered for key in got}
    out = {key: np.full((rows, block_size), -1 if key == "labels" else 0, np.int32) for key in keys}
    for sel, got in gathered:
        got.setdefault("segment_ids", np.ones_like(got["input_ids"]))  # concatenated rows: one segment
        got.setdefault("positions", np.broadcast_to(np.arange(block_size), got["input_ids"].shape))
        for key in keys:
            out[key][sel] = got[key]
    return out


class MixedRows(Rows):
    """Rows sampled from several Rows with fixed probabilities `weights` (merge_datasets)."""

    def __init__(self, parts: Sequence[Rows], weights: np.ndarray) -> None:
        self.parts, self.weights = list(parts), weights
        super().__init__(sum(p.num_rows for p in self.parts), self.parts[0].block_size)

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """Each row of global batch `step` comes from part k with probability weights[k] (a pure
        function of (seed, step)); that part serves its own sample j = step*batch_size + row."""
        rows = _rows_per_process(batch_size, process_index, process_count)
        if step < 0 or seed < 0:
            raise DataError(f"step ({step}) and seed ({seed}) must be >= 0.")
        first = process_index * rows
        which = mix_choice(seed, step, batch_size, self.weights)[first : first + rows]
        samples = step * batch_size + first + np.arange(rows, dtype=np.int64)
        gathered = []
        for k, part in enumerate(self.parts):
            if (sel := np.flatnonzero(which == k)).size:
                gathered.append((sel, part._gather(part.rows_for(samples[sel], seed))))
        return combine_parts(gathered, rows, self.block_size)

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fixed sampled batches (seed EVAL_SEED); num_batches defaults to one pass over all rows."""
        _rows_per_process(batch_size, process_index, process_count)
        count = -(-self.num_rows // batch_size) if num_batches is None else num_batches
        return (self.get_batch(s, batch_size, EVAL_SEED, process_index, process_count) for s in range(count))


# ----------------------------------------------------------------------------- prefetch


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


_prefetch = prefetch  # Rows.iter_batches has an argument named `prefetch`
