"""TokenDataset: exact token layout, streaming == whole-document encoding, caching, batch order."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import small_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import gpt2_flax.data.cache as token_cache
from gpt2_flax.data import TokenDataset
from gpt2_flax.data.cache import default_cache_dir
from gpt2_flax.data.rows import PackedRows
from gpt2_flax.data.sources import iter_pieces
from gpt2_flax.tokenizer import EOS, train_tokenizer

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
    return small_tokenizer(tmp_path_factory.mktemp("tok"), "\n".join(tricky_text(s) for s in range(10)))


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
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 13)
    monkeypatch.setattr(token_cache, "PIECE_CHARS", 4)
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
    real_encode = token_cache.encode_stream
    calls = []
    monkeypatch.setattr(token_cache, "encode_stream", lambda *a: calls.append(1) or real_encode(*a))
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

    monkeypatch.setattr(token_cache, "_encode_batch", boom)
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
def counting() -> PackedRows:
    # tokens[i] == i, so a row's first input token / block_size is its row index.
    return PackedRows(np.arange(371, dtype=np.uint16), block_size=10)


def test_windows_and_shifted_labels(counting: PackedRows, tok: Tokenizer, tmp_path: Path) -> None:
    assert counting.num_rows == 37
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


def test_each_row_once_per_epoch_and_deterministic(counting: PackedRows) -> None:
    rows = np.concatenate(
        [b["input_ids"][:, 0] // 10 for b in counting.iter_batches(4, seed=5, num_steps=37)]
    )
    epochs = rows.reshape(4, 37)  # 148 samples = exactly 4 epochs of 37 rows
    for e, epoch in enumerate(epochs):
        assert sorted(epoch.tolist()) == list(range(37))
        np.testing.assert_array_equal(epoch, np.random.default_rng([5, e]).permutation(37))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    same = counting.get_batch(9, 4, seed=5)["input_ids"]
    np.testing.assert_array_equal(same, PackedRows(counting.tokens, 10).get_batch(9, 4, seed=5)["input_ids"])
    assert not np.array_equal(same, counting.get_batch(9, 4, seed=6)["input_ids"])


def test_resume_by_step_and_process_slices(counting: PackedRows) -> None:
    full = [b["input_ids"] for b in counting.iter_batches(8, seed=2, num_steps=12)]
    tail = [b["input_ids"] for b in counting.iter_batches(8, seed=2, start_step=7, num_steps=5)]
    for a, b in zip(full[7:], tail, strict=True):
        np.testing.assert_array_equal(a, b)
    for step in (0, 4, 9):  # step 4 spans the epoch boundary (samples 32..39, 37 rows)
        whole = counting.get_batch(step, 8, seed=2)
        parts = [counting.get_batch(step, 8, seed=2, process_index=p, process_count=2) for p in range(2)]
        for key in ("input_ids", "labels"):
            assert parts[0][key].shape == (4, 10)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    # Within one epoch (step 0: samples 0..7) the two processes' rows are distinct.
    parts = [
        counting.get_batch(0, 8, seed=2, process_index=p, process_count=2)["input_ids"] for p in range(2)
    ]
    assert not set(parts[0][:, 0]) & set(parts[1][:, 0])


def test_bad_inputs(tok: Tokenizer, tmp_path: Path, counting: PackedRows) -> None:
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


# ----------------------------------------------------------------------------- line_by_line packing


def test_packed_rows_exact_layout() -> None:
    from gpt2_flax.data.packing import DocumentRows

    tokens = np.arange(100, dtype=np.uint16)  # token i == i: a row shows where each token came from
    packed = DocumentRows(tokens, np.array([0, 3, 8, 10, 14]), block_size=8)  # docs of 3, 5, 2, 4
    # Best fit in order: doc 0 -> row 0 (room 5); doc 1 (5) fills row 0; doc 2 -> row 1; doc 3 -> row 1.
    assert packed.num_rows == 2
    b = packed._gather(np.array([0, 1]))
    np.testing.assert_array_equal(b["input_ids"], [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(b["labels"], [[1, 2, -1, 4, 5, 6, 7, -1], [9, -1, 11, 12, 13, -1, -1, -1]])
    # Best fit, not next fit: a later short document fills an earlier row's gap.
    later = DocumentRows(tokens, np.array([0, 6, 12, 14]), block_size=8)  # 6, 6, 2
    np.testing.assert_array_equal(later._gather(np.array([0]))["input_ids"], [[0, 1, 2, 3, 4, 5, 12, 13]])


def test_long_documents_split_or_truncate() -> None:
    from gpt2_flax.data.packing import DocumentRows, document_pieces

    offsets = np.array([0, 12, 15])  # docs of 12 and 3 tokens, block_size 5
    starts, lengths = document_pieces(offsets, None, 5, "split")
    # Pieces overlap by one token, so each of the 11 next-token predictions is trained exactly once.
    assert starts.tolist() == [0, 4, 8, 12] and lengths.tolist() == [5, 5, 4, 3]
    starts, lengths = document_pieces(offsets, None, 5, "truncate")
    assert starts.tolist() == [0, 12] and lengths.tolist() == [5, 3]
    tokens = np.arange(20, dtype=np.uint16)
    with pytest.warns(
        UserWarning, match=r"1 of 2 documents are longer than block_size=5 .*longest: 12.*split"
    ):
        split = DocumentRows(tokens, offsets, 5, long_documents="split")
    labels = split._gather(np.arange(split.num_rows))["labels"]
    trained = sorted(int(t) for t in labels[labels >= 0])
    assert trained == [*range(1, 12), 13, 14]  # every prediction inside each document, once
    with pytest.warns(UserWarning, match="truncated"):
        assert DocumentRows(tokens, offsets, 5, long_documents="truncate").num_rows == 2


def test_packed_documents_never_attend_across(tok: Tokenizer) -> None:
    """Changing one document of a packed row leaves the other documents' logits unchanged, and a
    document's logits equal those it gets alone at the start of a row (positions restart at 0)."""
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_flax.config import ModelConfig
    from gpt2_flax.data.packing import DocumentRows
    from gpt2_flax.model import GPT2LMHeadModel

    block = 16
    model = GPT2LMHeadModel(
        ModelConfig(vocab_size=tok.get_vocab_size(), n_positions=block, n_embd=32, n_layer=2, n_head=4),
        rngs=nnx.Rngs(0),
    )
    docs = [[0, 5, 9, 30, 0], [0, 44, 61, 0], [0, 7, 7, 7, 8, 0]]
    tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    row = DocumentRows(tokens, offsets, block)._gather(np.array([0]))
    assert row["segment_ids"][0].tolist() == [1] * 5 + [2] * 4 + [3] * 6 + [0]

    def logits(batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(
            model(
                jnp.asarray(batch["input_ids"]),
                positions=jnp.asarray(batch["positions"]),
                segment_ids=jnp.asarray(batch["segment_ids"]),
            )
        )

    base = logits(row)
    changed = {k: v.copy() for k, v in row.items()}
    changed["input_ids"][0, 5:9] = [0, 100, 200, 0]  # rewrite document 2 only
    out = logits(changed)
    np.testing.assert_allclose(out[0, :5], base[0, :5], atol=1e-6)  # document 1: before it
    np.testing.assert_allclose(out[0, 9:15], base[0, 9:15], atol=1e-6)  # document 3: after it
    assert not np.allclose(out[0, 5:9], base[0, 5:9])
    alone = DocumentRows(tokens[9:15], np.array([0, 6]), block)._gather(np.array([0]))
    np.testing.assert_allclose(logits(alone)[0, :6], base[0, 9:15], atol=1e-5)


def test_line_by_line_batches_resume_and_process_slices(tok: Tokenizer, tmp_path: Path) -> None:
    texts = [tricky_text(s, lines=1).strip() or "x" for s in range(60)]
    ds = TokenDataset(texts=texts, tokenizer=tok, block_size=24, cache_dir=tmp_path, line_by_line=True)
    full = list(ds.iter_batches(4, seed=3, num_steps=8))
    tail = list(ds.iter_batches(4, seed=3, start_step=5, num_steps=3))
    for a, b in zip(full[5:], tail, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    parts = [ds.get_batch(6, 4, seed=3, process_index=p, process_count=2) for p in range(2)]
    for key in full[6]:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[6][key])
    # One epoch of rows holds every document exactly once.
    rows = ds.rows._gather(np.arange(ds.num_blocks))
    starts = rows["input_ids"][(rows["positions"] == 0) & (rows["segment_ids"] > 0)]
    assert (starts == ds.eos_token_id).sum() == ds.num_documents == sum(1 for t in texts if t.strip())
    assert int((rows["segment_ids"] > 0).sum()) == ds.num_tokens


# ----------------------------------------------------------------------------- validation, mixing, prefetch


def test_validation_split_is_disjoint_and_eval_batches_are_fixed(tok: Tokenizer, tmp_path: Path) -> None:
    texts = [tricky_text(s) for s in range(4)]
    full = TokenDataset(texts=texts, tokenizer=tok, block_size=8, cache_dir=tmp_path)
    train = TokenDataset(texts=texts, tokenizer=tok, block_size=8, cache_dir=tmp_path, validation_split=0.1)
    val = train.validation
    assert val.num_blocks == round(0.1 * full.num_blocks)
    train_ids, val_ids = set(train.rows.row_ids.tolist()), set(val.rows.row_ids.tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(full.num_blocks))
    # Training batches are windows of training rows only.
    samples = np.arange(3 * train.num_blocks)
    ids = train.rows.row_ids[train.rows.rows_for(samples, seed=4)]
    assert set(ids.tolist()) == train_ids
    np.testing.assert_array_equal(
        train.get_batch(1, 8, seed=4)["input_ids"], full.rows._gather(ids[8:16])["input_ids"]
    )
    # eval_batches: every validation row once, in a fixed order, padded with labels -1.
    batches = list(val.eval_batches(batch_size=8))
    assert len(batches) == -(-val.num_blocks // 8)
    labels = np.concatenate([b["labels"] for b in batches])
    assert (labels[val.num_blocks :] == -1).all() and (labels[: val.num_blocks] >= 0).all()
    firsts = np.concatenate([b["input_ids"] for b in batches])[: val.num_blocks]
    np.testing.assert_array_equal(
        np.sort(firsts, axis=0), np.sort(full.rows._gather(val.rows.row_ids)["input_ids"], axis=0)
    )
    again = list(val.eval_batches(batch_size=8, num_batches=1, process_index=1, process_count=2))
    assert len(again) == 1
    np.testing.assert_array_equal(again[0]["input_ids"], batches[0]["input_ids"][4:])
    # line_by_line holds out whole documents.
    docs = [f"doc {i}: " + tricky_text(i, lines=1).strip() for i in range(40)]
    lines = TokenDataset(texts=docs, tokenizer=tok, block_size=64, cache_dir=tmp_path, line_by_line=True,
                         validation_split=0.2)  # fmt: skip
    starts = {int(s) for s in np.load(lines.cache_entry / "doc_offsets.npy")[:-1]}
    train_docs = set(np.asarray(lines.rows.piece_start).tolist()) & starts
    val_docs = set(np.asarray(lines.validation.rows.piece_start).tolist()) & starts
    assert len(val_docs) == 8 and not train_docs & val_docs and train_docs | val_docs == starts


def test_validation_files(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text(tricky_text(11), encoding="utf-8")
    ds = TokenDataset(texts=[tricky_text(10)], tokenizer=tok, block_size=8, cache_dir=tmp_path / "c",
                      validation_files=tmp_path / "val.txt")  # fmt: skip
    assert ds.validation.tokens.tolist() == expected_tokens(tok, [tricky_text(11)])
    assert next(ds.validation.eval_batches(4))["input_ids"].shape == (4, 8)


def test_merge_weights_sampling_determinism_and_slices() -> None:
    from gpt2_flax.data import merge_datasets

    a = PackedRows(np.arange(401, dtype=np.uint16), block_size=4)  # tokens 0..400
    b = PackedRows(np.arange(1000, 1041, dtype=np.uint16), block_size=4)  # 10 rows: much smaller
    mixed = merge_datasets([a, b], weights=[0.7, 0.3])
    rows = np.concatenate([x["input_ids"][:, 0] for x in mixed.iter_batches(16, seed=1, num_steps=200)])
    frac_b = float((rows >= 1000).mean())
    assert abs(frac_b - 0.3) < 0.03  # 3200 rows: ~4 standard deviations
    assert len(set(rows[rows >= 1000].tolist())) == 10  # sampled, not truncated: every row of b appears
    np.testing.assert_array_equal(
        mixed.get_batch(7, 16, seed=1)["input_ids"], mixed.get_batch(7, 16, seed=1)["input_ids"]
    )
    assert not np.array_equal(
        mixed.get_batch(7, 16, seed=1)["input_ids"], mixed.get_batch(7, 16, seed=2)["input_ids"]
    )
    parts = [mixed.get_batch(7, 16, seed=1, process_index=p, process_count=4)["input_ids"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), mixed.get_batch(7, 16, seed=1)["input_ids"])
    equal = merge_datasets([a, b], equalize=True)
    rows = np.concatenate([x["input_ids"][:, 0] for x in equal.iter_batches(16, num_steps=100)])
    assert abs(float((rows >= 1000).mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="block sizes"):
        merge_datasets([a, PackedRows(np.arange(50, dtype=np.uint16), block_size=3)])
    with pytest.raises(ValueError, match="non-negative"):
        merge_datasets([a, b], weights=[1.0, -1.0])


def test_merge_line_by_line_with_concatenated(tok: Tokenizer, tmp_path: Path) -> None:
    from gpt2_flax.data import merge_datasets

    kw = {"tokenizer": tok, "block_size": 8, "cache_dir": tmp_path}
    packed = TokenDataset(texts=[tricky_text(1)], validation_split=0.2, **kw)
    lines = TokenDataset(texts=["a b", "c d"] * 5, line_by_line=True, validation_split=0.2, **kw)
    mixed = merge_datasets([packed, lines], equalize=True)
    assert mixed.tokenizer is tok and mixed.vocab_size == tok.get_vocab_size()
    batch = mixed.get_batch(0, 32)
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    from_packed = (batch["segment_ids"] == 1).all(axis=1) & (batch["positions"][:, -1] == 7)
    assert from_packed.any() and not from_packed.all()
    assert len(list(mixed.validation.eval_batches(4, num_batches=3))) == 3


def test_prefetch_matches_and_propagates_errors(counting: PackedRows) -> None:
    from gpt2_flax.data.rows import prefetch

    plain = list(counting.iter_batches(4, seed=2, start_step=3, num_steps=20))
    ahead = list(counting.iter_batches(4, seed=2, start_step=3, num_steps=20, prefetch=3))
    for a, b in zip(plain, ahead, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])

    def broken():
        yield 1
        raise RuntimeError("bad row")

    it = prefetch(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad row"):
        next(it)
    endless = counting.iter_batches(4, prefetch=2)
    next(endless)
    endless.close()  # stops the background thread
