"""The encoding pass: `datasets.map` encoders that turn sources (see sources.py) into token ids.

EncodingOptions is the one object for the encoding settings (DataConfig.encoding builds it from the
flat data.* keys; TokenDataset, the cache and `gpt2-flax encode` take it); its token-changing fields
key the cache. Encoder is the runtime state of one pass (the tokenizer and what follows from it).

Text files arrive as work items (path, byte range) that each worker reads and encodes itself; row
sources (CSV / JSONL / Parquet / lists / datasets) are encoded in batches of ~1 MB of text. Each map
call returns one row holding the token ids of its whole batch (plus document lengths and count), and
`encode_stream` appends those rows, in source order, to tokens.bin and lengths.bin; cache.py
turns that folder into a cache entry.

`read_parts` (check every source, then group them into work items / text columns) and the text
functions (`item_texts`, `row_texts`) serve two readers: the encoding pass, and `iter_texts`, which
streams the same texts, in the same order, into `train_tokenizer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_flax.data.records import check_records, load_rows, row_column
from gpt2_flax.data.sources import (
    Source,
    check_file,
    iter_pieces,
    normalize_newlines,
    read_range,
    scan_text_file,
)
from gpt2_flax.errors import DataError, spell

# ----------------------------------------------------------------------------- datasets.map encoders


@dataclass(frozen=True)
class EncodingOptions:
    """How text becomes tokens. The first five fields change the tokens, so they key the token cache
    (cache_key); num_proc and progress only change how the encoding runs."""

    line_by_line: bool = False  # every line / CSV row / record / string is a document: EOS text EOS
    text_column: str | int | None = None  # CSV / JSONL / Parquet / dataset column holding the text
    header: bool = True  # CSV files start with a header row (header=False: text_column is an index)
    encoding_errors: str = "strict"  # invalid UTF-8: "strict" (error naming file and offset) | "replace"
    skip_bad_records: bool = False  # bad CSV/JSONL records: skipped with a warning, not an error
    num_proc: int = 1  # datasets.map worker processes; 1 = in-process (the tokenizer still uses all cores)
    progress: bool = False  # datasets' progress bars

    def __post_init__(self) -> None:
        if self.encoding_errors not in ("strict", "replace"):
            raise DataError(f"encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}.")

    def cache_key(self) -> dict[str, Any]:
        """The token-changing fields, as the cache key and meta.json's "options" hold them."""
        key: dict[str, Any] = {"line_by_line": self.line_by_line, "encoding_errors": self.encoding_errors}
        key.update(text_column=self.text_column, header=self.header)
        if self.skip_bad_records:  # another token stream than the strict one (which would be an error)
            key["skip_bad_records"] = True
        return key


def choose_options(encoding: EncodingOptions | None, given: EncodingOptions) -> EncodingOptions:
    """`encoding` when given, else the options passed as separate keywords (`given`); both is an error."""
    if encoding is not None and given != EncodingOptions():
        raise DataError("Pass encoding= or the separate encoding options (line_by_line=, ...), not both.")
    return given if encoding is None else encoding


@dataclass(frozen=True)
class Encoder:
    """The runtime state of one encoding pass, handed to every `datasets.map` worker."""

    tok: Any  # tokenizers.Tokenizer without truncation/padding
    encode: Callable[[Any, list[str], np.dtype], list[np.ndarray]]  # texts -> token ids, one array each
    dtype: np.dtype
    eos: int
    options: EncodingOptions
    chunk_chars: int  # text per work item / per map batch
    piece_chars: int  # target length of the pieces a long text is cut into


def _encode_texts(texts: list[str], ends: list[bool], s: Encoder) -> dict[str, list[Any]]:
    """Encode each text exactly as a whole (long ones in safe pieces) -> one output row.

    EOS follows every text whose `ends` flag is set; in line_by_line mode every text is a document
    and gets an EOS before it too, and its length (EOS included) goes into "lengths".
    """
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        long = len(text) > 2 * s.piece_chars and not text.isspace()
        parts = list(iter_pieces(io.StringIO(text).read, "", len(text), s.piece_chars)) if long else [text]
        pieces += parts
        owners += [i] * len(parts)
    encoded = s.encode(s.tok, pieces, s.dtype)
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for owner, ids in zip(owners, encoded, strict=True):
        per_text[owner].append(ids)
    eos = np.array([s.eos], s.dtype)
    out: list[np.ndarray] = []
    lengths: list[int] = []
    for parts, end in zip(per_text, ends, strict=True):
        parts = [eos, *parts, eos] if s.options.line_by_line else [*parts, eos] if end else parts
        out += parts
        lengths += [sum(p.size for p in parts)] if s.options.line_by_line else []
    ids = np.concatenate(out) if out else np.empty(0, s.dtype)
    return {"ids": [ids], "lengths": [np.asarray(lengths, np.int64)], "docs": [sum(ends)]}


def item_texts(path: str, start: int, end: int, options: EncodingOptions) -> list[str]:
    """The texts of one text work item: its byte range (line_by_line: each non-blank line, a document)."""
    text = read_range(path, start, end, options.encoding_errors)
    if options.line_by_line:
        return [line for line in text.split("\n") if line and not line.isspace()]  # blank lines skipped
    return [text]


def row_texts(values: list[Any], name: str, column: str) -> list[str]:
    """The documents of a batch of text-column values: every non-blank row, CRLF / CR -> LF."""
    docs = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{name}: column {column!r} holds {type(value).__name__} values, not text: pass "
                f"{spell('data.text_column', '<name>')} naming a text column."
            )
        if value and not value.isspace():
            docs.append(normalize_newlines(value))
    return docs


def encode_text_items(batch: dict[str, list[Any]], s: Encoder) -> dict[str, list[Any]]:
    """map fn over text work items (path, start, end, doc_end): read the byte ranges and encode them."""
    texts, ends = [], []
    for path, start, end, doc_end in zip(
        batch["path"], batch["start"], batch["end"], batch["doc_end"], strict=True
    ):
        docs = item_texts(path, start, end, s.options)
        texts += docs
        # line_by_line: every line ends a document; else the range ends one only at the file's end.
        ends += [True] * len(docs) if s.options.line_by_line else [doc_end]
    return _encode_texts(texts, ends, s)


def encode_rows(values: list[Any], s: Encoder, name: str, column: str) -> dict[str, list[Any]]:
    """map fn over a text column: every non-blank row is one document."""
    docs = row_texts(values, name, column)
    return _encode_texts(docs, [True] * len(docs), s)


# ----------------------------------------------------------------------------- the encoding pass


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.disable_progress_bars() if was_disabled else datasets.enable_progress_bars()


def _groups(sources: list[Source], columns: list[str | None]) -> Iterator[tuple[list[Source], str | None]]:
    """Consecutive files of one kind (and text column) form one group; lists and datasets stand alone."""
    group: list[Source] = []
    for i, src in enumerate(sources):
        group.append(src)
        nxt = sources[i + 1] if i + 1 < len(sources) else None
        if nxt is None or src.path is None or (nxt.kind, columns[i + 1]) != (src.kind, columns[i]):
            yield group, columns[i]
            group = []


def _text_items(
    group: list[Source], options: EncodingOptions, chunk: int, counts: dict[str, int]
) -> dict[str, list[Any]]:
    # Plain columns, not a datasets.Dataset: training a tokenizer on text files never imports datasets
    # (~1.5 s); encode_stream turns them into one for its map.
    rows: dict[str, list[Any]] = {"path": [], "start": [], "end": [], "doc_end": []}
    for src in group:
        cuts, size, replaced = scan_text_file(src, chunk, options.line_by_line, options.encoding_errors)
        counts["replaced"] += replaced
        rows["path"] += [str(src.path)] * len(cuts)
        rows["start"] += cuts
        rows["end"] += [*cuts[1:], size]
        rows["doc_end"] += [False] * (len(cuts) - 1) + [True]
    return rows


def _row_items(
    group: list[Source], column: str, options: EncodingOptions, counts: dict[str, int], work: Path
) -> Any:
    """The group's text column as a `datasets.Dataset`; CSV / JSONL files are scanned for U+FFFD counts."""
    errors = options.encoding_errors
    if group[0].kind in ("csv", "json"):
        counts["replaced"] += sum(scan_text_file(f, 1 << 62, True, errors)[2] for f in group)
    return load_rows(group[0].kind, group, column, options.header, errors, work / "hf")


@dataclass(frozen=True)
class Part:
    """One group of sources, checked and ready to read (see read_parts)."""

    name: str  # how messages name it: "Input file a.csv (+2 more)"
    column: str | None  # None: text files; else the name of the text column
    items: Any  # text files: work items as columns {path, start, end, doc_end}; else a datasets.Dataset

    def __len__(self) -> int:
        """Work items or rows."""
        return len(self.items["path"]) if self.column is None else len(self.items)


def read_parts(
    sources: list[Source], work: Path, options: EncodingOptions, chunk: int, counts: dict[str, int]
) -> list[Part]:
    """Check every source (empty, binary, UTF-8, text column, every record) before anything is read for
    real, then group them: text files cut into work items of ~`chunk` bytes, row sources loaded as their
    text column (Arrow files and cleaned copies of files with skipped records go under `work`).
    U+FFFD replacements are added to counts["replaced"]."""
    for src in sources:
        if src.path is not None:
            check_file(src)
    header, column = options.header, options.text_column
    columns = [None if src.kind == "text" else row_column(src, column, header) for src in sources]
    # Every record checked before anything is encoded (wrong text is worse than no text).
    sources = [
        src if col is None else check_records(src, col, header, options.skip_bad_records, work / "clean")
        for src, col in zip(sources, columns, strict=True)
    ]
    parts = []
    for group, column in _groups(sources, columns):
        name = group[0].name + (f" (+{len(group) - 1} more)" if len(group) > 1 else "")
        if column is None:
            parts.append(Part(name, None, _text_items(group, options, chunk, counts)))
        else:
            parts.append(Part(name, column, _row_items(group, column, options, counts, work)))
    return parts


def warn_replaced(count: int, stacklevel: int) -> None:
    """The one warning for U+FFFD replacements (encoding_errors="replace"), shared by the dataset and
    the tokenizer; `stacklevel` counts from the caller, as warnings.warn's does."""
    if count:
        message = f"Replaced {count} invalid UTF-8 sequence(s) with U+FFFD (encoding_errors='replace')."
        warnings.warn(message, stacklevel=stacklevel + 1)


def _no_text(name: str) -> DataError:
    return DataError(f"{name} holds no text (only blank lines or rows): add text or remove it.")


def _part_texts(part: Part, options: EncodingOptions) -> Iterator[str]:
    if part.column is None:  # one text range read at a time
        items = part.items
        for path, start, end in zip(items["path"], items["start"], items["end"], strict=True):
            yield from item_texts(path, start, end, options)
        return
    for batch in part.items.iter(batch_size=100):  # memory: 100 rows
        yield from row_texts(batch[part.column], part.name, part.column)


def iter_texts(parts: list[Part], options: EncodingOptions) -> Iterator[str]:
    """Every text the encoding pass encodes, in its order, streamed (memory: one batch of rows or one
    text range): what a tokenizer trained for this data reads. Text-file ranges end at the same safe
    cuts, so they pre-tokenize exactly like the whole file."""
    for part in parts:
        found = False
        for text in _part_texts(part, options):
            found = True
            yield text
        if not found:
            raise _no_text(part.name)


def _append_output(result: Any, tokens: io.BufferedWriter, lengths: io.BufferedWriter) -> tuple[int, int]:
    """Append map output rows to the token and length files; returns (tokens, documents) appended."""
    import pyarrow as pa
    import pyarrow.compute as pc

    num_tokens = docs = 0
    for cache_file in result.cache_files:  # one Arrow stream file per worker, in row order
        with pa.OSFile(cache_file["filename"]) as f:  # read, not memory-mapped: RSS stays flat
            for batch in pa.ipc.open_stream(f):
                ids = batch.column("ids").flatten().to_numpy()
                ids.tofile(tokens)
                batch.column("lengths").flatten().to_numpy().tofile(lengths)
                num_tokens += ids.size
                docs += pc.sum(batch.column("docs")).as_py() or 0
        with contextlib.suppress(OSError):  # Windows keeps mapped files; the folder is removed later
            Path(cache_file["filename"]).unlink()
    return num_tokens, docs


def encode_stream(sources: list[Source], workdir: Path, s: Encoder) -> dict[str, int]:
    """Encode every source, in order, into workdir/tokens.bin (and document lengths into lengths.bin).

    Every source is checked (empty, binary, UTF-8, text column, records) before anything is encoded
    (read_parts). Returns {"num_tokens", "num_documents", "replaced"}; scratch Arrow files stay in workdir.
    """
    import datasets

    counts = {"num_tokens": 0, "num_documents": 0, "replaced": 0}
    features = datasets.Features(
        {
            "ids": datasets.List(datasets.Value(s.dtype.name)),
            "lengths": datasets.List(datasets.Value("int64")),
            "docs": datasets.Value("int64"),
        }
    )
    with open(workdir / "tokens.bin", "wb") as tokens, open(workdir / "lengths.bin", "wb") as lengths:
        with progress_bars(s.options.progress):
            parts = read_parts(sources, workdir, s.options, s.chunk_chars, counts)
            for i, part in enumerate(parts):
                ds = datasets.Dataset.from_dict(part.items) if part.column is None else part.items
                if part.column is None:
                    fn, kw, cols = encode_text_items, {}, None
                else:
                    fn, kw, cols = encode_rows, {"name": part.name, "column": part.column}, ds.column_names
                size = ds.data.nbytes if part.column else sum(ds["end"]) - sum(ds["start"])
                avg = max(1, size // max(1, len(ds)))  # bytes per row: map batches hold ~chunk_chars
                nproc = min(s.options.num_proc, len(ds))
                result = ds.map(
                    fn,
                    batched=True,
                    batch_size=int(np.clip(s.chunk_chars // avg, 1, 10_000)),
                    input_columns=cols,
                    remove_columns=ds.column_names,
                    fn_kwargs={"s": s, **kw},
                    features=features,
                    num_proc=nproc if nproc > 1 else None,  # None: in-process, tokenizer threads stay on
                    cache_file_name=str(workdir / f"encoded{i}.arrow"),
                    writer_batch_size=16,
                    load_from_cache_file=False,
                    new_fingerprint=hashlib.sha256(f"{workdir}/{i}".encode()).hexdigest()[:32],
                    desc=f"Encoding {part.name}",
                )
                num_tokens, docs = _append_output(result, tokens, lengths)
                if docs == 0:
                    raise _no_text(part.name)
                counts["num_tokens"] += num_tokens
                counts["num_documents"] += docs
    return counts
