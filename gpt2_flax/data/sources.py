"""Reading training text: file globbing, sources, text hygiene, and cutting text files into work items.

`resolve_files` expands paths, folders and globs into an ordered list of files; `resolve_sources` turns
those and every other input into sources (train_tokenizer reads the same sources, with the same checks
and texts, as the dataset: see encoding.py's `read_parts` / `iter_texts`).

A source is a text file (one document), a CSV / JSONL / Parquet file (one document per row), a list of
strings, or a `datasets.Dataset` (any `load_dataset` result; "hub:NAME[:CONFIG][@SPLIT]" loads one).
Text files are never copied into Arrow: one pass checks each file (binary? valid UTF-8? only whitespace?)
and cuts it into ~1 MB byte ranges at line breaks, which encoding.py's `datasets.map` workers read back
with `read_range`, so memory stays flat for any file size. Row sources (CSV, JSONL, Parquet) are
records.py's: the text column, record checks and loading through `datasets`.

Hygiene: CRLF and lone CR become LF everywhere; invalid UTF-8 is an error naming the file and byte
offset (encoding_errors="strict"), or becomes U+FFFD and is counted (encoding_errors="replace").
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_flax.data.remote import (
    GLOB_CHARS,
    Location,
    file_info,
    is_url,
    open_file,
    read_bytes,
    resolve_url,
    suffix,
)
from gpt2_flax.errors import DataError, spell

PathLike = str | Path
FilesArg = PathLike | Sequence[PathLike]

# GPT-2's pre-tokenizer regex can merge runs of whitespace across a line break ("\s+(?!\S)"), but a
# "\n" with non-whitespace on both sides is always a pre-token of its own, so cutting right after it
# gives pieces that encode exactly like the whole document (checked for every Unicode code point).
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_NEWLINE = re.compile(rb"\r\n|\r|\n")
_KINDS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
BINARY_PROBE = 8192  # a NUL byte in a file's first 8 KB means it is not UTF-8 text
_replaced = threading.local()  # U+FFFD inserted by the "gpt2_flax.replace" codec error handler


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _replaced.count = getattr(_replaced, "count", 0) + 1
    return "\ufffd", err.end  # type: ignore[attr-defined]


codecs.register_error("gpt2_flax.replace", _replace_and_count)


def _errors(encoding_errors: str) -> str:
    return "gpt2_flax.replace" if encoding_errors == "replace" else "strict"


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR -> LF, so Windows and old-Mac copies of a text encode the same."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def iter_pieces(read: Callable[[int], str], source: str, chunk_chars: int, piece_chars: int) -> Iterator[str]:
    """Yield one document's text as pieces of >= piece_chars chars that together encode like the whole.

    `read(n)` returns up to n more characters ("" at the end). A document without a safe cut point
    is held in memory until one appears (only pathological text, e.g. one very long line).
    """
    buf, pos, has_text = "", piece_chars, False  # pos: where the next cut search starts in buf
    while data := read(chunk_chars):
        has_text = has_text or not data.isspace()
        buf += data
        start = 0
        while (match := _SAFE_CUT.search(buf, pos)) is not None:
            yield buf[start : match.end()]
            start, pos = match.end(), match.end() + piece_chars
        # Nothing safe at or after pos except maybe a final "\n" that still needs its next char.
        pos = max(pos, len(buf) - 1) - start
        buf = buf[start:]
    if not has_text:
        raise DataError(f"{source} is empty or contains only whitespace: remove it or add text to it.")
    yield buf


# ----------------------------------------------------------------------------- resolving sources


def resolve_files(file_or_files: FilesArg) -> list[Location]:
    """Expand a path, a folder, a glob or a list of those into an ordered list of existing files.
    A URL (gs://..., any fsspec protocol) stays a URL, expanded the same way (remote.py).

    A folder contributes its regular, non-hidden files (not recursive), sorted by name so the token
    order is the same on every machine. Globs are sorted for the same reason; list order is kept.
    """
    items = [file_or_files] if isinstance(file_or_files, (str, Path)) else list(file_or_files)
    if not items:
        raise DataError("No input files given: pass a file path, a folder, a glob or a list of paths.")
    files: list[Location] = []
    for item in items:
        if is_url(item):
            files.extend(resolve_url(str(item)))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"Folder {path} contains no files: put .txt files in it.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif GLOB_CHARS & set(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"Glob {str(item)!r} matched no files: check the pattern.")
            files.extend(found)
        else:
            raise FileNotFoundError(f"Input file {path} does not exist: check the path.")
    return files


@dataclass(eq=False)
class Source:
    kind: str  # "text" | "csv" | "json" | "parquet" | "texts" | "dataset"
    name: str  # how messages name it: "Input file a.txt", "texts", "dataset <fingerprint>"
    path: Location | None = None  # a local file, or a URL read in place (remote.py)
    data: Any = None  # the list of strings, or the datasets.Dataset

    def identity(self) -> dict[str, Any]:
        """What the tokens depend on: path, size and mtime (a URL: version) for files; else content."""
        if self.path is not None:  # local: path, size, mtime_ns; a URL: url, size, version
            return {"kind": self.kind, **file_info(self.path)}
        if self.kind == "texts":
            digest = hashlib.sha256()
            for text in self.data:  # length-prefixed so ["ab", "c"] and ["a", "bc"] differ
                data = text.encode("utf-8", "surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
            return {"kind": "texts", "texts_sha256": digest.hexdigest(), "num_texts": len(self.data)}
        return {"kind": "dataset", "fingerprint": self.data._fingerprint, "num_rows": len(self.data)}


def _dataset_source(obj: Any) -> Source:
    name = type(obj).__name__
    if name in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"Got a {name} with splits {list(obj)}: pass one split, e.g. dataset['train'].")
    if name == "IterableDataset":
        raise DataError(
            "Got a datasets IterableDataset: a stream is not cached. Train on it with "
            "StreamingDataset(ds, tokenizer=...) or GPT2.train(ds, ...) (data.streaming=true on the "
            "command line), or load it without streaming=True to cache it."
        )
    if name != "Dataset":
        raise DataError(f"Got a datasets {name}: pass a datasets.Dataset (a load_dataset result).")
    return Source("dataset", f"dataset {obj.info.dataset_name or obj._fingerprint!s}", data=obj)


# NAME and CONFIG hold no ":" or "@"; SPLIT may hold ":" (datasets' slices: "train[:10%]").
_HUB_SPEC = re.compile(r"hub:(?P<name>[^:@\s]+)(?::(?P<config>[^:@\s]+))?(?:@(?P<split>[^@\s]+))?")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """Split "hub:NAME[:CONFIG][@SPLIT]" into (name, config or None, split; "train" when not given)."""
    match = _HUB_SPEC.fullmatch(spec)
    if match is None:
        raise DataError(
            f"{spec!r} is not a Hub dataset spec: write hub:NAME, hub:NAME:CONFIG, hub:NAME@SPLIT or "
            "hub:NAME:CONFIG@SPLIT (e.g. hub:wikitext:wikitext-2-raw-v1@validation), without spaces."
        )
    return match["name"], match["config"], match["split"] or "train"


def _hub_source(spec: str) -> Source:
    import datasets

    name, config, split = parse_hub_spec(spec)
    return _dataset_source(datasets.load_dataset(name, config, split=split))


def resolve_sources(file_or_files: Any, texts: str | Sequence[str] | None) -> list[Source]:
    """Paths, folders, globs (text/.csv/.jsonl/.parquet by extension), datasets, "hub:" specs and
    `texts`, in order; at least one source, else a DataError."""
    single = isinstance(file_or_files, (str, Path)) or type(file_or_files).__module__.startswith("datasets")
    items = [] if file_or_files is None else [file_or_files] if single else list(file_or_files)
    if file_or_files is not None and not items:
        resolve_files(items)  # raises its "No input files given" error
    for item in items:  # every spec checked before the first (slow, online) load
        if isinstance(item, str) and item.startswith("hub:"):
            parse_hub_spec(item)
    sources: list[Source] = []
    for item in items:
        if type(item).__module__.startswith("datasets"):
            sources.append(_dataset_source(item))
        elif isinstance(item, str) and item.startswith("hub:"):
            sources.append(_hub_source(item))
        else:
            for path in resolve_files(item):
                sources.append(Source(_KINDS.get(suffix(path), "text"), f"Input file {path}", path))
    texts = [texts] if isinstance(texts, str) else list(texts or [])  # a bare string is one document
    if texts:
        sources.append(Source("texts", "texts", data=texts))
    if not sources:
        raise DataError(
            "No training text given: pass the inputs (a path, folder, glob, dataset, hub:NAME or a list of "
            "them) or texts=."
        )
    return sources


def check_file(src: Source) -> None:
    """Fail fast, before any encoding, on an empty or binary input file."""
    assert src.path is not None
    if file_info(src.path)["size"] == 0:
        raise DataError(f"{src.name} is empty or contains only whitespace: remove it or add text to it.")
    if src.kind != "parquet":
        with open_file(src.path, "rb") as f:
            nul = f.read(BINARY_PROBE).find(b"\0")
        if nul >= 0:
            raise DataError(
                f"{src.name} looks like a binary file (NUL byte at offset {nul}), not UTF-8 text: remove it, "
                "re-save it as UTF-8 if it is UTF-16 text, or name CSV/JSONL/Parquet files by extension."
            )


# ----------------------------------------------------------------------------- text files


def _decode(decoder: codecs.IncrementalDecoder, chunk: bytes, offset: int, src: Source) -> str:
    """Decode the file bytes that start at byte `offset` (b"" = end of file) with a clear error."""
    pending = len(decoder.getstate()[0])
    try:
        return decoder.decode(chunk, final=not chunk)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{src.name} is not valid UTF-8 (byte offset {offset - pending + e.start}: {e.reason}): re-save "
            f"it as UTF-8, or pass {spell('data.encoding_errors', 'replace')} to replace invalid bytes "
            "with U+FFFD."
        ) from e


def _surrounded(buf: bytes, start: int, end: int) -> bool:
    """Whether the line break buf[start:end] has a non-whitespace character on each side."""
    before = buf[max(0, start - 4) : start].decode("utf-8", "ignore")[-1:]
    after = buf[end : end + 4].decode("utf-8", "ignore")[:1]
    return bool(before) and bool(after) and not before.isspace() and not after.isspace()


def scan_text_file(src: Source, every: int, lines: bool, encoding_errors: str) -> tuple[list[int], int, int]:
    """Check one text file and cut it into work items; returns (start offsets, file size, U+FFFD count).

    A cut is right after a line break, at the first suitable break >= `every` bytes after the previous
    cut: any break when lines=True, else only one with non-whitespace on both sides, so the ranges
    encode exactly like the whole file. Memory: one chunk of `every` bytes.
    """
    assert src.path is not None
    decoder = codecs.getincrementaldecoder("utf-8")(_errors(encoding_errors))
    _replaced.count = 0
    cuts, has_text, search = [0], False, every  # search: file offset where the next break may start
    buf, base = b"", 0  # buf holds the file's bytes [base, base + len(buf))
    with open_file(src.path, "rb") as f:
        while True:
            chunk = f.read(min(max(every, 16), 1 << 20))
            text = _decode(decoder, chunk, base + len(buf), src)
            has_text = has_text or (bool(text) and not text.isspace())
            buf += chunk
            while (m := _NEWLINE.search(buf, max(search - base, 0))) is not None:
                start, end = m.span()
                if end + 4 > len(buf) and chunk:  # the next character may still be incomplete
                    search = base + start
                    break
                if end < len(buf) and (lines or _surrounded(buf, start, end)):
                    cuts.append(base + end)
                    search = base + end + every
                else:
                    search = base + end
            else:
                search = max(search, base + len(buf))
            drop = max(0, min(search - base, len(buf)) - 4)  # keep 4 bytes before the search point
            buf, base = buf[drop:], base + drop
            if not chunk:
                break
    if not has_text:
        raise DataError(f"{src.name} is empty or contains only whitespace: remove it or add text to it.")
    return cuts, base + len(buf), _replaced.count


def read_range(path: str, start: int, end: int, encoding_errors: str) -> str:
    """One work item's text: bytes [start, end) of a file (a URL: one ranged read), LF line ends."""
    return normalize_newlines(read_bytes(path, start, end).decode("utf-8", _errors(encoding_errors)))
