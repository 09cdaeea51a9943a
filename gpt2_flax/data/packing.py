"""line_by_line packing: whole documents (or pieces of long ones) best-fit into rows of block_size.

document_pieces cuts the documents into pieces of <= block_size tokens, pack_rows assigns each piece a
row, and DocumentRows stores that packing next to the token file and gathers rows with a segment id
and a restarting position for every token, so nothing is attended to or predicted across documents.
"""

from __future__ import annotations

import bisect
import logging
import os
import tempfile
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_flax.data.rows import Rows
from gpt2_flax.errors import DataError

logger = logging.getLogger(__name__)


def pack_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Best fit in input order: each piece goes into the open row with the least room that still fits
    it (the oldest such row), else into a new row. Returns each piece's row, numbered by creation."""
    rows: list[int] = []
    stacks: dict[int, deque[int]] = {}  # room left -> rows with exactly that much room, oldest first
    rooms: list[int] = []  # sorted keys of `stacks`
    num_rows = 0
    for n in lengths.tolist():
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = stacks[room].popleft()
            if not stacks[room]:
                del stacks[room], rooms[k]
        else:
            row, room, num_rows = num_rows, capacity, num_rows + 1
        rows.append(row)
        if (room := room - n) >= 2:  # a piece of < 2 tokens trains nothing
            if room not in stacks:
                stacks[room] = deque()
                bisect.insort(rooms, room)
            stacks[room].append(row)
    return np.asarray(rows, dtype=np.int64)


def document_pieces(
    doc_offsets: np.ndarray, doc_ids: np.ndarray | None, block_size: int, long_documents: str
) -> tuple[np.ndarray, np.ndarray]:
    """(token start, length) of every piece: documents, with over-long ones split or truncated.

    "split" cuts a document of L > block_size tokens into ceil((L-1)/(block_size-1)) pieces that
    overlap by one token, so each of its L-1 next-token predictions is trained exactly once.
    """
    starts, lengths = np.asarray(doc_offsets[:-1]), np.diff(doc_offsets)
    if doc_ids is not None:
        starts, lengths = starts[doc_ids], lengths[doc_ids]
    if long_documents == "truncate":
        return starts, np.minimum(lengths, block_size)
    step = block_size - 1
    count = np.where(lengths > block_size, -(-(lengths - 1) // step), 1)
    doc = np.repeat(np.arange(lengths.size), count)
    k = np.arange(doc.size) - np.repeat(np.cumsum(count) - count, count)
    return starts[doc] + k * step, np.minimum(lengths[doc] - k * step, block_size)


class DocumentRows(Rows):
    """line_by_line mode: rows of block_size tokens, each holding whole documents (or pieces of long ones).

    The packing (pieces sorted by row + row pointers) is computed once and stored next to the token
    file as `<index_path>.pieces.npy` / `.rows.npy`, then memory-mapped. warn=False: no warning about
    long documents (a stream packs window after window and warns once itself).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        block_size: int,
        doc_ids: np.ndarray | None = None,
        long_documents: str = "split",
        index_path: Path | None = None,
        warn: bool = True,
    ) -> None:
        if block_size < 2:
            raise DataError(f"line_by_line needs block_size >= 2, got {block_size}.")
        self.tokens = tokens
        lengths = np.diff(doc_offsets) if doc_ids is None else np.diff(doc_offsets)[doc_ids]
        if warn and (num_long := int((lengths > block_size).sum())) > 0:
            action = "split into pieces of block_size tokens" if long_documents == "split" else "truncated"
            warnings.warn(
                f"{num_long} of {lengths.size} documents are longer than block_size={block_size} tokens "
                f"(longest: {lengths.max()} tokens, EOS included) and were {action}: pass a larger "
                "block_size, or long_documents='split' / 'truncate' to choose.",
                stacklevel=4,
            )
        pieces, row_ptr = self._load_index(index_path)
        if pieces is None:
            starts, plen = document_pieces(doc_offsets, doc_ids, block_size, long_documents)
            rows = pack_rows(plen, block_size)
            order = np.argsort(rows, kind="stable")
            pieces = np.stack([starts[order], plen[order]], axis=1)
            row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows))]).astype(np.int64)
            self._save_index(index_path, pieces, row_ptr)
        self.piece_start, self.piece_len, self.row_ptr = pieces[:, 0], pieces[:, 1], row_ptr
        super().__init__(len(row_ptr) - 1, block_size)

    @staticmethod
    def _load_index(index_path: Path | None) -> tuple[Any, Any]:
        if index_path is None:
            return None, None
        try:
            rows = np.load(f"{index_path}.rows.npy", mmap_mode="r")  # written last: the commit marker
            return np.load(f"{index_path}.pieces.npy", mmap_mode="r"), rows
        except (OSError, ValueError, TypeError):
            return None, None

    @staticmethod
    def _save_index(index_path: Path | None, pieces: np.ndarray, row_ptr: np.ndarray) -> None:
        if index_path is None:
            return
        try:
            for suffix, array in ((".pieces.npy", pieces), (".rows.npy", row_ptr)):
                with tempfile.NamedTemporaryFile(dir=index_path.parent, suffix=".tmp", delete=False) as f:
                    np.save(f, array)
                os.chmod(f.name, 0o644)
                os.replace(f.name, f"{index_path}{suffix}")
        except OSError as e:  # a read-only saved cache: keep the packing in memory only
            logger.info("Not saving the packing index next to %s: %s", index_path, e)

    def _gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        n, width = ids.shape[0], self.block_size
        first = np.asarray(self.row_ptr[ids])
        count = np.asarray(self.row_ptr[ids + 1]) - first  # pieces per row, >= 1
        row_base = np.cumsum(count) - count  # index of each row's first piece in this batch
        piece = np.repeat(first - row_base, count) + np.arange(count.sum())
        length, start = np.asarray(self.piece_len[piece]), np.asarray(self.piece_start[piece])
        flat = np.cumsum(length) - length  # offset of each piece in the batch's flattened tokens
        col0 = flat - np.repeat(flat[row_base], count)  # column where each piece starts in its row
        pos = np.arange(length.sum()) - np.repeat(flat, length)  # (tokens,) position in document
        r = np.repeat(np.repeat(np.arange(n), count), length)
        c = np.repeat(col0, length) + pos
        src = np.repeat(start, length) + pos
        last = pos == np.repeat(length - 1, length)
        # Each token and the next in one read (a URL cache: one cat_ranges call per batch, not two).
        both = np.stack([src, np.minimum(src + 1, self.tokens.shape[0] - 1)])
        cur, nxt = np.asarray(self.tokens[both], np.int32)
        out = {k: np.zeros((n, width), np.int32) for k in ("input_ids", "segment_ids", "positions")}
        out["labels"] = np.full((n, width), -1, np.int32)
        out["input_ids"][r, c] = cur
        out["labels"][r, c] = np.where(last, -1, nxt)
        out["segment_ids"][r, c] = np.repeat(np.arange(piece.size) - np.repeat(row_base, count) + 1, length)
        out["positions"][r, c] = pos
        return out
