"""Row sources: CSV, JSONL and Parquet files (one document per record) and their text column.

`row_column` picks the column holding the text (checked in every file); `check_records` finds records
that would train on the wrong text or vanish silently (a CSV row with more fields than the header,
a JSONL line that is not JSON or lacks the field, an empty text) and names the file and line, or,
with data.skip_bad_records, copies the file without them and counts them; `load_rows` loads the
rows through `datasets.load_dataset("csv" | "json" | "parquet")` with only the text column kept.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2_flax.data.remote import is_url, open_file, suffix
from gpt2_flax.data.sources import Source
from gpt2_flax.errors import DataError, spell


def _pick_column(names: list[str], text_column: str | int | None, where: str, fix: str) -> str:
    if isinstance(text_column, int):
        if not 0 <= text_column < len(names):
            raise DataError(
                f"{where} has {len(names)} column(s), so text_column={text_column} is out of range."
            )
        return names[text_column]
    if text_column is None and "text" not in names and len(names) == 1:
        return names[0]
    column = "text" if text_column is None else text_column
    if column not in names:
        raise DataError(f"{where} has no column {column!r} (its columns: {names}): {fix}")
    return column


def row_column(src: Source, text_column: str | int | None, header: bool) -> str:
    """The name of the column holding the text, checked in every file; a clear error when missing."""
    fix = f"pass {spell('data.text_column', '<name>')} naming the column that holds the text."
    if src.kind == "csv":
        assert src.path is not None
        with open_file(src.path, "r", newline="", encoding="utf-8", errors="replace") as f:
            first = next(csv.reader(f), [])
        if header:
            return _pick_column(
                first,
                text_column,
                f"CSV file {src.path}",
                fix + f" Use {spell('data.header', False)} if it has no header row.",
            )
        if isinstance(text_column, str):
            raise DataError(
                f"CSV file {src.path}: with {spell('data.header', False)} columns have no names; pass "
                f"{spell('data.text_column', '<index>')}."
            )
        return str(
            _pick_column([str(i) for i in range(len(first))], text_column or 0, f"CSV file {src.path}", fix)
        )
    if src.kind == "json":
        assert src.path is not None
        with open_file(src.path, "r", encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.strip()), "")
        try:
            record = json.loads(line)
        except ValueError:  # a JSON array file: datasets parses it; the column is checked after loading
            return "text" if text_column is None else str(text_column)
        names = list(record) if isinstance(record, dict) else []
        return _pick_column(
            names, "text" if text_column is None else text_column, f"JSONL file {src.path}", fix
        )
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        with open_file(src.path, "rb") as f:
            names = pq.read_schema(f).names
        return _pick_column(names, text_column, f"Parquet file {src.path}", fix)
    names = ["text"] if src.kind == "texts" else list(src.data.column_names)
    return _pick_column(names, text_column, src.name, fix)


def _bad_records(src: Source, column: str, header: bool) -> Iterator[tuple[int, str]]:
    """(line number, what is wrong) for each record of a CSV / JSONL file that would train on wrong
    or no text: a CSV row with another number of fields than the header (an unquoted comma shifts
    every column after it), a JSONL line that is not a JSON object or lacks the text field, and an
    empty text. JSON array files (.json starting with "[") are left to datasets."""
    assert src.path is not None
    if src.kind == "csv":
        with open_file(src.path, "r", newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            first = next(reader, [])
            width = len(first)
            index = first.index(column) if header and column in first else int(column) if not header else 0
            if not header:
                yield from _csv_row_problems(first, width, index, 1)
            for row in reader:
                yield from _csv_row_problems(row, width, index, reader.line_num)
        return
    with open_file(src.path, "r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n == 1 and line.lstrip().startswith("["):
                return
            try:
                record = json.loads(line)
            except ValueError as e:
                yield n, f"not a JSON object ({e.msg})"
                continue
            if not isinstance(record, dict) or column not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                yield n, f"no {column!r} field (it has {keys})"
            elif not isinstance(record[column], str):
                yield n, f"the {column!r} field holds {type(record[column]).__name__} values, not text"
            elif not record[column].strip():
                yield n, f"the {column!r} field is empty"


def _csv_row_problems(row: list[str], width: int, index: int, line: int) -> Iterator[tuple[int, str]]:
    if not row:
        return  # a blank line is no record
    if len(row) != width:
        yield line, f"{len(row)} fields where the header has {width} (a comma inside unquoted text?)"
    elif not row[index].strip():
        yield line, "the text field is empty"


def check_records(src: Source, column: str, header: bool, skip: bool, work: Path) -> Source:
    """The source to read: `src` itself if every record is sound; with skip=False a DataError naming
    the first bad record; with skip=True a cleaned copy in `work` without the bad records (streamed:
    memory stays flat) and a warning with their count."""
    if src.kind not in ("csv", "json") or src.path is None:
        return src
    bad = _bad_records(src, column, header)
    first = next(bad, None)
    if first is None:
        return src
    if not skip:
        raise DataError(
            f"{src.name}, line {first[0]}: {first[1]}. Nothing was trained on it. Fix the file ("
            + (
                "quote CSV fields that hold commas"
                if src.kind == "csv"
                else "one JSON object per line, with the text field"
            )
            + f"), or skip such records with {spell('data.skip_bad_records', True)}."
        )
    lines = {first[0], *(n for n, _ in bad)}
    work.mkdir(parents=True, exist_ok=True)
    clean = work / f"clean-{hashlib.sha256(str(src.path).encode()).hexdigest()[:12]}{suffix(src.path)}"
    _copy_without(src, lines, clean)
    first_bad = f"line {first[0]}: {first[1]}"
    print(f"gpt2-flax: warning: {src.name}: skipped {len(lines)} bad record(s) (first: {first_bad})")
    return Source(src.kind, src.name, clean)


def _copy_without(src: Source, lines: set[int], dest: Path) -> None:
    assert src.path is not None
    if src.kind == "csv":
        with (
            open_file(src.path, "r", newline="", encoding="utf-8", errors="replace") as f,
            open(dest, "w", newline="", encoding="utf-8") as out,
        ):
            reader, writer = csv.reader(f), csv.writer(out)
            for row in reader:
                if row and reader.line_num not in lines:
                    writer.writerow(row)
        return
    with (
        open_file(src.path, "r", encoding="utf-8", errors="replace") as f,
        open(dest, "w", encoding="utf-8") as out,
    ):
        for n, line in enumerate(f, 1):
            if n not in lines and line.strip():
                out.write(line if line.endswith("\n") else line + "\n")


def load_rows(
    kind: str, group: list[Source], column: str, header: bool, encoding_errors: str, cache: Path
) -> Any:
    """A `datasets.Dataset` of the group's rows holding only the text column (Arrow files under cache).
    URLs are streamed through the same `datasets` parser, so no raw file is copied whole."""
    import datasets

    if kind in ("texts", "dataset"):
        ds = datasets.Dataset.from_dict({"text": group[0].data}) if kind == "texts" else group[0].data
        return ds.select_columns([column])
    kw: dict[str, Any] = {}
    if kind == "csv":  # read the column as text: "007" stays "007", "NA" stays "NA", "" stays ""
        kw = {"usecols": [column] if header else [int(column)], "keep_default_na": False, "na_filter": False}
        kw.update(
            header=0 if header else None, names=None if header else [column], encoding_errors=encoding_errors
        )
        kw["features"] = datasets.Features({column: datasets.Value("string")})
    elif kind == "json" and encoding_errors == "replace":
        kw = {"encoding_errors": "replace"}
    elif kind == "parquet":
        kw = {"columns": [column]}
    files = [str(s.path) for s in group]
    remote = any(is_url(f) for f in files)  # read in place (below), not fetched whole first
    try:
        ds = datasets.load_dataset(
            kind, data_files=files, split="train", cache_dir=str(cache), streaming=remote, **kw
        )
        if column not in ds.column_names:
            raise DataError(f"{group[0].name} has no column {column!r} (its columns: {ds.column_names}).")
        ds = ds.select_columns([column])
        if remote:  # the same parser streams the URLs (fsspec); only the text column lands in Arrow
            features = None if ds.features is None else datasets.Features({column: ds.features[column]})
            # Plain gen_kwargs: datasets hashes them (dill), ~0.7 s for the stream object itself.
            spec = {"kind": kind, "files": files, "column": column, "kw": kw}
            ds = datasets.Dataset.from_generator(
                _streamed_rows, gen_kwargs=spec, features=features, cache_dir=str(cache)
            )
    except ValueError as e:
        if "corresponds to no data" in str(e):  # datasets' message for zero rows
            raise DataError(f"{group[0].name} holds no text (no rows): add rows or remove it.") from e
        raise
    return ds


def _streamed_rows(kind: str, files: list[str], column: str, kw: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import datasets

    yield from datasets.load_dataset(
        kind, data_files=files, split="train", streaming=True, **kw
    ).select_columns([column])
