"""Streaming corpora: a `datasets.IterableDataset` tokenized on the fly and packed into training rows.

Nothing is cached and nothing is read before training starts, so a corpus larger than the disk
(`hub:NAME` with data.streaming=true) trains as it arrives. The pipeline is datasets' own, not a
hand-written one: `datasets.distributed.split_dataset_by_node` gives process p whole shards when the
shard count divides by process_count; otherwise every process reads the stream and keeps every
process_count-th piece of text (a document, or a ~1 MB piece of a long one: one big text file still
splits evenly), and
`IterableDataset.shuffle(seed, buffer_size)` / `set_epoch` the optional shuffle. The text of each
batch of documents goes through the cache's own encoder (cache.make_encoder, encoding.encode_rows),
and rows are cut by the cache's packing code: concatenated windows (PackedRows) or, line_by_line,
best-fit DocumentRows over windows of ~WINDOW_ROWS rows of documents (the cached path packs the whole
corpus at once, so its line_by_line rows differ; concatenated rows are the same, see below).

Order: process p's rows are its documents' tokens in stream order (each followed by EOS), cut into
windows of block_size + 1 tokens at multiples of block_size, epoch after epoch; without a shuffle
buffer and with one process these are exactly the cached path's rows 0, 1, 2, ... of the same text
(the cached path then visits them in a seeded random order). The order depends on process_count, so
a resumed run keeps the number of processes.

Resume is a deterministic skip: a run resumed at step s re-reads and re-encodes the s * batch_size /
process_count rows its process served and discards them. It needs nothing but the step (no iterator
state in the checkpoint, which would have to be saved per process, and datasets' load_state_dict
refills a shuffle buffer instead of restoring it, huggingface/datasets#7444, so it would not resume
bitwise). Its cost is the stream's encoding rate: ~230-250k tokens/s per process on the project's
2-core VM under load (BENCHMARKS.md, "Streaming"), ~7 minutes for a resume after 100 M tokens, so it
suits runs of up to a few billion tokens per process.
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gpt2_flax.data import cache
from gpt2_flax.data.encoding import EncodingOptions, choose_options, row_texts
from gpt2_flax.data.encoding import _encode_texts as encode_texts
from gpt2_flax.data.packing import DocumentRows
from gpt2_flax.data.records import _pick_column
from gpt2_flax.data.rows import EVAL_SEED, PackedRows, _pad_rows, _rows_per_process, prefetch
from gpt2_flax.data.sources import PathLike, iter_pieces
from gpt2_flax.errors import DataError, spell
from gpt2_flax.tokenizer import eos_token_id, load_tokenizer

READ_ROWS = 256  # documents per datasets batch read from the stream
WINDOW_ROWS = 256  # line_by_line: documents are best-fit packed in windows of ~this many rows

Chunk = dict[str, np.ndarray]  # rows by key: input_ids, labels (+ segment_ids, positions), (n, block_size)


def is_stream(obj: Any) -> bool:
    """Whether `obj` is a `datasets.IterableDataset`."""
    return type(obj).__name__ == "IterableDataset" and type(obj).__module__.startswith("datasets")


def check_stream_options(options: EncodingOptions) -> None:
    """The encoding options a stream cannot honour: a clear error naming the fix."""
    if not options.header:
        raise DataError(
            f"{spell('data.header', False)} does not apply to a stream (its rows have named columns): "
            f"leave it out and name the column with {spell('data.text_column', '<name>')}."
        )
    if options.skip_bad_records:
        raise DataError(
            f"{spell('data.skip_bad_records', True)} needs the files checked before training, which a "
            "stream never is: leave it out (a record without text is skipped; one that is not text is "
            "an error), or train without streaming."
        )


class RowReader:
    """Takes rows off an iterator of row chunks, n at a time."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self.chunks, self.chunk, self.at = chunks, None, 0

    def take(self, n: int, keep: bool = True) -> Chunk | None:
        """The next n rows (fewer if the chunks end; None if none are left); keep=False discards them."""
        parts: list[Chunk] = []
        while n > 0:
            if self.chunk is None or self.at == len(self.chunk["input_ids"]):
                self.chunk, self.at = next(self.chunks, None), 0
                if self.chunk is None:
                    break
            k = min(n, len(self.chunk["input_ids"]) - self.at)
            if keep:
                parts.append({key: v[self.at : self.at + k] for key, v in self.chunk.items()})
            self.at, n = self.at + k, n - k
        if not parts:
            return None
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class StreamBatches:
    """iter_batches for streams (StreamingDataset, and StreamingMix in stream_mix.py): a subclass
    yields the batches of given steps from its `batches`; this checks the arguments and prefetches."""

    streaming = True
    validation_split = 0.0

    def batches(
        self, batch_size: int, seed: int, start: int, steps: Iterable[int], process: tuple[int, int]
    ) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

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
        """This process's rows of batches start_step, start_step + 1, ... (forever, or num_steps);
        prefetch=N reads, encodes and packs up to N batches ahead in a background thread."""
        _rows_per_process(batch_size, process_index, process_count)  # fail now, not at first next()
        if start_step < 0 or seed < 0:
            raise DataError(f"start_step ({start_step}) and seed ({seed}) must be >= 0.")
        end = None if num_steps is None else start_step + num_steps
        steps = itertools.count(start_step) if end is None else range(start_step, end)
        batches = self.batches(batch_size, seed, start_step, steps, (process_index, process_count))
        return _prefetch(batches, prefetch) if prefetch else batches


class StreamingDataset(StreamBatches):
    """A `datasets.IterableDataset` tokenized on the fly and served as training batches (module doc).

    The tokenizer must be given (there is no pass over the data to train one: train_tokenizer on a
    sample first; the CLI trains one on the stream's first data.stream_tokenizer_mb). text_column: the
    column holding the text (default "text", or the only column). line_by_line / long_documents mean
    what they mean for TokenDataset. shuffle_buffer > 0 shuffles documents with datasets' buffer
    shuffle, seeded by the training seed and the epoch. validation: a dataset (streaming or cached)
    to evaluate on, or None. name: how messages and run.json name the stream.
    """

    def __init__(
        self,
        data: Any,
        tokenizer: Tokenizer | None = None,
        vocab_file: PathLike | None = None,
        merges_file: PathLike | None = None,
        tokenizer_file: PathLike | None = None,
        block_size: int = 1024,
        *,
        line_by_line: bool = False,
        text_column: str | int | None = None,
        long_documents: str = "split",
        shuffle_buffer: int = 0,
        validation: Any = None,
        encoding: EncodingOptions | None = None,
        name: str | None = None,
    ) -> None:
        if not is_stream(data):
            raise DataError(
                f"StreamingDataset streams a datasets.IterableDataset, not a {type(data).__name__}: load "
                "it with streaming=True (or ds.to_iterable_dataset()), or use TokenDataset."
            )
        if tokenizer is None and not (vocab_file or merges_file or tokenizer_file):
            raise DataError(
                "A stream needs its tokenizer up front (nothing is read before training to train one "
                "on): pass tokenizer= / tokenizer_file= / vocab_file + merges_file, e.g. from "
                "train_tokenizer(texts=<a sample of the stream>)."
            )
        self.encoding = choose_options(
            encoding, EncodingOptions(line_by_line=line_by_line, text_column=text_column)
        )
        check_stream_options(self.encoding)
        if block_size < (least := 2 if self.encoding.line_by_line else 1):
            raise DataError(f"block_size must be >= {least} here, got {block_size}.")
        if long_documents not in ("split", "truncate"):
            raise DataError(f"long_documents must be 'split' or 'truncate', got {long_documents!r}.")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be >= 0 (0 = stream order), got {shuffle_buffer}.")
        self.tokenizer = tokenizer or load_tokenizer(vocab_file, merges_file, tokenizer_file)
        self.data, self.block_size, self.long_documents = data, block_size, long_documents
        self.shuffle_buffer, self.validation = shuffle_buffer, validation
        info = getattr(data, "info", None)
        self.name = name or f"stream {getattr(info, 'dataset_name', None) or 'IterableDataset'}"
        self.files = [self.name]  # what run.json records, so a resume on another stream is refused
        self.column = stream_column(data, self.encoding.text_column, self.name)
        self._encoder = cache.make_encoder(self.tokenizer, self.encoding)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id(self.tokenizer)
        self._warned = False

    @property
    def line_by_line(self) -> bool:
        return self.encoding.line_by_line

    # ------------------------------------------------------------------------- rows

    def _part(
        self, seed: int, process_index: int, process_count: int, shuffle: bool
    ) -> tuple[Any, tuple[int, int] | None]:
        """This process's stream, and how its texts are dealt: None when the stream is already its own
        (one process, or whole shards per process: `split_dataset_by_node`, which then reads only its
        shards), else (process_index, process_count): every process reads the whole stream (as datasets'
        own split by examples would) and keeps every process_count-th piece of text (`_texts`)."""
        from datasets.distributed import split_dataset_by_node

        part = self.data.select_columns([self.column])
        deal = None
        if process_count > 1:
            if getattr(part, "n_shards", 0) % process_count == 0:
                part = split_dataset_by_node(part, rank=process_index, world_size=process_count)
            else:
                deal = (process_index, process_count)
        if shuffle and self.shuffle_buffer:  # the same seed on every process: the same order to deal
            part = part.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        return part, deal

    def _texts(self, part: Any, deal: tuple[int, int] | None) -> Iterator[tuple[list[str], list[bool]]]:
        """~CHUNK_CHARS of text at a time, in stream order: (texts, whether each ends a document). A
        long document (concatenated mode) is cut at safe points into pieces that encode like the
        whole (sources.iter_pieces), so one huge record never makes one huge encode call. deal=(p, n):
        only every n-th piece from the p-th on (a document, or a piece of a long one), so that a few
        long documents (one big text file: the seed page's input.txt) still split evenly over the
        processes; a piece that does not end its document gets no EOS, as in the whole."""
        texts: list[str] = []
        ends: list[bool] = []
        size, chunk, k = 0, cache.CHUNK_CHARS, -1
        for batch in part.iter(batch_size=READ_ROWS):
            for doc in row_texts(batch[self.column], self.name, self.column):
                long = not self.line_by_line and len(doc) > chunk
                pieces = list(iter_pieces(io.StringIO(doc).read, self.name, chunk, chunk)) if long else [doc]
                for i, piece in enumerate(pieces):
                    k += 1
                    if deal is not None and k % deal[1] != deal[0]:
                        continue
                    texts.append(piece)
                    ends.append(i == len(pieces) - 1)
                    size += len(piece)
                    if size >= chunk:
                        yield texts, ends
                        texts, ends, size = [], [], 0
        if texts:
            yield texts, ends

    def _encoded(self, part: Any, deal: tuple[int, int] | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(token ids, document lengths) of each group of texts: the cache's encoding of them."""
        for texts, ends in self._texts(part, deal):
            out = encode_texts(texts, ends, self._encoder)
            yield out["ids"][0], out["lengths"][0]

    def row_chunks(
        self, seed: int, process_index: int, process_count: int, *, shuffle: bool = True, cycle: bool = True
    ) -> Iterator[Chunk]:
        """This process's rows in order, epoch after epoch (cycle=False: one epoch), as chunks."""
        part, deal = self._part(seed, process_index, process_count, shuffle)
        tokens = np.empty(0, self._encoder.dtype)  # concatenated: tokens not yet in a row
        ids: list[np.ndarray] = []  # line_by_line: the documents of the open window
        lengths: list[np.ndarray] = []
        for epoch in itertools.count() if cycle else range(1):
            part.set_epoch(epoch)  # the shuffle's seed is (seed, epoch); no-op without one
            found = False
            for chunk_ids, chunk_lengths in self._encoded(part, deal):
                found = found or chunk_ids.size > 0
                if not self.line_by_line:
                    tokens = np.concatenate([tokens, chunk_ids])
                    if (n := (tokens.size - 1) // self.block_size) > 0:
                        yield PackedRows(tokens, self.block_size, self.name)._gather(np.arange(n))
                        tokens = tokens[n * self.block_size :]
                    continue
                ids.append(chunk_ids)
                lengths.append(chunk_lengths)
                if sum(i.size for i in ids) >= WINDOW_ROWS * self.block_size:
                    yield self._pack(ids, lengths)
                    ids, lengths = [], []
            if not found:
                if process_count > 1:
                    raise DataError(
                        f"{self.name} holds no text for process {process_index} of {process_count}: "
                        f"its documents (and pieces of ~{cache.CHUNK_CHARS // 2**20 or 1} MB of long ones) "
                        f"are dealt to the processes in turn, and there are fewer than {process_count}. "
                        "Check the dataset, split and column; a corpus this small trains on the cached "
                        "path (drop data.streaming)."
                    )
                raise DataError(f"{self.name} holds no text: check the dataset, split and column.")
            if ids:  # a window never spans two epochs
                yield self._pack(ids, lengths)
                ids, lengths = [], []

    def _pack(self, ids: list[np.ndarray], lengths: list[np.ndarray]) -> Chunk:
        """A window of line_by_line documents best-fit packed into rows (the cached path's packing)."""
        doc_lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        if not self._warned and (doc_lengths > self.block_size).any():
            self._warned = True
            action = "split into pieces" if self.long_documents == "split" else "truncated"
            warnings.warn(
                f"{self.name} has documents longer than block_size={self.block_size} tokens (EOS "
                f"included); they are {action}: pass a larger block_size, or long_documents= to choose.",
                stacklevel=2,
            )
        rows = DocumentRows(
            np.concatenate(ids), offsets, self.block_size, None, self.long_documents, warn=False
        )
        return rows._gather(np.arange(rows.num_rows))

    # ------------------------------------------------------------------------- batches

    def reader(
        self, seed: int, process_index: int, process_count: int, evaluation: bool = False
    ) -> RowReader:
        """A RowReader over this process's rows (evaluation: in stream order, one pass at a time)."""
        shuffle = not evaluation
        return RowReader(self.row_chunks(seed, process_index, process_count, shuffle=shuffle))

    def batches(
        self, batch_size: int, seed: int, start: int, steps: Iterable[int], process: tuple[int, int]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches `steps` (from `start` on) of this process's rows (StreamBatches.iter_batches)."""
        rows = _rows_per_process(batch_size, *process)
        reader = self.reader(seed, *process)
        reader.take(start * rows, keep=False)  # the deterministic skip of a resume
        for _ in steps:
            yield reader.take(rows)  # type: ignore[misc]  # cycle=True: never runs out

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """The same fixed batches every time: the stream's first rows in stream order; num_batches=None
        is one pass (one process only: processes' parts differ in length), the last batch padded."""
        rows = _rows_per_process(batch_size, process_index, process_count)
        if num_batches is None and process_count > 1:
            raise DataError(
                f"A streamed validation set has no known length to split over {process_count} processes: "
                f"pass {spell('train.eval_batches', '<N>')}."
            )
        if num_batches is not None:
            reader = self.reader(EVAL_SEED, process_index, process_count, evaluation=True)
            return (reader.take(rows) for _ in range(num_batches))  # type: ignore[misc]
        one_pass = RowReader(self.row_chunks(EVAL_SEED, 0, 1, shuffle=False, cycle=False))
        chunks = iter(lambda: one_pass.take(rows), None)
        return ({k: _pad_rows(v, rows, -1 if k == "labels" else 0) for k, v in c.items()} for c in chunks)

    def __repr__(self) -> str:
        return (
            f"StreamingDataset({self.name!r}, column={self.column!r}, block_size={self.block_size}, "
            f"line_by_line={self.line_by_line}, vocab_size={self.vocab_size})"
        )


_prefetch = prefetch  # iter_batches has an argument named `prefetch`


def as_dataset(data: Any, tokenizer: Tokenizer, block_size: int) -> Any:
    """`data` itself, or a StreamingDataset of it if it is a datasets.IterableDataset (GPT2.train)."""
    return StreamingDataset(data, tokenizer, block_size=block_size) if is_stream(data) else data


def stream_column(data: Any, text_column: str | int | None, name: str) -> str:
    """The column of a stream that holds the text ("text", or the only column, unless named)."""
    names = data.column_names
    if names is None:  # features unknown until read (some Hub datasets): the first record tells
        first = next(iter(data), None)
        if first is None:
            raise DataError(f"{name} holds no records: check the dataset and split.")
        names = list(first)
    fix = f"pass {spell('data.text_column', '<name>')} naming the column that holds the text."
    return _pick_column(list(names), text_column, name, fix)


def mixed_parts(datasets: Sequence[Any]) -> bool:
    """Whether a merge needs the streaming mixture (any part is a stream)."""
    return any(getattr(d, "streaming", False) for d in datasets)
