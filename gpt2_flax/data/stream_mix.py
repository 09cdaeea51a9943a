"""Mixtures with streams: merge_datasets when any part is a StreamingDataset.

Rows are mixed, not documents: row r of global batch `step` comes from part k =
mix_choice(seed, step)[r], the very draw MixedRows makes for cached parts, so the weights are shares
of training rows (tokens) whatever the parts' document lengths, and the choice is a pure function of
(seed, step). A stream part serves its next row (its own order, see stream.py); a cached part its
sample step * batch_size + r, as in MixedRows, so cached and streamed parts mix too. (datasets'
`interleave_datasets(probabilities=...)` mixes documents instead: a source of long documents would
then get more than its weight of the tokens.)

A resume counts, from the draws alone, how many rows each stream part served before the start step
(a few microseconds a step) and skips that many rows of each, as a single stream does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gpt2_flax.data.rows import EVAL_SEED, _rows_per_process, combine_parts, mix_choice
from gpt2_flax.data.stream import StreamBatches
from gpt2_flax.errors import DataError, spell


class StreamingMix(StreamBatches):
    """Rows sampled from streamed (and cached) datasets with fixed probabilities `weights`."""

    def __init__(self, datasets: Sequence[Any], weights: np.ndarray) -> None:
        self.datasets, self.weights = list(datasets), weights
        first = self.datasets[0]
        for name in ("tokenizer", "vocab_size", "eos_token_id", "block_size", "encoding", "long_documents"):
            setattr(self, name, getattr(first, name, None))
        vals = [getattr(d, "validation", None) for d in self.datasets]
        self.validation = StreamingMix(vals, weights) if all(v is not None for v in vals) else None

    def batches(
        self,
        batch_size: int,
        seed: int,
        start: int,
        steps: Iterable[int],
        process: tuple[int, int],
        evaluation: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches `steps` (from `start` on): the draws of mix_choice, served by the parts."""
        rows = _rows_per_process(batch_size, *process)
        first = process[0] * rows
        readers = {
            k: d.reader(seed, *process, evaluation=evaluation)
            for k, d in enumerate(self.datasets)
            if getattr(d, "streaming", False)
        }
        served = np.zeros(len(self.datasets), np.int64)  # rows each part gave this process before start
        for step in range(start):
            which = mix_choice(seed, step, batch_size, self.weights)[first : first + rows]
            served += np.bincount(which, minlength=len(self.datasets))
        for k, reader in readers.items():
            reader.take(int(served[k]), keep=False)  # the deterministic skip of a resume
        for step in steps:
            which = mix_choice(seed, step, batch_size, self.weights)[first : first + rows]
            samples = step * batch_size + first + np.arange(rows, dtype=np.int64)
            gathered = []
            for k, part in enumerate(self.datasets):
                if not (sel := np.flatnonzero(which == k)).size:
                    continue
                if k in readers:
                    got = readers[k].take(sel.size)
                else:
                    got = part.rows._gather(part.rows.rows_for(samples[sel], seed))
                gathered.append((sel, got))
            yield combine_parts(gathered, rows, self.block_size)

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """num_batches fixed sampled batches (seed EVAL_SEED, the streams in stream order)."""
        if num_batches is None:
            raise DataError(
                "A validation mixture with a stream has no known length: pass "
                f"{spell('train.eval_batches', '<N>')}."
            )
        process = (process_index, process_count)
        return self.batches(batch_size, EVAL_SEED, 0, range(num_batches), process, evaluation=True)
