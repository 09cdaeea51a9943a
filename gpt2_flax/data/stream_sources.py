"""Opening streams for the command line: data.files (hub:NAME specs, local text / CSV / JSONL / Parquet
files) as one `datasets.IterableDataset` with a "text" column, and the sample a tokenizer trains on.

A hub spec is `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`; local files of one
kind go through datasets' own builders with streaming=True (text files: one document per file, or
per line with line_by_line, as the cached path reads them). Several inputs are concatenated in
order with `datasets.concatenate_datasets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2_flax.data.encoding import EncodingOptions, row_texts
from gpt2_flax.data.sources import _KINDS, parse_hub_spec, resolve_files
from gpt2_flax.data.stream import READ_ROWS, stream_column
from gpt2_flax.errors import DataError


def _open_one(item: str, options: EncodingOptions) -> Any:
    import datasets

    if item.startswith("hub:"):
        name, config, split = parse_hub_spec(item)
        return datasets.load_dataset(name, config, split=split, streaming=True)
    files = [str(p) for p in resolve_files(item)]
    kinds = {_KINDS.get(Path(f).suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"{item} mixes file kinds {sorted(kinds)}: stream one kind per entry of data.files.")
    kind = kinds.pop()
    kw: dict[str, Any] = {}
    if kind == "text":
        kw["sample_by"] = "line" if options.line_by_line else "document"
    return datasets.load_dataset(kind, data_files=files, split="train", streaming=True, **kw)


def open_streams(files: Sequence[str], options: EncodingOptions) -> Any:
    """data.files as one stream holding only a "text" column (each input's text column, renamed)."""
    import datasets

    parts = []
    for item in files:
        ds = _open_one(str(item), options)
        column = stream_column(ds, options.text_column, str(item))
        ds = ds.select_columns([column])
        parts.append(ds if column == "text" else ds.rename_column(column, "text"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def stream_sample(
    data: Any, text_column: str | int | None, max_mb: float, name: str = "the stream"
) -> list[str]:
    """The documents of the stream's first `max_mb` MB of text (a tokenizer trains on them: a stream
    has no cache pass to train one on)."""
    column = stream_column(data, text_column, name)
    texts: list[str] = []
    size = 0
    for batch in data.select_columns([column]).iter(batch_size=READ_ROWS):
        for text in row_texts(batch[column], name, column):
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= max_mb * 1e6:
                return texts
    return texts
