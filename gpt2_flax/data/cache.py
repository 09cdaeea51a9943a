"""The token cache: encode sources once into a folder on disk, reuse it while nothing changed.

Every document becomes its token ids followed by `<|endoftext|>` (line_by_line: `<|endoftext|> text
<|endoftext|>`), all concatenated into tokens.bin (uint16 when the vocab has < 65536 entries, else
uint32) plus meta.json (and doc_offsets.npy in line_by_line mode), in `<cache_dir>/<key>/` where the key
hashes the tokenizer, the inputs and the token-changing encoding options (EncodingOptions.cache_key).
The folder is built under a temporary name and renamed when complete, so a reader never sees half a
cache. save_cache_folder / encode_main copy an entry (with its tokenizer) to a folder of the user's
choosing for TokenDataset.from_cache: a local one (written under a temporary name, renamed when
complete) or a URL (gs://..., one upload per file, meta.json last: a reader that finds meta.json
finds the rest). The build cache itself (cache_dir=) stays local (remote.local_folder says why).

CHUNK_CHARS, PIECE_CHARS, _encode_batch and encode_stream are looked up here at call time, so tests
that shrink or wrap them patch this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gpt2_flax.data import multihost
from gpt2_flax.data.encoding import Encoder, EncodingOptions, encode_stream, warn_replaced
from gpt2_flax.data.remote import (
    Location,
    copy_file,
    file_info,
    file_sha256,
    filesystem,
    is_file,
    is_url,
    join,
    local_folder,
    read_all,
)
from gpt2_flax.data.sources import PathLike, resolve_sources
from gpt2_flax.errors import DataError
from gpt2_flax.tokenizer import eos_token_id, load_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Text per work item / map batch: ~1 MB of text (~250k tokens) is encoded at once per worker.
CHUNK_CHARS = 1 << 20
# Target length of the pieces a long text is split into; encode_batch encodes pieces in parallel in Rust.
PIECE_CHARS = 1 << 16
# Bump when the token layout changes so old caches are not reused.
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """`$GPT2_FLAX_CACHE` if set, else `~/.cache/gpt2_flax/tokens`."""
    env = os.environ.get("GPT2_FLAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2_flax" / "tokens"


def _encode_batch(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    # add_special_tokens=False: raw ids only, whatever post-processor the tokenizer carries.
    return [np.asarray(e.ids, dtype) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def make_encoder(tok: Tokenizer, options: EncodingOptions) -> Encoder:
    """The Encoder of `tok` for one encoding pass: the cache's, and the stream's (stream.py), so both
    give the same tokens for the same text."""
    if tok.truncation is not None or tok.padding is not None:  # would cut or pad every piece: turn off
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)
    return Encoder(tok, _encode_batch, dtype, eos_token_id(tok), options, CHUNK_CHARS, PIECE_CHARS)


# ----------------------------------------------------------------------------- the token cache


def read_cache(entry: Location, identity: dict | None = None) -> dict | None:
    """The metadata of a complete cache folder, local or a URL (matching `identity` if given), else None."""
    meta, _ = check_cache(entry)
    if meta is None or (identity is not None and {k: meta.get(k) for k in identity} != identity):
        return None
    return meta


def check_cache(entry: Location) -> tuple[dict | None, str]:
    """(metadata, "") of a complete cache folder, else (None, what is wrong with it)."""
    try:
        meta = json.loads(read_all(join(entry, "meta.json"), "meta.json"))
    except FileNotFoundError:
        return None, "it has no meta.json (not a token cache, or an upload that has not finished)"
    except (OSError, ValueError) as e:
        return None, f"its meta.json cannot be read ({e})"
    try:
        size = file_info(join(entry, "tokens.bin"))["size"]
        want = int(meta["num_tokens"]) * np.dtype(meta["dtype"]).itemsize
        line_by_line = bool(meta["options"]["line_by_line"])
    except OSError:
        return None, "it has meta.json but no tokens.bin"
    except (KeyError, TypeError, ValueError) as e:
        return None, f"its meta.json is not a token cache's (no valid {e})"
    if size != want:
        return None, f"its tokens.bin holds {size} bytes, but meta.json says {want} (cut short, or replaced)"
    if line_by_line and not is_file(join(entry, "doc_offsets.npy")):
        return None, "it is a line_by_line cache without doc_offsets.npy"
    return meta, ""


def _write_offsets(lengths_file: Path, out: Path, num_documents: int) -> None:
    """doc_offsets.npy (num_documents + 1 int64) = cumulative lengths, streamed in 8 MB chunks."""
    with open(lengths_file, "rb") as src, open(out, "wb") as dst:
        np.lib.format.write_array_header_1_0(
            dst, {"descr": "<i8", "fortran_order": False, "shape": (num_documents + 1,)}
        )
        total = np.zeros(1, np.int64)
        total.tofile(dst)
        while (chunk := np.fromfile(src, np.int64, count=1 << 20)).size:
            (np.cumsum(chunk) + total[0]).tofile(dst)
            total[0] += chunk.sum()


def _publish(work: Path, entry: Path, identity: dict, meta: dict) -> None:
    """Turn the encoded files in `work` into the complete cache folder `entry`, with one rename."""
    done = work / "entry"
    done.mkdir()
    os.replace(work / "tokens.bin", done / "tokens.bin")
    if meta["options"]["line_by_line"]:
        _write_offsets(work / "lengths.bin", done / "doc_offsets.npy", meta["num_documents"])
    (done / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for path in (done, *done.iterdir()):  # mkdtemp makes 0700: other users/hosts may share the cache
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    try:
        os.rename(done, entry)
    except OSError:  # another process finished the same cache first (use theirs), or a broken one
        if read_cache(entry, identity) is None:
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(done, entry)


def cache_digest(entry: Location, meta: dict) -> str:
    """What a cache holds, wherever it is: its tokens (sha256), tokenizer and options; not the
    paths and mtimes that key it, so two hosts' copies of the same data agree."""
    tokens = meta.get("tokens_sha256") or file_sha256(join(entry, "tokens.bin"))  # (caches built before it)
    return hashlib.sha256(json.dumps([tokens, meta["tokenizer"], meta["options"]]).encode()).hexdigest()


def build_token_cache(
    tok: Tokenizer, sources: list, cache_dir: PathLike | None, options: EncodingOptions
) -> tuple[Path, dict]:
    """Encode `sources` into the folder `<cache_dir>/<key>/`, or reuse it; returns (folder, metadata).

    The folder holds tokens.bin, meta.json (and doc_offsets.npy in line_by_line mode). It is built
    under a temporary name and renamed at the end, so an interrupted run never leaves a cache that
    looks complete, and concurrent processes building the same cache keep whichever finishes first.
    In a multi-process run, process 0 encodes first where the cache folder is shared, and every
    process checks that its tokens are process 0's (multihost.py). The folder must be local
    (memory-mapped); the sources may be URLs.
    """
    local_folder(cache_dir, "The token cache folder")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    build = lambda: _build(tok, sources, cache, options)
    return multihost.one_cache(build, cache, cache_digest) if multihost.active() else build()


def _build(tok: Tokenizer, sources: list, cache: Path, options: EncodingOptions) -> tuple[Path, dict]:
    identity = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tok),
        "options": options.cache_key(),
        "sources": [s.identity() for s in sources],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    entry = cache / key
    if (meta := read_cache(entry, identity)) is not None:
        logger.info("Reusing token cache %s (%d tokens)", entry, meta["num_tokens"])
        return entry, meta
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create cache dir {cache} ({e}): pass cache_dir= or set GPT2_FLAX_CACHE."
        ) from e
    encoder = make_encoder(tok, options)
    vocab_size, dtype = encoder.tok.get_vocab_size(with_added_tokens=True), encoder.dtype
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f"{key}.", suffix=".tmp"))  # unique per process
    try:
        start = time.perf_counter()
        counts = encode_stream(sources, work, encoder)
        meta = {**identity, "dtype": dtype.name, "vocab_size": vocab_size, "eos_token_id": encoder.eos}
        meta.update(counts, encode_seconds=round(time.perf_counter() - start, 3))
        # What hosts compare (cache_digest); hashing runs at ~1.2 GB/s here, encoding at ~15 MB/s of text.
        meta["tokens_sha256"] = file_sha256(work / "tokens.bin")
        _publish(work, entry, identity, meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warn_replaced(counts["replaced"], stacklevel=3)
    logger.info("Encoded %d tokens in %.1f s into %s", counts["num_tokens"], meta["encode_seconds"], entry)
    return entry, meta


# ----------------------------------------------------------------------------- entry points


def encode_sources(
    tokenizer: Tokenizer,
    file_or_files: Any,
    texts: str | Sequence[str] | None,
    cache_dir: PathLike | None,
    options: EncodingOptions,
) -> tuple[list, Path, dict]:
    """Resolve the inputs and encode them into the cache (or reuse it): (sources, folder, metadata)."""
    sources = resolve_sources(file_or_files, texts)
    return (sources, *build_token_cache(tokenizer, sources, cache_dir, options))


CACHE_FILES = ("tokens.bin", "doc_offsets.npy", "meta.json")  # meta.json last: the commit marker


def save_cache_folder(entry: Location, tokenizer: Tokenizer, path: PathLike) -> Location:
    """Copy a cache folder's tokens and metadata, plus the tokenizer, into the new folder `path`
    (a local folder, or a URL: see _upload_cache)."""
    if is_url(str(path)):
        return _upload_cache(entry, tokenizer, str(path))
    dest = Path(path).expanduser()
    if dest.exists():
        raise FileExistsError(f"{dest} already exists: choose a new folder or delete it first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for name in CACHE_FILES:
            if is_file(join(entry, name)):
                copy_file(join(entry, name), tmp / name)
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _upload_cache(entry: Location, tokenizer: Tokenizer, url: str) -> str:
    """save_cache_folder to a URL: an object store has no folder rename, so each file is one upload
    (visible only once complete) and meta.json goes last: check_cache calls a folder without it "not
    a cache (or an upload that has not finished)", so no reader takes a half-uploaded one."""
    from fsspec.implementations.local import LocalFileSystem  # (fsspec: imported only for URLs)

    fs, path = filesystem(url)
    if fs.exists(path):
        raise FileExistsError(f"{url} already exists: choose a new folder or delete it first.")
    url = url.rstrip("/")
    try:
        if isinstance(fs, LocalFileSystem):  # (file://: folders are real; object stores have none to make)
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path.rstrip('/')}/tokenizer.json", tokenizer.to_str().encode("utf-8"))
        for name in CACHE_FILES:
            if is_file(join(entry, name)):
                copy_file(join(entry, name), f"{url}/{name}")
    except BaseException:  # a failed upload leaves nothing behind (it would block the retry)
        with contextlib.suppress(Exception):
            fs.rm(path, recursive=True)
        raise
    return url


def encode_main(
    file_or_files: Any,
    *,
    tokenizer_file: PathLike | None = None,
    vocab_file: PathLike | None = None,
    merges_file: PathLike | None = None,
    cache_dir: PathLike | None = None,
    output: PathLike | None = None,
    encoding: EncodingOptions | None = None,
) -> dict[str, Any]:
    """`gpt2-flax encode`: build the token cache up front (with progress bars unless `encoding` says
    otherwise), so training starts at once; with `output`, also save a copy for
    TokenDataset.from_cache. Returns a summary dict."""
    tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
    start = time.perf_counter()
    encoding = EncodingOptions(progress=True) if encoding is None else encoding
    sources, entry, meta = encode_sources(tokenizer, file_or_files, None, cache_dir, encoding)
    seconds = time.perf_counter() - start
    mb = sum(file_info(s.path)["size"] for s in sources if s.path is not None) / 1e6
    summary = {"cache": str(entry), "num_tokens": meta["num_tokens"], "num_documents": meta["num_documents"]}
    summary.update(
        input_mb=round(mb, 3), seconds=round(seconds, 3), mb_per_s=round(mb / max(seconds, 1e-9), 3)
    )
    if output is not None:
        summary["saved"] = str(save_cache_folder(entry, tokenizer, output))
    return summary
