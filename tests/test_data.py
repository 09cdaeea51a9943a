"""TokenDataset: exact token layout, streaming == whole-document encoding, caching, batch order."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import gpt2_flax.data as data
from gpt2_flax.data import PackedBlocks, TokenDataset, default_cache_dir, iter_pieces
from gpt2_flax.tokenizer import EOS, load_tokenizer, train_tokenizer

WORDS = "the cat sat on a mat, don't stop! héllo 日本語 🙂 42 x=1;".split()


def tricky_text(seed: int, lines: int = 60) -> str:
    """Text whose whitespace GPT-2's regex groups across line breaks: blank lines, trailing spaces,
    indentation, tabs, lines of only spaces."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        indent = rng.choice(["", "", " ", "    ", "\t", "  \t"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))
        out.append(indent + words + rng.choice(["", "", " ", "   ", "\t"]))
    return "\n".join(out) + rng.choice(["", "\n", "\n\n", "  \n"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(tricky_text(s) for s in range(10)), encoding="utf-8")
    _, _ = train_tokenizer(root / "corpus.txt", vocab_size=400, save_path=root, prefix="tiny")
    return load_tokenizer(tokenizer_file=root / "tiny.tokenizer.json")


def expected_tokens(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for doc in docs for i in tok.encode(doc).ids + [tok.token_to_id(EOS)]]


def test_token_layout_is_documents_joined_by_eos(tok: Tokenizer, tmp_path: Path) -> None:
    docs = [tricky_text(1), "short doc", tricky_text(2)]
    ds = TokenDataset(texts=docs, tokenizer=tok, block_size=8, cache_dir=tmp_path)
    assert ds.tokens.tolist() == expected_tokens(tok, docs)
    assert (ds.num_documents, ds.eos_token_id, ds.vocab_size) == (3, 0, tok.get_vocab_size())
    assert ds.tokens.dtype == np.uint16 and isinstance(ds.tokens, np.memmap)
    assert len(ds) == ds.num_blocks == (ds.num_tokens - 1) // 8
    assert "num_tokens=" in repr(ds) and "num_blocks=" in repr(ds)
    # A folder is one document per file, in name order.
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, doc in zip(["b.txt", "a.txt", "c.txt"], [docs[1], docs[0], docs[2]], strict=True):
        (folder / name).write_text(doc, encoding="utf-8")
    from_files = TokenDataset(folder, tokenizer=tok, block_size=8, cache_dir=tmp_path)
    assert from_files.tokens.tolist() == expected_tokens(tok, docs)


@pytest.mark.parametrize("seed", range(6))
def test_pieces_encode_like_whole_document(tok: Tokenizer, seed: int) -> None:
    text = tricky_text(seed, lines=40)
    naive = [i for line in text.splitlines(keepends=True) for i in tok.encode(line).ids]
    assert naive != tok.encode(text).ids  # cutting at every "\n" would be wrong on this text
    for chunk_chars, piece_chars in [(1, 1), (3, 2), (7, 5), (64, 16), (10_000, 10_000)]:
        reader = iter(text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars))
        pieces = list(iter_pieces(lambda n, r=reader: next(r, ""), "t", chunk_chars, piece_chars))
        assert "".join(pieces) == text
        assert [i for p in pieces for i in tok.encode(p).ids] == tok.encode(text).ids
        if piece_chars == 1:  # every safe cut ("\n" between two non-space chars) is taken
            assert len(pieces) == 1 + len(re.findall(r"(?<=\S)\n(?=\S)", text)) > 1


def test_pieces_cut_only_between_non_space() -> None:
    text = "a\nb\n\nc \nd\n e\nf"
    reader = iter(text)
    assert list(iter_pieces(lambda n: next(reader, ""), "t", 1, 1)) == ["a\n", "b\n\nc \nd\n e\n", "f"]


def test_streamed_file_matches_whole_encoding(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "CHUNK_CHARS", 13)
    monkeypatch.setattr(data, "PIECE_CHARS", 4)
    docs = [tricky_text(7, lines=80), tricky_text(8, lines=80)]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    ds = TokenDataset(str(tmp_path / "*.txt"), tokenizer=tok, block_size=4, cache_dir=tmp_path / "c")
    assert ds.tokens.tolist() == expected_tokens(tok, docs)


def test_truncation_setting_is_ignored(tok: Tokenizer, tmp_path: Path) -> None:
    docs = [tricky_text(9)]
    truncating = Tokenizer.from_str(tok.to_str())
    truncating.enable_truncation(max_length=3)
    ds = TokenDataset(texts=docs, tokenizer=truncating, block_size=8, cache_dir=tmp_path)
    assert ds.tokens.tolist() == expected_tokens(tok, docs)
    assert truncating.truncation is not None  # the caller's tokenizer is left as it was


def test_crlf_and_cr_are_normalised(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "win.txt").write_bytes(b"the cat\r\n\r\n  sat\ron a mat \r\n")
    ds = TokenDataset(tmp_path / "win.txt", tokenizer=tok, block_size=2, cache_dir=tmp_path / "c")
    assert ds.tokens.tolist() == expected_tokens(tok, ["the cat\n\n  sat\non a mat \n"])


def test_uint32_for_large_vocab(tmp_path: Path) -> None:
    vocab = {EOS: 0, **{ch: i + 1 for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    vocab.update({f"extra{i}": len(vocab) + i for i in range(70_000)})  # no merges: only bytes are used
    big = Tokenizer(models.BPE(vocab, []))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens([EOS])
    ds = TokenDataset(texts=["hello world"], tokenizer=big, block_size=4, cache_dir=tmp_path)
    assert ds.tokens.dtype == np.uint32
    assert ds.tokens.tolist() == big.encode("hello world").ids + [0]


def test_cache_is_reused_and_invalidated(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "doc.txt"
    src.write_text(tricky_text(3), encoding="utf-8")
    first = TokenDataset(src, tokenizer=tok, block_size=8, cache_dir=tmp_path / "c")
    real_encode = data.encode_stream
    calls = []
    monkeypatch.setattr(data, "encode_stream", lambda *a: calls.append(1) or real_encode(*a))
    again = TokenDataset(src, tokenizer=tok, block_size=16, cache_dir=tmp_path / "c")  # new block_size
    assert calls == [] and again.cache_path == first.cache_path
    assert again.tokens.tolist() == first.tokens.tolist()
    assert first.cache_path.stat().st_mode & 0o044 == 0o044  # readable by other users sharing the cache
    src.write_text(tricky_text(4), encoding="utf-8")  # modified file -> re-encoded
    changed = TokenDataset(src, tokenizer=tok, block_size=8, cache_dir=tmp_path / "c")
    assert calls == [1] and changed.cache_path != first.cache_path
    assert changed.tokens.tolist() == expected_tokens(tok, [tricky_text(4)])
    other_root = tmp_path / "other"
    train_tokenizer(src, vocab_size=300, save_path=other_root, prefix="o")  # different tokenizer
    other = TokenDataset(
        src, tokenizer_file=other_root / "o.tokenizer.json", block_size=8, cache_dir=tmp_path / "c"
    )
    assert calls == [1, 1] and other.cache_path != changed.cache_path


def test_interrupted_encoding_leaves_no_cache(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        TokenDataset(texts=[tricky_text(5)], tokenizer=tok, block_size=8, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    ds = TokenDataset(texts=[tricky_text(5)], tokenizer=tok, block_size=8, cache_dir=tmp_path)
    assert ds.tokens.tolist() == expected_tokens(tok, [tricky_text(5)])


def test_default_cache_dir_respects_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPT2_FLAX_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv("GPT2_FLAX_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "gpt2_flax" / "tokens"


@pytest.fixture()
def counting() -> PackedBlocks:
    # tokens[i] == i, so a row's first input token / block_size is its block index.
    return PackedBlocks(np.arange(371, dtype=np.uint16), block_size=10)


def test_windows_and_shifted_labels(counting: PackedBlocks, tok: Tokenizer, tmp_path: Path) -> None:
    assert counting.num_blocks == 37
    batch = counting.get_batch(step=3, batch_size=6, seed=1)
    assert batch["input_ids"].shape == batch["labels"].shape == (6, 10)
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32
    starts = batch["input_ids"][:, 0]
    assert np.all(starts % 10 == 0)
    np.testing.assert_array_equal(batch["input_ids"], starts[:, None] + np.arange(10))
    np.testing.assert_array_equal(batch["labels"], batch["input_ids"] + 1)
    ds = TokenDataset(texts=[tricky_text(6)], tokenizer=tok, block_size=8, cache_dir=tmp_path)
    real = ds.get_batch(0, 4)
    np.testing.assert_array_equal(real["input_ids"][:, 1:], real["labels"][:, :-1])


def test_each_block_once_per_epoch_and_deterministic(counting: PackedBlocks) -> None:
    rows = np.concatenate(
        [b["input_ids"][:, 0] // 10 for b in counting.iter_batches(4, seed=5, num_steps=37)]
    )
    epochs = rows.reshape(4, 37)  # 148 samples = exactly 4 epochs of 37 blocks
    for e, epoch in enumerate(epochs):
        assert sorted(epoch.tolist()) == list(range(37))
        np.testing.assert_array_equal(epoch, np.random.default_rng([5, e]).permutation(37))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    same = counting.get_batch(9, 4, seed=5)["input_ids"]
    np.testing.assert_array_equal(
        same, PackedBlocks(counting.tokens, 10).get_batch(9, 4, seed=5)["input_ids"]
    )
    assert not np.array_equal(same, counting.get_batch(9, 4, seed=6)["input_ids"])


def test_resume_by_step_and_process_slices(counting: PackedBlocks) -> None:
    full = [b["input_ids"] for b in counting.iter_batches(8, seed=2, num_steps=12)]
    tail = [b["input_ids"] for b in counting.iter_batches(8, seed=2, start_step=7, num_steps=5)]
    for a, b in zip(full[7:], tail, strict=True):
        np.testing.assert_array_equal(a, b)
    for step in (0, 4, 9):  # step 4 spans the epoch boundary (samples 32..39, 37 blocks)
        whole = counting.get_batch(step, 8, seed=2)
        parts = [counting.get_batch(step, 8, seed=2, process_index=p, process_count=2) for p in range(2)]
        for key in ("input_ids", "labels"):
            assert parts[0][key].shape == (4, 10)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    # Within one epoch (step 0: samples 0..7) the two processes' rows are distinct blocks.
    parts = [
        counting.get_batch(0, 8, seed=2, process_index=p, process_count=2)["input_ids"] for p in range(2)
    ]
    assert not set(parts[0][:, 0]) & set(parts[1][:, 0])


def test_bad_inputs(tok: Tokenizer, tmp_path: Path, counting: PackedBlocks) -> None:
    kw = {"tokenizer": tok, "cache_dir": tmp_path / "c"}
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        TokenDataset(tmp_path / "missing.txt", **kw)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty or contains only whitespace"):
        TokenDataset(tmp_path / "empty.txt", **kw)
    (tmp_path / "blank.txt").write_text(" \n\t\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt is empty or contains only whitespace"):
        TokenDataset(tmp_path / "blank.txt", **kw)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        TokenDataset(tmp_path / "latin1.txt", **kw)
    (tmp_path / "tiny.txt").write_text("the cat", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"tiny.txt has only \d+ tokens.*smaller block_size or add more text"
    ):
        TokenDataset(tmp_path / "tiny.txt", block_size=64, **kw)
    with pytest.raises(ValueError, match="No tokenizer given"):
        TokenDataset(tmp_path / "tiny.txt", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="No training text given"):
        TokenDataset(tokenizer=tok, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        counting.get_batch(0, 8, process_count=3)
    with pytest.raises(ValueError, match="not divisible"):
        counting.iter_batches(8, process_count=3)  # raised eagerly, not at first next()
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, 2\)"):
        counting.get_batch(0, 8, process_index=2, process_count=2)
