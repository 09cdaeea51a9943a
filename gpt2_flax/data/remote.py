"""Input files by URL (gs://, s3://, memory://, file://, any fsspec protocol), read in place.

A URL input takes the same path through sources.py and encoding.py as a local file: `resolve_url`
expands it (a file, a folder, a glob), `open_file` opens it for the checks (binary probe, UTF-8 scan,
CSV header, records) and `read_bytes` reads one work item's byte range (~1 MB; a text file is cut
into such ranges by encoding.py), so every host of a pod slice reads the bucket directly and no
host copies a whole file first. Local paths keep Python's own `open` (no fsspec in the way).

CSV / JSONL / Parquet URLs go to `datasets.load_dataset(..., streaming=True)`: the same parser reads
them in place, and only their text column lands in Arrow files in the encoding's temporary folder,
as it does for local ones (records.load_rows).

A saved token cache on a URL (TokenDataset.from_cache("gs://...")) is read in place too: its
meta.json (and doc_offsets.npy) whole, its tokens.bin through `RemoteTokens`, which each batch turns
into a few ranged reads (one per run of nearby rows) instead of a memmap. The keyed build cache
(cache_dir=) stays on a local (or mounted) disk: `local_folder` refuses a URL there with the rule.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np

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


def _missing(url: str, what: str = "Input file") -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {url} does not exist (or this machine's credentials cannot list it): check the URL."
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


def open_file(location: Location, mode: str = "rb", *, what: str = "Input file", **text: Any) -> IO[Any]:
    """Open a local path with `open`, a URL with its fsspec file system (reads fetch blocks on demand)."""
    if not is_url(location):
        return open(location, mode, **text)  # noqa: SIM115 (the caller's `with` closes it)
    fs, path = filesystem(str(location))
    try:
        return fs.open(path, mode, **text)
    except FileNotFoundError:
        raise _missing(str(location), what) from None


def join(folder: Location, name: str) -> Location:
    """`folder`/`name`: a URL stays a str (Path would fold gs://b into gs:/b), a local path a Path."""
    if is_url(folder):
        return f"{str(folder).rstrip('/')}/{name}"
    return Path(folder).expanduser() / name


def read_all(location: Location, what: str = "Input file") -> bytes:
    """A whole (small) file: meta.json, a tokenizer file. FileNotFoundError names `what` and the URL."""
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise _missing(str(location), what) from None


def is_file(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = filesystem(str(location))
    return bool(fs.isfile(path))


def copy_file(src: Location, dst: Location) -> None:
    """Copy one file between any two of local paths and URLs, in 4 MB chunks (memory stays flat).
    An object store makes the new object visible only when its upload completes."""
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(src, dst)
        return
    with open_file(src, "rb") as f_in, open_file(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 22)


# Rows whose token ranges are at most this many tokens apart are fetched in one ranged read: a
# request costs a round trip (tens of ms to an object store, assumed; ~60 us a read on file://,
# profiled), while 32k uint16 tokens are 64 KB, well under a millisecond at 100 MB/s.
MERGE_GAP = 1 << 15


class RemoteTokens:
    """A token file on a URL, indexed like the read-only np.memmap of a local one: `tokens[ids]`
    (any shape of int64 ids) reads only the byte ranges those ids fall in (fs.cat_ranges: one call
    for the whole batch, concurrent on async file systems such as gcsfs) and returns an ndarray."""

    def __init__(self, url: str, dtype: np.dtype | str, num_tokens: int) -> None:
        self.url, self.dtype, self.shape = url, np.dtype(dtype), (int(num_tokens),)
        self._fs, self._path = filesystem(url)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole file (np.asarray(tokens)): ranged reads of MERGE_GAP-merged runs, i.e. one."""
        whole = self[np.arange(self.shape[0])]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        ids = np.asarray(index, np.int64)
        flat = ids.ravel()
        if flat.size == 0:
            return np.empty(ids.shape, self.dtype)
        if flat.min() < 0 or flat.max() >= self.shape[0]:
            raise IndexError(f"token index out of range [0, {self.shape[0]}) of {self.url}")
        # Sorted, repeats kept (they never start a run): np.unique's hashing took 0.43 ms of a 1.7 ms
        # batch (8 x 1025 ids, profiled on file://), np.sort takes 0.04 ms.
        ordered = np.sort(flat)
        cut = np.flatnonzero(np.diff(ordered) - 1 > MERGE_GAP) + 1  # tokens between two ids
        starts, ends = ordered[np.r_[0, cut]], ordered[np.r_[cut - 1, ordered.size - 1]] + 1
        size = self.dtype.itemsize
        try:
            blobs = self._fs.cat_ranges(
                [self._path] * starts.size, (starts * size).tolist(), (ends * size).tolist(), on_error="raise"
            )
        except FileNotFoundError:
            raise _missing(self.url, "Token file") from None
        if [len(b) for b in blobs] != ((ends - starts) * size).tolist():
            raise DataError(
                f"Token file {self.url} is shorter than its meta.json says ({self.shape[0]} tokens): it "
                "was cut or replaced after the dataset opened it. Fix: write the cache again "
                "(TokenDataset.save_cache / gpt2-flax encode --output) and restart."
            )
        data = np.frombuffer(b"".join(blobs), self.dtype)
        run = np.searchsorted(starts, flat, side="right") - 1  # which ranged read each id is in
        base = np.cumsum(ends - starts) - (ends - starts)  # where that read starts in `data`
        return data[base[run] + flat - starts[run]].reshape(ids.shape)


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
    """The keyed build cache (cache_dir=) is local: refuse a URL for it, with the rule and the fix.

    Why not build it on a URL: processes publish a cache entry with one folder rename and find a
    shared folder with a marker file (multihost.py); object stores have neither an atomic folder
    rename nor a consistent listing to rely on. A finished copy uploads cleanly instead (save_cache:
    one upload per file, meta.json last as the commit marker), and every host reads that in place."""
    if is_url(str(folder)):
        raise DataError(
            f"{what} {folder} is a URL, but the token cache that encoding builds and reuses lives on a "
            "local (or mounted) disk. Fix: keep data.cache_dir local (the default is "
            "~/.cache/gpt2_flax/tokens), encode once with `gpt2-flax encode FILES --output "
            f"{folder}` (or TokenDataset.save_cache('{folder}')), then read it in place on every host "
            f"with --data.from_cache={folder} (TokenDataset.from_cache). Text files given as URLs are "
            "read in place either way."
        )


def file_sha256(path: Location) -> str:
    """A file's sha256 (a local path or a URL), read in 4 MB chunks (memory stays flat)."""
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
