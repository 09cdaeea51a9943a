"""Reading and encoding sources: text hygiene, CSV / JSONL / Parquet / lists / datasets, line_by_line
documents, the cache (reuse, invalidation, save/load, atomicity) and every bad input's error."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import small_tokenizer, snapshot
from tokenizers import Tokenizer

import gpt2_flax.data.cache as token_cache
from gpt2_flax.data import EncodingOptions, TokenDataset, encode_main
from gpt2_flax.tokenizer import EOS

LINES = ["the cat sat on a mat", "don't stop! héllo 日本語 🙂", "  indented line\twith tab", "x=1; 42"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(LINES).split()[: rng.randint(1, 6)]) for _ in range(400))
    return small_tokenizer(tmp_path_factory.mktemp("tok"), text)


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def docs_layout(tok: Tokenizer, docs: list[str]) -> list[int]:
    """line_by_line token file: <|endoftext|> doc <|endoftext|> for every document."""
    eos = tok.token_to_id(EOS)
    return [i for d in docs for i in [eos, *ids(tok, d), eos]]


def concat_layout(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for d in docs for i in [*ids(tok, d), tok.token_to_id(EOS)]]


def count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = token_cache.encode_stream
    monkeypatch.setattr(token_cache, "encode_stream", lambda *a: calls.append(1) or real(*a))
    return calls


def test_line_by_line_text_file(tok: Tokenizer, tmp_path: Path) -> None:
    src = tmp_path / "lines.txt"
    src.write_bytes("the cat\r\n\r\n   \ndon't stop\rhéllo 日本語\n\t\nx=1; 42".encode())
    ds = TokenDataset(src, tokenizer=tok, block_size=64, cache_dir=tmp_path / "c", line_by_line=True)
    docs = ["the cat", "don't stop", "héllo 日本語", "x=1; 42"]  # CRLF / CR split lines, blanks skipped
    assert ds.tokens.tolist() == docs_layout(tok, docs)
    assert ds.num_documents == 4 and ds.line_by_line
    np.testing.assert_array_equal(
        np.load(ds.cache_entry / "doc_offsets.npy"), np.cumsum([0] + [len(ids(tok, d)) + 2 for d in docs])
    )
    batch = ds.get_batch(0, 2)
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (2, 64) for v in batch.values())


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX may be imported; the workers never use it
@pytest.mark.parametrize("lines", [False, True])
def test_chunked_reading_is_exact(tok: Tokenizer, tmp_path: Path, monkeypatch, lines: bool) -> None:
    """Work items of a few bytes (cut at CRLF / CR / LF next to multi-byte and odd whitespace) encode
    exactly like the whole file, in both modes and with two worker processes."""
    rng = random.Random(3)
    seps = ["\n", "\r\n", "\r", "\n\n", " \r\n", "\r\n\u3000", "\n\u00a0"]
    words = ["日本語", "🙂x", "héllo", "a", "  b", "\tc", "42;"]
    text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(300)) + "end"
    (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
    normal = text.replace("\r\n", "\n").replace("\r", "\n")
    if lines:
        expected = docs_layout(tok, [ln for ln in normal.split("\n") if ln.strip()])
    else:
        expected = concat_layout(tok, [normal])
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 7)
    monkeypatch.setattr(token_cache, "PIECE_CHARS", 3)
    for num_proc in (1, 2):
        ds = TokenDataset(
            tmp_path / "t.txt", tokenizer=tok, block_size=4, cache_dir=tmp_path / f"c{num_proc}",
            line_by_line=lines, num_proc=num_proc,
        )  # fmt: skip
        assert ds.tokens.tolist() == expected, num_proc


def test_csv_jsonl_parquet_lists_and_datasets(tok: Tokenizer, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    kw = {"tokenizer": tok, "block_size": 8, "cache_dir": tmp_path / "c"}
    (tmp_path / "a.csv").write_text(
        'id,text\n1,"the cat, sat"\n2,"multi\r\nline"\n3,\n4,NA\n', encoding="utf-8"
    )
    docs = ["the cat, sat", "multi\nline", "NA"]  # the empty row skipped (asked for); "NA" stays text
    with pytest.raises(ValueError, match=r"a.csv, line 5: the text field is empty"):
        TokenDataset(tmp_path / "a.csv", **kw)
    kw["skip_bad_records"] = True
    assert TokenDataset(tmp_path / "a.csv", line_by_line=True, **kw).tokens.tolist() == docs_layout(tok, docs)
    assert TokenDataset(tmp_path / "a.csv", **kw).tokens.tolist() == concat_layout(tok, docs)
    (tmp_path / "b.csv").write_text("7,héllo 日本語\n8,x=1; 42\n", encoding="utf-8")  # no header
    got = TokenDataset(tmp_path / "b.csv", header=False, text_column=1, line_by_line=True, **kw)
    assert got.tokens.tolist() == docs_layout(tok, ["héllo 日本語", "x=1; 42"])
    (tmp_path / "c.jsonl").write_text(
        '{"body": "the cat", "n": 1}\n\n{"body": "don\'t stop"}\n', encoding="utf-8"
    )
    got = TokenDataset(tmp_path / "c.jsonl", text_column="body", line_by_line=True, **kw)
    assert got.tokens.tolist() == docs_layout(tok, ["the cat", "don't stop"])
    pq.write_table(pa.table({"text": ["a mat", "42"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert TokenDataset(tmp_path / "d.parquet", line_by_line=True, **kw).tokens.tolist() == docs_layout(
        tok, ["a mat", "42"]
    )
    texts = ["the cat\r\nsat", "  ", "héllo"]
    assert TokenDataset(texts=texts, line_by_line=True, **kw).tokens.tolist() == docs_layout(
        tok, ["the cat\nsat", "héllo"]
    )
    hf = datasets.Dataset.from_dict({"content": ["one cat", "two cats"]})
    assert TokenDataset(hf, **kw).tokens.tolist() == concat_layout(tok, ["one cat", "two cats"])
    # Several kinds at once keep their order: files as given, then texts.
    (tmp_path / "e.txt").write_text("plain text\n", encoding="utf-8")
    paths = [tmp_path / "d.parquet", tmp_path / "e.txt", tmp_path / "a.csv"]
    mixed = TokenDataset(paths, texts=["end"], **kw)
    assert mixed.tokens.tolist() == concat_layout(tok, ["a mat", "42", "plain text\n", *docs, "end"])
    assert mixed.num_documents == 7


def test_invalid_utf8_strict_names_offset_and_replace_counts(tok: Tokenizer, tmp_path: Path) -> None:
    kw = {"tokenizer": tok, "block_size": 2, "cache_dir": tmp_path / "c"}
    (tmp_path / "bad.txt").write_bytes(b"the cat\nsat \xff\xfe on\n")
    with pytest.raises(
        ValueError, match=r"bad.txt is not valid UTF-8 \(byte offset 12.*encoding_errors='replace'"
    ):
        TokenDataset(tmp_path / "bad.txt", **kw)
    with pytest.warns(UserWarning, match=r"Replaced 2 invalid UTF-8 sequence"):
        ds = TokenDataset(tmp_path / "bad.txt", encoding_errors="replace", **kw)
    assert ds.tokens.tolist() == concat_layout(tok, ["the cat\nsat \ufffd\ufffd on\n"])
    (tmp_path / "bad.csv").write_bytes(b"text\nok\nbad \xe9 row\n")
    with pytest.raises(ValueError, match=r"bad.csv is not valid UTF-8 \(byte offset 12"):
        TokenDataset(tmp_path / "bad.csv", **kw)
    with pytest.warns(UserWarning, match=r"Replaced 1 invalid"):
        ds = TokenDataset(tmp_path / "bad.csv", encoding_errors="replace", line_by_line=True, **kw)
    assert ds.tokens.tolist() == docs_layout(tok, ["ok", "bad \ufffd row"])


def test_cache_reuse_invalidation_save_and_load(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": line}) for line in LINES), encoding="utf-8")
    kw = {"tokenizer": tok, "cache_dir": tmp_path / "c"}
    first = TokenDataset(src, block_size=16, line_by_line=True, **kw)
    calls = count_encodes(monkeypatch)
    start = time.perf_counter()
    again = TokenDataset(src, block_size=8, line_by_line=True, validation_split=0.25, **kw)
    assert time.perf_counter() - start < 1.0  # no re-encoding for a new block_size / split
    assert calls == [] and again.cache_entry == first.cache_entry
    TokenDataset(src, block_size=8, **kw)  # concatenated mode: other tokens
    assert calls == [1]
    TokenDataset(src, block_size=8, line_by_line=True, encoding_errors="replace", **kw)
    assert calls == [1, 1]
    src.write_text(json.dumps({"text": "changed"}) + "\n", encoding="utf-8")
    changed = TokenDataset(src, block_size=4, line_by_line=True, **kw)
    assert calls == [1, 1, 1] and changed.tokens.tolist() == docs_layout(tok, ["changed"])

    saved = first.save_cache(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == [
        "doc_offsets.npy",
        "meta.json",
        "tokenizer.json",
        "tokens.bin",
    ]
    loaded = TokenDataset.from_cache(saved, block_size=16)  # the tokenizer saved with it
    assert loaded.tokens.tolist() == first.tokens.tolist() and loaded.line_by_line
    for key, value in first.get_batch(3, 4, seed=1).items():
        np.testing.assert_array_equal(loaded.get_batch(3, 4, seed=1)[key], value)
    with pytest.raises(FileExistsError, match="saved already exists"):
        first.save_cache(saved)
    other = Tokenizer.from_str(tok.to_str())
    other.add_tokens(["brand-new-token"])
    with pytest.raises(ValueError, match=r"saved was encoded with another tokenizer.*re-encode"):
        TokenDataset.from_cache(saved, tokenizer=other)
    with pytest.raises(FileNotFoundError, match="is not a complete token cache"):
        TokenDataset.from_cache(tmp_path / "nothing")


def test_encoding_options_are_one_object(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    from gpt2_flax.config import DataConfig

    src = tmp_path / "a.csv"
    src.write_text("body\n" + "\n".join(LINES) + "\n", encoding="utf-8")
    kw = {"tokenizer": tok, "block_size": 64, "cache_dir": tmp_path / "c"}
    loose = TokenDataset(src, text_column="body", line_by_line=True, num_proc=1, **kw)
    assert loose.encoding == EncodingOptions(line_by_line=True, text_column="body")
    # The token-changing fields key the cache exactly as the options dict before them did.
    assert loose.meta["options"] == {"line_by_line": True, "encoding_errors": "strict", "text_column": "body",
                                     "header": True}  # fmt: skip
    assert EncodingOptions(skip_bad_records=True).cache_key()["skip_bad_records"] is True
    calls = count_encodes(monkeypatch)
    data = DataConfig(text_column="body", line_by_line=True, num_proc=2)  # the flat data.* keys
    assert data.encoding == EncodingOptions(line_by_line=True, text_column="body", num_proc=2)
    same = TokenDataset(src, encoding=data.encoding, **kw)  # num_proc does not change the tokens
    assert calls == [] and same.cache_entry == loose.cache_entry and same.encoding.num_proc == 2
    assert TokenDataset.from_cache(same.cache_entry, block_size=64, tokenizer=tok).encoding == loose.encoding
    with pytest.raises(ValueError, match="Pass encoding= or the separate encoding options"):
        TokenDataset(src, encoding=data.encoding, header=False, **kw)


def test_failure_mid_encode_leaves_no_cache(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("\n".join(LINES * 5), encoding="utf-8")
    (tmp_path / "b.csv").write_text("text\nlast row\n", encoding="utf-8")
    files, cache = [tmp_path / "a.txt", tmp_path / "b.csv"], tmp_path / "c"
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 40)  # several work items, so it fails half-way
    real, seen = token_cache._encode_batch, []

    def flaky(*args):
        seen.append(1)
        if len(seen) == 3:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(token_cache, "_encode_batch", flaky)
    with pytest.raises(OSError, match="disk full"):
        TokenDataset(files, tokenizer=tok, block_size=4, cache_dir=cache)
    assert list(cache.iterdir()) == []  # no temporary or half-written files
    monkeypatch.setattr(token_cache, "_encode_batch", real)
    calls = count_encodes(monkeypatch)
    ds = TokenDataset(files, tokenizer=tok, block_size=4, cache_dir=cache)
    assert calls == [1] and ds.tokens.tolist() == concat_layout(tok, ["\n".join(LINES * 5), "last row"])


def test_bad_inputs(tok: Tokenizer, tmp_path: Path) -> None:
    import datasets

    kw = {"tokenizer": tok, "block_size": 4, "cache_dir": tmp_path / "c"}
    with pytest.raises(FileNotFoundError, match="Glob '.*nothing-\\*.txt' matched no files"):
        TokenDataset(str(tmp_path / "nothing-*.txt"), **kw)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        TokenDataset(tmp_path / "empty.csv", **kw)
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"image.txt looks like a binary file \(NUL byte at offset 8\)"):
        TokenDataset(tmp_path / "image.txt", **kw)
    (tmp_path / "ok.txt").write_text("fine text here", encoding="utf-8")
    with pytest.raises(ValueError, match="image.txt looks like a binary"):  # checked before any encoding
        TokenDataset([tmp_path / "ok.txt", tmp_path / "image.txt"], **kw)
    (tmp_path / "cols.csv").write_text("id,body\n1,hello\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"CSV file .*cols.csv has no column 'text' \(its columns: \['id', 'body'\]\)"
    ):
        TokenDataset(tmp_path / "cols.csv", **kw)
    with pytest.raises(ValueError, match=r"cols.csv has no column 'tweet'.*pass text_column="):
        TokenDataset(tmp_path / "cols.csv", text_column="tweet", **kw)
    with pytest.raises(ValueError, match="header=False columns have no names; pass text_column=<index>"):
        TokenDataset(tmp_path / "cols.csv", header=False, text_column="body", **kw)
    (tmp_path / "header_only.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header_only.csv holds no text"):
        TokenDataset(tmp_path / "header_only.csv", **kw)
    (tmp_path / "f.jsonl").write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"JSONL file .*f.jsonl has no column 'text' \(its columns: \['content'\]\)"
    ):
        TokenDataset(tmp_path / "f.jsonl", **kw)
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text' field holds int values, not text"):
        TokenDataset(tmp_path / "n.jsonl", **kw)
    two = datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match=r"has no column 'text' \(its columns: \['a', 'b'\]\)"):
        TokenDataset(two, **kw)
    with pytest.raises(ValueError, match=r"pass one split, e.g. dataset\['train'\]"):
        TokenDataset(datasets.DatasetDict({"train": two}), **kw)
    with pytest.raises(ValueError, match="encoding_errors must be 'strict' or 'replace', got 'ignore'"):
        TokenDataset(tmp_path / "ok.txt", encoding_errors="ignore", **kw)
    with pytest.raises(ValueError, match=r"has only \d+ tokens.*use a smaller block_size or add more text"):
        TokenDataset(tmp_path / "ok.txt", **{**kw, "block_size": 512})
    with pytest.raises(ValueError, match=r"validation_split=0.9 of \d+ blocks leaves none for training"):
        TokenDataset(tmp_path / "ok.txt", validation_split=0.9, **{**kw, "block_size": 3})
    with pytest.raises(ValueError, match="not both"):
        TokenDataset(tmp_path / "ok.txt", validation_split=0.1, validation_files=tmp_path / "ok.txt", **kw)


def test_a_saved_cache_on_a_url_is_read_in_place(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    """from_cache(URL) reads tokens.bin by byte ranges (only the batch's rows) and serves the local
    memmap's batches (concatenated and line_by_line, with a validation split); save_cache(URL) uploads
    one, meta.json last; tokenizer files load by URL; a URL that is not a complete cache (no meta, cut
    tokens, not a cache) names the URL, what is wrong and the fix, and nothing is written."""
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    import gpt2_flax.data.remote as remote
    from gpt2_flax.tokenizer import load_tokenizer, tokenizer_fingerprint

    monkeypatch.setenv("GPT2_FLAX_CACHE", str(tmp_path / "home"))  # where a URL cache's packing goes
    rng = random.Random(7)
    (src := tmp_path / "a.txt").write_text("".join(rng.choice(LINES) + "\n" for _ in range(300)), "utf-8")
    fs, bucket = fsspec.filesystem("memory"), f"bkt-{uuid.uuid4().hex[:8]}"
    uploads: list[str] = []
    real_copy = token_cache.copy_file
    monkeypatch.setattr(token_cache, "copy_file", lambda a, b: uploads.append(str(b)) or real_copy(a, b))
    for lbl in (False, True):
        local = TokenDataset(src, tokenizer=tok, block_size=32, cache_dir=tmp_path / "c", line_by_line=lbl,
                             validation_split=0.1)  # fmt: skip
        saved = local.save_cache(tmp_path / f"saved-{lbl}")
        uploaded = local.save_cache(f"memory://{bucket}/up-{lbl}")
        assert uploads[-1].endswith("/meta.json")  # the commit marker goes last
        with pytest.raises(FileExistsError, match=f"up-{lbl} already exists"):
            local.save_cache(uploaded)
        for url in (_to_memory_fs(saved), uploaded, f"file://{saved}"):
            ds = TokenDataset.from_cache(url, block_size=32, validation_split=0.1)
            assert isinstance(ds.tokens, remote.RemoteTokens) and ds.line_by_line == lbl
            np.testing.assert_array_equal(np.asarray(ds.tokens), local.tokens)
            for step in (0, 1, 5, 40):  # 40: past the first epoch
                for key, value in local.get_batch(step, 8, seed=3).items():
                    np.testing.assert_array_equal(ds.get_batch(step, 8, seed=3)[key], value)
            pairs = zip(ds.validation.eval_batches(4), local.validation.eval_batches(4), strict=True)
            for got, want in pairs:
                assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert not any(".npy" in p and "pack" in p for p in fs.find(f"/{bucket}"))  # the bucket stays read-only
    assert list((tmp_path / "home" / "remote-packing").glob("*/pack1-*.rows.npy"))
    reads: list[tuple[list[int], list[int]]] = []
    real_ranges = MemoryFileSystem.cat_ranges
    spy = lambda self, p, s, e, **k: reads.append((s, e)) or real_ranges(self, p, s, e, **k)
    monkeypatch.setattr(MemoryFileSystem, "cat_ranges", spy)
    monkeypatch.setattr(remote, "MERGE_GAP", 0)  # (the file is small: every row would be one read)
    concat = TokenDataset.from_cache(f"memory://{bucket}/up-False", block_size=32)
    concat.get_batch(2, 8)
    ((starts, ends),) = reads  # one call for the batch, only its 8 windows of 33 tokens (2 bytes each)
    assert len(starts) <= 8 and sum(e - s for s, e in zip(starts, ends, strict=True)) <= 8 * 33 * 2
    # Tokenizer files by URL: the same tokenizer; a missing one names the URL.
    tok_url = f"memory://{bucket}/up-False/tokenizer.json"
    assert tokenizer_fingerprint(load_tokenizer(tokenizer_file=tok_url)) == tokenizer_fingerprint(tok)
    tok.model.save(str(tmp_path))  # vocab.json, merges.txt
    pair = {n: f"memory://{bucket}/{n}" for n in ("vocab.json", "merges.txt")}
    for name, url in pair.items():
        fs.pipe(url[len("memory:/") :], (tmp_path / name).read_bytes())
    by_url = load_tokenizer(vocab_file=pair["vocab.json"], merges_file=pair["merges.txt"])
    by_path = load_tokenizer(vocab_file=tmp_path / "vocab.json", merges_file=tmp_path / "merges.txt")
    assert tokenizer_fingerprint(by_url) == tokenizer_fingerprint(by_path)
    with pytest.raises(FileNotFoundError, match=f"Tokenizer file memory://{bucket}/no.json does not exist"):
        load_tokenizer(tokenizer_file=f"memory://{bucket}/no.json")
    with pytest.raises(FileNotFoundError, match=f"merges_file memory://{bucket}/no.txt does not exist"):
        load_tokenizer(vocab_file=pair["vocab.json"], merges_file=f"memory://{bucket}/no.txt")
    with pytest.raises(ValueError, match="Cannot read nosuch://b/t.json: Protocol not known"):
        load_tokenizer(tokenizer_file="nosuch://b/t.json")
    # `gpt2-flax encode --tokenizer-file URL --output URL` (encode_main): the same tokens, uploaded.
    opts = EncodingOptions(progress=False)
    out = f"file://{tmp_path}/e/enc"  # (file://: its folders are made)
    summary = encode_main(src, tokenizer_file=tok_url, cache_dir=tmp_path / "c", output=out, encoding=opts)
    enc = TokenDataset.from_cache(summary["saved"], block_size=32)
    np.testing.assert_array_equal(np.asarray(enc.tokens), np.asarray(concat.tokens))
    # Bad caches: each says what is wrong; nothing is written anywhere.
    up = f"/{bucket}/up-False"
    fs.pipe(f"/{bucket}/text/a.txt", b"just text")
    fs.pipe(f"/{bucket}/cut/meta.json", fs.cat(f"{up}/meta.json"))
    fs.pipe(f"/{bucket}/cut/tokens.bin", fs.cat(f"{up}/tokens.bin")[:-2])
    fs.pipe(f"/{bucket}/nometa/tokens.bin", fs.cat(f"{up}/tokens.bin"))
    fs.pipe(f"/{bucket}/badmeta/meta.json", b'{"num_tokens": 3')
    before, packing = fs.find(f"/{bucket}"), sorted((tmp_path / "home").rglob("*"))
    size = len(fs.cat(f"{up}/tokens.bin"))
    for name, why in (("text", "it has no meta.json"), ("nometa", "it has no meta.json"),
                      ("cut", f"its tokens.bin holds {size - 2} bytes, but meta.json says {size}"),
                      ("badmeta", "its meta.json cannot be read")):  # fmt: skip
        with pytest.raises(FileNotFoundError, match=f"memory://{bucket}/{name} is not a complete token cache"
                           f" .*: {why}.*Fix: write one with TokenDataset.save_cache"):  # fmt: skip
            TokenDataset.from_cache(f"memory://{bucket}/{name}")
    assert fs.find(f"/{bucket}") == before and sorted((tmp_path / "home").rglob("*")) == packing
    fs.pipe(f"{up}/tokens.bin", fs.cat(f"{up}/tokens.bin")[:40])  # replaced after the dataset opened it
    with pytest.raises(ValueError, match=f"Token file memory://{bucket}/up-False/tokens.bin is shorter"):
        concat.get_batch(3, 8)


def test_encode_main_builds_and_saves(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_text(tok.to_str(), encoding="utf-8")
    (tmp_path / "a.txt").write_text("\n".join(LINES), encoding="utf-8")
    summary = encode_main(
        tmp_path / "a.txt", tokenizer_file=tmp_path / "tok.json", cache_dir=tmp_path / "c",
        output=tmp_path / "out", encoding=EncodingOptions(line_by_line=True, progress=False),
    )  # fmt: skip
    assert summary["num_documents"] == len(LINES) and summary["num_tokens"] > 0
    assert Path(summary["cache"]).parent == tmp_path / "c" and summary["mb_per_s"] > 0
    ds = TokenDataset.from_cache(summary["saved"], block_size=8)
    assert ds.tokens.tolist() == docs_layout(tok, LINES)


def test_hub_spec_selects_config_and_split(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    import datasets

    calls: list[tuple] = []

    def load_dataset(name: str, config: str | None = None, *, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{name} {config} {split}"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    kw = {"tokenizer": tok, "block_size": 2, "cache_dir": tmp_path / "c"}
    specs = ["hub:cats", "hub:me/cats:small", "hub:me/cats@test", "hub:me/cats:small@train[:10%]"]
    TokenDataset(specs, **kw)
    assert calls == [
        ("cats", None, "train"),
        ("me/cats", "small", "train"),
        ("me/cats", None, "test"),
        ("me/cats", "small", "train[:10%]"),
    ]
    calls.clear()
    for bad in ("hub:", "hub:cats:", "hub::small", "hub:cats@", "hub:a:b:c", "hub:a@b@c", "hub:my cats"):
        with pytest.raises(ValueError, match=r"is not a Hub dataset spec: write hub:NAME, hub:NAME:CONFIG"):
            TokenDataset(["hub:cats", bad], **kw)  # every spec checked before the first download
    assert calls == []


def _to_memory_fs(folder: Path) -> str:
    """Copy a folder's files into fsspec's in-memory file system (a stand-in for a gs:// bucket)."""
    import uuid

    import fsspec

    root = f"/bucket-{uuid.uuid4().hex[:8]}/data"
    fs = fsspec.filesystem("memory")
    for path in sorted(folder.iterdir()):
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    return f"memory:/{root}"


def test_remote_files_are_read_in_place_like_local_ones(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    """gs:// and any fsspec URL take the local files' code path (sources.py / remote.py): memory:// and
    file:// stand in for a bucket. Same tokens and batches as the local folder; text files are read
    by byte ranges (one ranged read per work item, never the whole file); the tokenizer trained from
    the URL is the local one; a remote file's new version re-encodes."""
    import gpt2_flax.data.sources as sources
    from gpt2_flax.tokenizer import train_tokenizer

    rng = random.Random(5)
    data = tmp_path / "data"
    data.mkdir()
    text = "".join(rng.choice(LINES) + rng.choice(["\n", "\r\n", "\n\n"]) for _ in range(200))
    (data / "a.txt").write_text(text, encoding="utf-8")
    (data / "b.csv").write_text("id,text\n" + "".join(f'{i},"{ln}"\n' for i, ln in enumerate(LINES)))
    (data / "c.jsonl").write_text("".join(json.dumps({"text": ln, "n": 1}) + "\n" for ln in LINES))
    url = _to_memory_fs(data)
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 512)  # a.txt (~4 KB) in several work items
    kw = {"tokenizer": tok, "block_size": 8, "cache_dir": tmp_path / "c"}
    want = TokenDataset(data, **kw)
    import datasets

    real_download = datasets.DownloadManager.download

    def no_remote_download(manager: Any, files: Any) -> Any:
        assert "://" not in str(files), f"{files} fetched whole"  # remote CSV / JSONL are streamed
        return real_download(manager, files)

    monkeypatch.setattr(datasets.DownloadManager, "download", no_remote_download)
    reads: list[tuple[str, int, int]] = []
    real_read = sources.read_bytes
    monkeypatch.setattr(sources, "read_bytes", lambda p, s, e: reads.append((p, s, e)) or real_read(p, s, e))
    for remote in (url, f"{url}/*", [f"file://{data / name}" for name in ("a.txt", "b.csv", "c.jsonl")]):
        got = TokenDataset(remote, **kw)
        assert got.tokens.tolist() == want.tokens.tolist(), remote
        assert str(got.files[0]).endswith("/data/a.txt") and "://" in str(got.files[0])
        for key, value in want.get_batch(3, 4, seed=1).items():
            np.testing.assert_array_equal(got.get_batch(3, 4, seed=1)[key], value)
    ranges = [(s, e) for p, s, e in reads if p == f"{url}/a.txt"]
    size = len(text.encode("utf-8"))
    assert len(ranges) > 3 and all(e - s < size for s, e in ranges)  # ranged reads, not the file
    assert sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == size
    calls = count_encodes(monkeypatch)
    TokenDataset(url, **kw)
    assert calls == []  # the URL's version is unchanged: the cache is reused
    import fsspec

    fsspec.filesystem("memory").pipe(url[len("memory:/") :] + "/a.txt", b"a new version of it\n")
    assert TokenDataset(f"{url}/a.txt", **kw).tokens.tolist() == concat_layout(tok, ["a new version of it\n"])
    local = train_tokenizer(data / "c.jsonl", vocab_size=300, save_path=tmp_path / "t1")
    remote_tok = train_tokenizer(f"{url}/c.jsonl", vocab_size=300, save_path=tmp_path / "t2")
    for mine, theirs in zip(local, remote_tok, strict=True):  # vocab.json, merges.txt
        assert Path(mine).read_text(encoding="utf-8") == Path(theirs).read_text(encoding="utf-8")


def test_bad_remote_inputs_name_the_problem_and_the_fix(tok: Tokenizer, tmp_path: Path, capsys) -> None:
    import importlib.util

    from gpt2_flax import cli

    kw = {"tokenizer": tok, "block_size": 4, "cache_dir": tmp_path / "c"}
    (tmp_path / "ok.txt").write_text("fine text here, fine text", encoding="utf-8")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "header_only.csv").write_text("text\n", encoding="utf-8")
    before = snapshot(tmp_path)
    if importlib.util.find_spec("gcsfs") is None:  # (installed with the [tpu] extra)
        with pytest.raises(ValueError, match=r"Cannot read gs://bkt/a.txt: .*gcsfs.*pip install gcsfs"):
            TokenDataset("gs://bkt/a.txt", **kw)
    with pytest.raises(ValueError, match="Cannot read nosuch://bkt/a.txt: Protocol not known"):
        TokenDataset("nosuch://bkt/a.txt", **kw)
    with pytest.raises(FileNotFoundError, match="Input file memory://no-bucket/a.txt does not exist"):
        TokenDataset("memory://no-bucket/a.txt", **kw)
    with pytest.raises(FileNotFoundError, match="Glob 'memory://no-bucket/\\*.txt' matched no files"):
        TokenDataset("memory://no-bucket/*.txt", **kw)
    with pytest.raises(
        ValueError,
        match="is a URL, but the token cache that encoding builds.*keep data.cache_dir local.*"
        "--output memory://bkt/cache.*--data.from_cache=memory://bkt/cache",
    ):
        TokenDataset(tmp_path / "ok.txt", **{**kw, "cache_dir": "memory://bkt/cache"})
    with pytest.raises(FileNotFoundError, match="memory://bkt/saved is not a complete .*no meta.json"):
        TokenDataset.from_cache("memory://bkt/saved")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="header_only.csv holds no text"):  # (checked while encoding)
        TokenDataset(_to_memory_fs(tmp_path / "rows") + "/header_only.csv", **kw)
    # The CLI: exit 2, the message, and no run folder.
    argv = ["train", "--config", str(Path(__file__).parent.parent / "configs/tiny.yaml"), "--no-progress"]
    argv += ["--data", "memory://no-bucket/a.txt", "--output-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "memory://no-bucket/a.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before  # the user's files, byte for byte, and nothing added
