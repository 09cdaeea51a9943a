"""Token datasets: encode text once into a cached token file, then serve fixed-size training blocks.

Layout: every document (one text file, or one string of `texts=`) is encoded and followed by one
`<|endoftext|>`; all documents are concatenated into a single stream of token ids stored on disk
(uint16 when the vocab has < 65536 entries, else uint32) and memory-mapped, so datasets larger
than RAM work and every process of a multi-host job can open the same cache.

Training examples are windows of block_size + 1 tokens cut at multiples of block_size; the order
of windows is a pure function of (seed, step), so resuming needs nothing but the step number.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer

from gpt2_flax.tokenizer import (
    FilesArg,
    PathLike,
    eos_token_id,
    load_tokenizer,
    resolve_files,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

# Characters per file.read() and per encode_batch call: ~1 MB of text (~250k tokens) in memory at once.
CHUNK_CHARS = 1 << 20
# Target length of the pieces one chunk is split into; encode_batch encodes pieces in parallel in Rust.
PIECE_CHARS = 1 << 16
# Bump when the token layout changes so old caches are not reused.
CACHE_VERSION = 1

# GPT-2's pre-tokenizer regex can merge runs of whitespace across a line break ("\s+(?!\S)"), but a
# "\n" with non-whitespace on both sides is always a pre-token of its own, so cutting right after it
# gives pieces that encode exactly like the whole document (checked for every Unicode code point).
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def default_cache_dir() -> Path:
    """`$GPT2_FLAX_CACHE` if set, else `~/.cache/gpt2_flax/tokens`."""
    env = os.environ.get("GPT2_FLAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2_flax" / "tokens"


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
        raise ValueError(f"{source} is empty or contains only whitespace: remove it or add text to it.")
    yield buf


def iter_document_stream(
    files: Sequence[Path], texts: Sequence[str], chunk_chars: int, piece_chars: int
) -> Iterator[str | None]:
    """Yield every document's pieces in order, with None after each document (where EOS goes)."""
    for path in files:
        # newline=None turns CRLF and lone CR into "\n", so Windows and Unix copies encode the same.
        with open(path, encoding="utf-8", newline=None) as f:
            try:
                yield from iter_pieces(f.read, f"Input file {path}", chunk_chars, piece_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"Input file {path} is not valid UTF-8 ({e}): re-save it as UTF-8.") from e
        yield None
    for i, text in enumerate(texts):
        reader = io.StringIO(text, newline=None)  # same newline handling as files
        yield from iter_pieces(reader.read, f"texts[{i}]", chunk_chars, piece_chars)
        yield None


def _encode_batch(tok: Tokenizer, batch: list[str | None], eos_id: int, dtype: np.dtype) -> np.ndarray:
    # add_special_tokens=False: raw ids only, whatever post-processor the tokenizer carries.
    encoded = iter(tok.encode_batch_fast([p for p in batch if p is not None], add_special_tokens=False))
    ids: list[int] = []
    for piece in batch:
        ids.extend([eos_id] if piece is None else next(encoded).ids)
    return np.asarray(ids, dtype=dtype)


def encode_stream(
    tok: Tokenizer, stream: Iterable[str | None], out: BinaryIO, dtype: np.dtype, batch_chars: int
) -> tuple[int, int]:
    """Encode a piece stream (None = end of document) and append the ids to `out`.

    Returns (num_tokens, num_documents). Pieces are batched to ~batch_chars characters so memory stays
    bounded while encode_batch keeps all cores busy.
    """
    eos_id = eos_token_id(tok)
    num_tokens = num_documents = chars = 0
    batch: list[str | None] = []
    for item in stream:
        batch.append(item)
        chars += len(item) if item is not None else 0
        num_documents += item is None
        if chars >= batch_chars:
            arr = _encode_batch(tok, batch, eos_id, dtype)
            arr.tofile(out)
            num_tokens, batch, chars = num_tokens + arr.size, [], 0
    if batch:
        arr = _encode_batch(tok, batch, eos_id, dtype)
        arr.tofile(out)
        num_tokens += arr.size
    return num_tokens, num_documents


def _cache_identity(tok: Tokenizer, files: Sequence[Path], texts: Sequence[str]) -> tuple[str, dict]:
    """(key, identity): the identity records what the tokens depend on; block_size is not part of it."""
    sources: list[dict] = []
    for path in files:
        st = path.stat()
        sources.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    if texts:
        digest = hashlib.sha256()
        for text in texts:  # length-prefixed so ["ab", "c"] and ["a", "bc"] differ
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
        sources.append({"texts_sha256": digest.hexdigest(), "num_texts": len(texts)})
    identity = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tok), "sources": sources}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return key, identity


def _read_cache_meta(tokens_path: Path, meta_path: Path, identity: dict) -> dict | None:
    """The cache's metadata if it is complete and matches `identity`, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = tokens_path.stat().st_size
    except (OSError, ValueError):
        return None
    if {k: meta.get(k) for k in identity} != identity:
        return None
    if size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return meta


def build_token_cache(
    tok: Tokenizer, files: Sequence[Path], texts: Sequence[str], cache_dir: PathLike | None = None
) -> tuple[Path, dict]:
    """Encode files + texts into `<cache_dir>/<key>.tokens` (+ `<key>.json`), or reuse a matching cache.

    Files are written under temporary names and renamed at the end, so an interrupted run never leaves
    a cache that looks complete. Returns (tokens_path, metadata).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key, identity = _cache_identity(tok, files, texts)
    tokens_path, meta_path = cache / f"{key}.tokens", cache / f"{key}.json"
    meta = _read_cache_meta(tokens_path, meta_path, identity)
    if meta is not None:
        logger.info("Reusing token cache %s (%d tokens)", tokens_path, meta["num_tokens"])
        return tokens_path, meta
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot create cache dir {cache} ({e}): pass cache_dir= or set GPT2_FLAX_CACHE."
        ) from e
    if tok.truncation is not None or tok.padding is not None:  # would cut or pad every piece: turn off
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)
    logger.info("Encoding %d file(s) + %d text(s) into %s", len(files), len(texts), tokens_path)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f"{key}.", suffix=".tmp")  # unique per process
    try:
        with os.fdopen(fd, "wb") as out:
            stream = iter_document_stream(files, texts, CHUNK_CHARS, PIECE_CHARS)
            num_tokens, num_documents = encode_stream(tok, stream, out, dtype, CHUNK_CHARS)
        os.chmod(tmp_name, 0o644)  # mkstemp makes files 0600; other users/hosts may share the cache
        os.replace(tmp_name, tokens_path)
        meta = {**identity, "dtype": dtype.name, "num_tokens": num_tokens, "num_documents": num_documents}
        meta.update(vocab_size=vocab_size, eos_token_id=eos_token_id(tok))
        with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".tmp", delete=False) as f:
            json.dump(meta, f, indent=1)
        os.chmod(f.name, 0o644)
        os.replace(f.name, meta_path)  # the metadata file is the commit marker: written last
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return tokens_path, meta


class PackedBlocks:
    """Serve training batches from a flat token array as windows of block_size + 1 tokens.

    Block i is tokens[i*block_size : i*block_size + block_size + 1]: inputs are its first block_size
    tokens and labels its last block_size, so all block_size positions are trained and consecutive
    blocks share one token. Global sample j = step*batch_size + row is block
    permutation(seed, epoch)[j % num_blocks] with epoch = j // num_blocks: each epoch visits every
    block exactly once, and any step can be recomputed without replaying earlier ones.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, name: str = "dataset") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if tokens.shape[0] < block_size + 1:
            raise ValueError(
                f"{name} has only {tokens.shape[0]} tokens, but one training block needs block_size + 1 = "
                f"{block_size + 1}: use a smaller block_size or add more text."
            )
        self.tokens = tokens
        self.block_size = block_size
        self.num_tokens = int(tokens.shape[0])
        # -1: the last window needs one token past its block for the final label.
        self.num_blocks = (self.num_tokens - 1) // block_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_blocks

    def block_order(self, seed: int, epoch: int) -> np.ndarray:
        """The order blocks are visited in during `epoch`: a permutation of range(num_blocks)."""
        if (seed, epoch) not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs; keep memory at 2 permutations
                self._orders.pop(next(iter(self._orders)))
            self._orders[seed, epoch] = np.random.default_rng([seed, epoch]).permutation(self.num_blocks)
        return self._orders[seed, epoch]

    @staticmethod
    def _rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
        if batch_size < 1 or process_count < 1:
            raise ValueError(f"batch_size ({batch_size}) and process_count ({process_count}) must be >= 1.")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by process_count={process_count}: use a global "
                f"batch size that is a multiple of {process_count}."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
        return batch_size // process_count

    def get_batch(
        self, step: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: {"input_ids", "labels"}, int32 (rows, block_size).

        The global batch has batch_size rows; process p gets the contiguous rows [p*rows, (p+1)*rows)
        with rows = batch_size // process_count.
        """
        rows = self._rows_per_process(batch_size, process_index, process_count)
        if step < 0 or seed < 0:
            raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0.")
        sample = step * batch_size + process_index * rows + np.arange(rows, dtype=np.int64)
        epochs, positions = np.divmod(sample, self.num_blocks)
        blocks = np.empty(rows, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            blocks[in_epoch] = self.block_order(seed, int(epoch))[positions[in_epoch]]
        # (rows, block_size + 1) token windows, gathered from the memmap.
        offsets = blocks[:, None] * self.block_size + np.arange(self.block_size + 1)
        windows = np.asarray(self.tokens[offsets], dtype=np.int32)
        return {"input_ids": windows[:, :-1].copy(), "labels": windows[:, 1:].copy()}  # C-contiguous

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_steps: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """get_batch for steps start_step, start_step + 1, ... (forever, or num_steps batches)."""
        self._rows_per_process(batch_size, process_index, process_count)  # fail now, not at first next()
        steps = (
            itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)
        )
        return (self.get_batch(step, batch_size, seed, process_index, process_count) for step in steps)


class TokenDataset(PackedBlocks):
    """Plain text files (a path, list, folder or glob; one document each) and/or `texts` as blocks.

    The tokenizer comes from `tokenizer=` or from `tokenizer_file` / `vocab_file` + `merges_file`.
    Tokens are cached in `cache_dir` (default `$GPT2_FLAX_CACHE` or ~/.cache/gpt2_flax/tokens), keyed
    by the tokenizer and each file's path, size and mtime; block_size can change without re-encoding.
    """

    def __init__(
        self,
        file_or_files: FilesArg | None = None,
        vocab_file: PathLike | None = None,
        merges_file: PathLike | None = None,
        tokenizer_file: PathLike | None = None,
        block_size: int = 1024,
        cache_dir: PathLike | None = None,
        tokenizer: Tokenizer | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        if tokenizer is None:
            tokenizer = load_tokenizer(vocab_file, merges_file, tokenizer_file)
        files = resolve_files(file_or_files) if file_or_files is not None else []
        texts = [texts] if isinstance(texts, str) else list(texts or [])  # a bare string is one document
        if not files and not texts:
            raise ValueError(
                "No training text given: pass file_or_files (path, folder, glob or list) or texts."
            )
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id(tokenizer)
        self.files = files
        self.cache_path, self.meta = build_token_cache(tokenizer, files, texts, cache_dir)
        self.num_documents = int(self.meta["num_documents"])
        tokens = np.memmap(self.cache_path, dtype=np.dtype(self.meta["dtype"]), mode="r")
        name = f"Input file {files[0]}" if len(files) == 1 and not texts else "The training text"
        super().__init__(tokens, block_size, name=name)

    def __repr__(self) -> str:
        return (
            f"TokenDataset(num_tokens={self.num_tokens:,}, num_documents={self.num_documents:,}, "
            f"block_size={self.block_size}, num_blocks={self.num_blocks:,}, vocab_size={self.vocab_size}, "
            f"dtype={self.tokens.dtype}, cache={str(self.cache_path)!r})"
        )
