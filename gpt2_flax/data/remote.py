"""Input files by URL (gs://, s3://, memory://, file://, any fsspec protocol), read in place.

A URL input takes the same path through sources.py and encoding.py as a local file: `resolve_url`
expands it (a file, a folder, a glob), `open_file` opens it for the checks (binary probe, UTF-8 scan,
CSV header, records) and `read_bytes` reads one work item's byte range (~1 MB; a text file is cut
into such ranges by encoding.py), so every host of a pod slice reads the bucket directly and no
host copies a whole file first. Local paths keep Python's own `open` (no fsspec in the way).

CSV / JSONL / Parquet URLs go to `datasets.load_dataset(..., streaming=True)`: the same parser reads
them in place, and only their text column lands in Arrow files in the encoding's temporary folder,
as it does for local ones (sources.load_rows).
The token cache itself is memory-mapped, so it stays on a local (or mounted) disk: `local_folder`
refuses a URL there with the rule.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, Any

from gpt2_flax.errors import DataError

Location = Path | str  # a local path, or a URL (a str holding "://")
GLOB_CHARS = set("*?[")


def is_url(location: Any) -> bool:
    return isinstance(location, str) and "://" in location


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for `url`; a DataError naming the package to install
    when the protocol's file system is missing (gs:// needs gcsfs, s3:// s3fs)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec: "Please install gcsfs to access Google Storage"
        raise DataError(
            f"Cannot read {url}: {e}. Fix: pip install the file system package it names on every host "
            "(gs://: pip install gcsfs, or gpt2_flax[tpu]), or copy the data to a local path."
        ) from None
    except ValueError as e:  # "Protocol not known: foo"
        raise DataError(
            f"Cannot read {url}: {e}. Fix: use a local path or an fsspec URL (gs://...)."
        ) from None


def _missing(url: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Input file {url} does not exist (or this machine's credentials cannot list it): check the URL."
    )


def resolve_url(url: str) -> list[str]:
    """A URL file, folder (its non-hidden files, sorted, not recursive) or glob (sorted) -> file URLs."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    full = lambda p: p if "://" in p else f"{protocol}://{p.lstrip('/') if protocol != 'file' else p}"
    try:
        if GLOB_CHARS & set(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not found:
                raise FileNotFoundError(f"Glob {url!r} matched no files: check the pattern.")
            return [full(p) for p in found]
        if fs.isdir(path):
            found = sorted(
                p
                for p in fs.ls(path, detail=False)
                if fs.isfile(p) and not p.rsplit("/", 1)[-1].startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"Folder {url} contains no files: put .txt files in it.")
            return [full(p) for p in found]
        if fs.isfile(path):
            return [url]
    except PermissionError as e:
        raise DataError(f"Cannot read {url} ({e}): check this machine's credentials for it.") from None
    raise _missing(url)


def open_file(location: Location, mode: str = "rb", **text: Any) -> IO[Any]:
    """Open a local path with `open`, a URL with its fsspec file system (reads fetch blocks on demand)."""
    if not is_url(location):
        return open(location, mode, **text)  # noqa: SIM115 (the caller's `with` closes it)
    fs, path = filesystem(str(location))
    try:
        return fs.open(path, mode, **text)
    except FileNotFoundError:
        raise _missing(str(location)) from None


def read_bytes(location: Location, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged read for a URL."""
    if is_url(location):
        fs, path = filesystem(str(location))
        return fs.cat_file(path, start, end)
    with open(location, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def file_info(location: Location) -> dict[str, Any]:
    """What a file's tokens depend on besides its bytes: resolved path or URL, size, and a version
    (local: mtime_ns; object stores: generation / ETag / modification time, whichever it has)."""
    if not is_url(location):
        path = Path(location)
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, path = filesystem(str(location))
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise _missing(str(location)) from None
    keys = ("generation", "etag", "ETag", "mtime", "updated", "LastModified", "created")
    version = next((str(info[k]) for k in keys if info.get(k) is not None), "")
    return {"path": str(location), "size": int(info["size"]), "version": version}


def suffix(location: Location) -> str:
    return Path(str(location).rsplit("/", 1)[-1]).suffix.lower()


def local_folder(folder: Any, what: str) -> None:
    """A token cache is memory-mapped (np.memmap): refuse a URL for it, with the rule."""
    if is_url(str(folder)):
        raise DataError(
            f"{what} {folder} is a URL, but a token cache is memory-mapped and must be on a local (or "
            "mounted) disk. Fix: keep the cache local (data.cache_dir= a local folder, the default is "
            "~/.cache/gpt2_flax/tokens) and give the text files as URLs: they are read in place."
        )


def file_sha256(path: Path) -> str:
    """A local file's sha256, read in 4 MB chunks (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
