"""Token datasets: encode text once into a cached token file, then serve training batches from it.

Encoding (cache.py; sources.py reads the inputs): every document becomes its token ids followed by
`<|endoftext|>` (line_by_line: `<|endoftext|> text <|endoftext|>`), all concatenated into one token file
(uint16 when the vocab has < 65536 entries, else uint32) plus JSON metadata, in a cache folder keyed by
the tokenizer, the inputs and the token-changing encoding options. The file is memory-mapped, so
corpora larger than RAM work and every process of a multi-host job can open the same cache; a saved
cache on a URL (from_cache("gs://...")) is read in place by byte ranges instead (remote.RemoteTokens).

Batches are a pure function of (seed, step, process index), so resuming needs only the step number:
- concatenated (default): windows of block_size + 1 tokens cut at multiples of block_size.
- line_by_line: whole documents packed into rows of block_size tokens (best fit, never crossing a row);
  each token has a segment id (1..k within its row, 0 = padding) and a position restarting at 0 in every
  document; labels are the next token of the same document and -1 elsewhere, so with the model's
  `segment_ids` / `positions` nothing is attended to or predicted across documents.

This module holds TokenDataset and merge_datasets, the datasets users build; the modules before
it in the flow are listed in the package docstring (gpt2_flax/data/__init__.py).
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gpt2_flax.data import multihost
from gpt2_flax.data.cache import (
    cache_digest,
    check_cache,
    default_cache_dir,
    encode_sources,
    save_cache_folder,
)
from gpt2_flax.data.encoding import EncodingOptions, choose_options
from gpt2_flax.data.packing import DocumentRows
from gpt2_flax.data.remote import Location, RemoteTokens, is_url, join, read_all
from gpt2_flax.data.rows import MixedRows, PackedRows, Rows
from gpt2_flax.data.sources import PathLike
from gpt2_flax.data.stream import mixed_parts
from gpt2_flax.data.stream_mix import StreamingMix
from gpt2_flax.errors import DataError
from gpt2_flax.tokenizer import eos_token_id, load_tokenizer, tokenizer_fingerprint

# ----------------------------------------------------------------------------- what training reads


class _Dataset:
    """A dataset's batches, served by its `rows` (rows.py: which rows make up each process's part of
    each step's batch, and how a row is gathered); `validation` is a dataset of the same kind, or None."""

    rows: Rows
    validation: Any

    @property
    def block_size(self) -> int:
        return self.rows.block_size

    @property
    def num_blocks(self) -> int:
        """Training rows of block_size tokens; one epoch visits each once. (The public name, like
        block_size; inside gpt2_flax.data they are rows, and "block" is only a transformer layer.)"""
        return self.rows.num_rows

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: int32 arrays (rows, block_size), numpy only.

        Keys: input_ids, labels (-1 = not trained); line_by_line adds segment_ids and positions.
        """
        return self.rows.get_batch(step, batch_size, seed, process_index, process_count)

    # Rows' own iter_batches: steps -> self.get_batch, so a get_batch patched on this dataset is used.
    iter_batches = Rows.iter_batches

    def eval_batches(
        self, batch_size: int, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fixed evaluation batches over every row, in one fixed order (padding rows have labels -1)."""
        return self.rows.eval_batches(batch_size, num_batches, process_index, process_count)


# ----------------------------------------------------------------------------- the dataset

_SPLIT_SEED = 20240229  # which rows / documents validation_split holds out: never the training seed


def _holdout(n: int, fraction: float, what: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(training ids, validation ids): a fixed random `fraction` of range(n) held out, both sorted."""
    if not fraction:
        return None, None
    if not 0 < fraction < 1:
        raise DataError(f"validation_split must be in [0, 1), got {fraction}.")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(
            f"validation_split={fraction} of {n} {what} leaves none for training: use a smaller "
            "validation_split, more text, or validation_files=."
        )
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TokenDataset(_Dataset):
    """Training text encoded once into a cached token file, served as batches (see the module doc).

    file_or_files: text files, folders or globs (one document per file); .csv / .jsonl / .parquet files
    (one document per row, column `text_column`; CSV with header=False: text_column is an index); a
    `datasets.Dataset`; "hub:NAME[:CONFIG][@SPLIT]" (needs internet; split "train" by default); or a
    list mixing these. texts: strings, one document each. The tokenizer comes from `tokenizer=` or
    tokenizer_file / vocab_file + merges_file.

    line_by_line: every line (text files; blank lines skipped) / row / string is a document, packed
    into rows without crossing (see DocumentRows); long_documents="split" | "truncate" for documents
    longer than block_size. encoding_errors="strict" | "replace" for invalid UTF-8. num_proc: worker
    processes for encoding; progress: show progress bars while encoding. A CSV row with another
    number of fields than its header, a JSONL line that is not JSON or lacks the text field, or an
    empty text is a DataError naming the file and line; skip_bad_records=True skips them with a
    warning instead. encoding: all of these encoding settings as one EncodingOptions (e.g.
    DataConfig.encoding), instead of the separate keywords; `self.encoding` records the options used.

    validation_split holds out a fixed fraction of rows (line_by_line: documents); validation_files
    encodes separate files; either gives `self.validation`, a TokenDataset of the held-out rows or of
    those files (else None). Batches come from `self.rows` (PackedRows, or DocumentRows for
    line_by_line).

    The cache (cache_dir, default $GPT2_FLAX_CACHE or ~/.cache/gpt2_flax/tokens) is keyed by the
    tokenizer, each input's path, size and mtime (or content) and the token-changing encoding options;
    block_size, long_documents, validation_split, num_proc and progress can change without re-encoding.
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
        skip_bad_records: bool = False,
        encoding: EncodingOptions | None = None,
    ) -> None:
        if tokenizer is None:
            tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
        if long_documents not in ("split", "truncate"):
            raise DataError(f"long_documents must be 'split' or 'truncate', got {long_documents!r}.")
        if validation_split and validation_files is not None:
            raise DataError("Pass validation_split= or validation_files=, not both.")
        given = EncodingOptions(
            line_by_line=line_by_line,
            text_column=text_column,
            header=header,
            encoding_errors=encoding_errors,
            skip_bad_records=skip_bad_records,
            num_proc=num_proc,
            progress=progress,
        )
        self.encoding = choose_options(encoding, given)
        sources, entry, meta = encode_sources(tokenizer, file_or_files, texts, cache_dir, self.encoding)
        self.files = [s.path for s in sources if s.path is not None]
        name = f"Input file {self.files[0]}" if len(sources) == 1 and self.files else "The training text"
        self._open(entry, meta, tokenizer, block_size, long_documents, validation_split, name)
        if validation_files is not None:
            kw = {"block_size": block_size, "cache_dir": cache_dir, "tokenizer": tokenizer}
            self.validation = TokenDataset(validation_files, **kw, encoding=self.encoding)

    def _open(
        self,
        entry: Location,
        meta: dict,
        tokenizer: Tokenizer,
        block_size: int,
        long_documents: str,
        validation_split: float,
        name: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.long_documents, self.validation_split = long_documents, validation_split
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id(tokenizer)
        self.cache_entry, self.cache_path, self.meta = entry, join(entry, "tokens.bin"), meta
        self.num_documents = int(meta["num_documents"])
        if is_url(self.cache_path):  # read in place, a few ranged reads per batch
            self.tokens: Any = RemoteTokens(str(self.cache_path), meta["dtype"], meta["num_tokens"])
        else:
            self.tokens = np.memmap(self.cache_path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.num_tokens = int(self.tokens.shape[0])
        self.validation: TokenDataset | None = None
        if self.line_by_line:
            offsets = _doc_offsets(entry)
            train, val = _holdout(self.num_documents, validation_split, "documents")
            name = f"pack1-b{block_size}-{long_documents}-v{validation_split}"  # 1: packing version
            stem = _packing_folder(entry, meta) / name
            args = (self.tokens, offsets, block_size)
            self.rows = DocumentRows(*args, train, long_documents, Path(f"{stem}-train"))
            if val is not None:
                self.validation = self._view(DocumentRows(*args, val, long_documents, Path(f"{stem}-val")))
        else:
            total = PackedRows(self.tokens, block_size, name).num_rows  # raises if too few tokens
            train, val = _holdout(total, validation_split, "blocks")  # "blocks", as in num_blocks
            self.rows = PackedRows(self.tokens, block_size, name, train)
            if val is not None:
                self.validation = self._view(PackedRows(self.tokens, block_size, name, val))

    @property
    def line_by_line(self) -> bool:
        return self.encoding.line_by_line

    def _view(self, rows: Rows) -> TokenDataset:
        """This dataset served from other rows of its token file, without a validation set of its own."""
        view = copy.copy(self)
        view.rows, view.validation = rows, None
        return view

    def save_cache(self, path: PathLike) -> Location:
        """Copy the encoded tokens, metadata and tokenizer into a new folder `path` (local, or a URL
        such as gs://bucket/cache: uploaded, meta.json last); `TokenDataset.from_cache(path)` loads
        it (on any machine, a URL in place) without re-encoding."""
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
        """Load a folder written by save_cache (or a cache folder), local or a URL (gs://..., any
        fsspec protocol: read in place by byte ranges); the tokenizer defaults to the one saved with
        it, and any tokenizer given must be the one the tokens were encoded with."""
        entry: Location = str(path).rstrip("/") if is_url(str(path)) else Path(path).expanduser()
        meta, problem = check_cache(entry)
        if meta is None:
            raise FileNotFoundError(
                f"{entry} is not a complete token cache (tokens.bin + meta.json): {problem}. Fix: write "
                "one with TokenDataset.save_cache(path) or `gpt2-flax encode FILES --output PATH`."
            )
        if tokenizer is None and (vocab_file or merges_file or tokenizer_file):
            tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_file=join(entry, "tokenizer.json"))
        if (fp := tokenizer_fingerprint(tokenizer)) != meta["tokenizer"]:
            fix = "pass the tokenizer it was built with (its tokenizer.json is in the folder) or re-encode"
            raise DataError(
                f"Token cache {entry} was encoded with another tokenizer (fingerprint "
                f"{meta['tokenizer'][:12]}, given {fp[:12]}): {fix} the text with this tokenizer."
            )
        if multihost.active():  # every host's copy of a saved cache must hold the same tokens
            multihost.same_everywhere(entry, cache_digest(entry, meta))
        ds = cls.__new__(cls)
        ds.files, ds.encoding = [], EncodingOptions(**meta["options"])
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


def _doc_offsets(entry: Location) -> np.ndarray:
    """doc_offsets.npy: memory-mapped when local; read whole from a URL (8 bytes a document)."""
    path = join(entry, "doc_offsets.npy")
    if not is_url(path):
        return np.load(path, mmap_mode="r")
    return np.load(io.BytesIO(read_all(path, "doc_offsets.npy")))


def _packing_folder(entry: Location, meta: dict) -> Path:
    """Where the line_by_line packing index goes: next to a local token file; for a URL cache, in a
    local folder keyed by the URL and its tokens (the bucket stays read-only to training)."""
    if not is_url(entry):
        return Path(entry)
    key = hashlib.sha256(f"{entry}\n{meta.get('tokens_sha256')}".encode()).hexdigest()[:24]
    folder = default_cache_dir() / "remote-packing" / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no local cache dir: DocumentRows keeps the packing in memory only
        pass
    return folder


# ----------------------------------------------------------------------------- mixing


class MergedDataset(_Dataset):
    """Rows sampled from several datasets with fixed probabilities; see merge_datasets."""

    def __init__(self, datasets: Sequence[_Dataset | Rows], weights: np.ndarray) -> None:
        self.datasets, self.weights = list(datasets), weights
        self.rows = MixedRows([d.rows if isinstance(d, _Dataset) else d for d in self.datasets], weights)
        first = self.datasets[0]
        for name in ("tokenizer", "vocab_size", "eos_token_id"):
            setattr(self, name, getattr(first, name, None))
        vals = [getattr(d, "validation", None) for d in self.datasets]
        self.validation = MergedDataset(vals, weights) if all(v is not None for v in vals) else None


def merge_datasets(
    datasets: Sequence[Any], weights: Sequence[float] | None = None, equalize: bool = False
) -> MergedDataset | StreamingMix:
    """One dataset whose rows come from `datasets` with probabilities `weights` (normalised), or equal
    ones with equalize=True; default: proportional to size. Sampling, never truncation: every row of
    every dataset stays reachable. All datasets need the same block_size and tokenizer. With any
    StreamingDataset among them the result is a StreamingMix (stream_mix.py: the same row draws;
    weights= or equalize=True needed)."""
    datasets = list(datasets)
    if not datasets:
        raise DataError("merge_datasets needs at least one dataset.")
    if weights is not None and equalize:
        raise DataError("Pass weights= or equalize=True, not both.")
    if {d.block_size for d in datasets} != {datasets[0].block_size}:
        raise DataError(f"Datasets have block sizes {[d.block_size for d in datasets]}: use one block_size.")
    prints = {tokenizer_fingerprint(d.tokenizer) for d in datasets if getattr(d, "tokenizer", None)}
    if len(prints) > 1:
        raise DataError(
            "Datasets were encoded with different tokenizers: encode them all with one tokenizer."
        )
    if equalize:
        weights = [1.0] * len(datasets)
    streams = mixed_parts(datasets)
    if streams and weights is None:
        raise DataError(
            "merge_datasets with a streaming dataset needs weights= or equalize=True: a stream's size "
            "is not known, so the default (proportional to size) cannot be computed."
        )
    w = np.asarray([len(d) for d in datasets] if weights is None else weights, dtype=np.float64)
    if w.shape != (len(datasets),) or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"weights={list(w)} must be {len(datasets)} non-negative numbers, not all zero.")
    return StreamingMix(datasets, w / w.sum()) if streams else MergedDataset(datasets, w / w.sum())
