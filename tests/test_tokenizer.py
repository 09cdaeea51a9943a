"""Tokenizer training, both load routes, and agreement with `transformers` (all offline, tiny corpus)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import transformers

from gpt2_flax.data import EncodingOptions
from gpt2_flax.data.sources import resolve_files
from gpt2_flax.tokenizer import (
    EOS,
    eos_token_id,
    load_tokenizer,
    save_transformers_tokenizer,
    to_transformers,
    tokenizer_fingerprint,
    train_tokenizer,
)

WORDS = "the cat sat on a mat; don't stop — héllo naïve café 日本語 🙂 123 4.5 (x) it's".split()
# Unicode, emoji, newlines, CRLF, lone CR, tabs, leading/trailing spaces, blank lines, unseen bytes.
VARIED = "  Leading spaces\r\nCRLF line\rlone CR\n\n\tindented 🙂 日本語\n  trailing   \nΩмир\x00\x7f end"


def make_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok")
    corpus = make_corpus(root / "corpus.txt")
    vocab, merges = train_tokenizer(corpus, vocab_size=400, save_path=root / "out", prefix="tiny")
    return {"vocab": vocab, "merges": merges, "json": str(root / "out" / "tiny.tokenizer.json")}


def test_train_writes_all_files_with_eos_first(trained: dict[str, str]) -> None:
    assert trained["vocab"].endswith("tiny-vocab.json") and trained["merges"].endswith("tiny-merges.txt")
    vocab = json.loads(Path(trained["vocab"]).read_text(encoding="utf-8"))
    assert vocab[EOS] == 0
    assert 257 < len(vocab) <= 400
    tok = load_tokenizer(tokenizer_file=trained["json"])
    assert tok.encode(EOS).ids == [0]
    assert eos_token_id(tok) == 0
    ids = tok.encode(f"a cat{EOS}the mat").ids
    assert ids.count(0) == 1


def test_load_routes_and_transformers_encode_identically(trained: dict[str, str], tmp_path: Path) -> None:
    from_json = load_tokenizer(tokenizer_file=trained["json"])
    from_pair = load_tokenizer(vocab_file=trained["vocab"], merges_file=trained["merges"])
    # The seed page's call: GPT2TokenizerFast(vocab_file, merges_file), positionally. (In
    # transformers v5 the keyword form vocab_file=... builds an empty vocabulary; from_pretrained on
    # a folder with GPT-2's file names works in v4 and v5.)
    hf_positional = transformers.GPT2TokenizerFast(trained["vocab"], trained["merges"])
    shutil.copy(trained["vocab"], tmp_path / "vocab.json")
    shutil.copy(trained["merges"], tmp_path / "merges.txt")
    hf_pair = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    hf_json = transformers.PreTrainedTokenizerFast(tokenizer_file=trained["json"])
    for text in (VARIED, f"one{EOS}two", " ", "\n\n \n"):
        expected = from_json.encode(text).ids
        assert from_pair.encode(text).ids == expected
        assert hf_positional(text)["input_ids"] == expected
        assert hf_pair(text)["input_ids"] == expected
        assert hf_json(text)["input_ids"] == expected
    assert tokenizer_fingerprint(from_json) == tokenizer_fingerprint(from_pair)


def test_decode_round_trips_any_text(trained: dict[str, str]) -> None:
    tok = load_tokenizer(tokenizer_file=trained["json"])
    assert tok.decode(tok.encode(VARIED).ids) == VARIED
    every_byte_char = "".join(chr(i) for i in range(1, 256)) + "\U0001f600 \u2028 \ufeff"
    assert tok.decode(tok.encode(every_byte_char).ids) == every_byte_char
    with_eos = f"doc one{EOS}doc two"
    assert tok.decode(tok.encode(with_eos).ids, skip_special_tokens=False) == with_eos


def test_to_transformers_save_pretrained_reloads_offline(trained: dict[str, str], tmp_path: Path) -> None:
    tok = load_tokenizer(tokenizer_file=trained["json"])
    hf = to_transformers(tok, model_max_length=64)
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == (EOS, EOS, EOS, None)
    assert hf.eos_token_id == 0 and hf.model_max_length == 64
    written = save_transformers_tokenizer(tok, tmp_path / "export", model_max_length=64)
    names = {Path(p).name for p in written}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= names
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert reloaded.eos_token_id == 0 and reloaded.model_max_length == 64 and reloaded.pad_token is None
    # <|endoftext|> first, as every training document (and GPT2.generate's prompt) starts.
    assert reloaded(VARIED)["input_ids"] == [0, *tok.encode(VARIED).ids]
    assert reloaded.decode(reloaded(VARIED)["input_ids"], skip_special_tokens=True) == VARIED
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    # The plain save_pretrained route (what export may call directly) loads the same way.
    hf.save_pretrained(str(tmp_path / "plain"))
    plain = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    assert plain(VARIED)["input_ids"] == [0, *tok.encode(VARIED).ids]
    # ... and loading the exported tokenizer.json back into gpt2_flax drops that template again.
    back = load_tokenizer(tokenizer_file=tmp_path / "export" / "tokenizer.json")
    assert back.encode(VARIED).ids == tok.encode(VARIED).ids
    assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)


def test_fingerprint_changes_with_tokenizer(trained: dict[str, str], tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.txt")
    other_vocab, other_merges = train_tokenizer(corpus, vocab_size=300, save_path=tmp_path, prefix="small")
    tok = load_tokenizer(tokenizer_file=trained["json"])
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer(other_vocab, other_merges))
    assert len(tokenizer_fingerprint(tok)) == 64
    tok.enable_truncation(max_length=8)  # a per-call setting: same tokenizer, same fingerprint
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(tokenizer_file=trained["json"]))


def test_train_accepts_folder_glob_and_list(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    b, a = make_corpus(folder / "b.txt", 50, seed=1), make_corpus(folder / "a.txt", 50, seed=2)
    (folder / ".hidden").write_text("ignored", encoding="utf-8")
    assert resolve_files(folder) == [a, b]
    assert resolve_files(str(folder / "*.txt")) == [a, b]
    assert resolve_files([b, a]) == [b, a]
    out = tmp_path / "new" / "dir"  # created on demand
    for i, files in enumerate((folder, str(folder / "*.txt"), [a, b])):
        vocab, _ = train_tokenizer(files, vocab_size=300, save_path=out, prefix=f"t{i}")
        assert Path(vocab).is_file()


def test_train_errors(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "ok.txt", 20)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        train_tokenizer(tmp_path / "missing.txt", save_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        train_tokenizer(str(tmp_path / "*.nothing"), save_path=tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        train_tokenizer([corpus, tmp_path / "empty.txt"], save_path=tmp_path)
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        train_tokenizer(corpus, vocab_size=257, save_path=tmp_path)
    (tmp_path / "void").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no files"):
        train_tokenizer(tmp_path / "void", save_path=tmp_path)
    with pytest.raises(ValueError, match="No input files"):
        train_tokenizer([], save_path=tmp_path)


def test_load_errors_and_missing_eos(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No tokenizer given"):
        load_tokenizer()
    with pytest.raises(ValueError, match="No tokenizer given"):
        load_tokenizer(vocab_file=tmp_path / "v.json")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_tokenizer(tokenizer_file=tmp_path / "nope.json")
    (tmp_path / "v.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="merges_file .*m.txt does not exist"):
        load_tokenizer(vocab_file=tmp_path / "v.json", merges_file=tmp_path / "m.txt")
    corpus = make_corpus(tmp_path / "c.txt", 50)
    vocab, merges = train_tokenizer(corpus, vocab_size=300, save_path=tmp_path, special_tokens=())
    no_eos = load_tokenizer(vocab, merges)
    with pytest.raises(ValueError, match="has no '<\\|endoftext\\|>' token"):
        eos_token_id(no_eos)
    with pytest.raises(ValueError, match="has no"):
        to_transformers(no_eos, 64)


# ----------------------------------------------------------------------------- the sources the dataset reads

TEXT_WORDS = "the cat sat on a mat and then ran".split()  # no z, y, x, quotes, braces or colons


def merged_tokens(vocab_file: str) -> set[str]:
    """The tokens BPE merged (the byte symbols and special tokens left out)."""
    return {t for t in json.loads(Path(vocab_file).read_text(encoding="utf-8")) if len(t) > 1 and t != EOS}


def test_csv_and_jsonl_train_on_the_text_column_only(tmp_path: Path) -> None:
    import csv

    rng = random.Random(5)
    texts = [" ".join(rng.choice(TEXT_WORDS) for _ in range(8)) for _ in range(200)]
    texts[3] = "multi\r\nline the cat"  # CRLF inside a quoted field: LF, as the dataset reads it
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [["id", "text", "note"], *([i, t, "zzyzx zzyzx"] for i, t in enumerate(texts))]
        )
    lines = [json.dumps({"body": t, "note": "zzyzx"}) for t in texts]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    kw = {"vocab_size": 400, "save_path": tmp_path / "out"}
    from_csv = train_tokenizer(tmp_path / "a.csv", prefix="csv", **kw)[0]
    from_jsonl = train_tokenizer(tmp_path / "a.jsonl", text_column="body", prefix="jsonl", **kw)[0]
    normal = [t.replace("\r\n", "\n") for t in texts]
    from_texts = train_tokenizer(texts=normal, prefix="texts", **kw)[0]
    # Exactly the texts the dataset encodes: the same merges as training on the column's values.
    assert merged_tokens(from_csv) == merged_tokens(from_jsonl) == merged_tokens(from_texts)
    tokens = merged_tokens(from_csv)
    assert {"Ġcat", "Ġmat", "Ġthen"} <= tokens
    assert not [t for t in tokens if set(t) & set('zyx"{}:,\r') or "note" in t or "body" in t]
    # The raw bytes (what training read before) give exactly those tokens: the check can fail.
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "raw.txt")
    raw = merged_tokens(train_tokenizer(tmp_path / "raw.txt", prefix="raw", **kw)[0])
    assert {"zz", 'Ġ"', "body"} & raw and [t for t in raw if "zzyzx" in t]


def test_text_files_train_like_whole_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2_flax.tokenizer as tokenizer_module

    rng = random.Random(7)
    seps = ["\n", "\r\n", "\r", "\n\n", " \n", "\n  ", "\n\t"]
    text = "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(3000))
    (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
    normal = text.replace("\r\n", "\n").replace("\r", "\n")
    kw = {"vocab_size": 400, "save_path": tmp_path}
    whole = Path(train_tokenizer(texts=[normal], prefix="whole", **kw)[1]).read_text(encoding="utf-8")
    monkeypatch.setattr(tokenizer_module, "TRAIN_CHUNK", 50)  # many ranges, cut where the dataset cuts
    ranges = Path(train_tokenizer(tmp_path / "t.txt", prefix="ranges", **kw)[1]).read_text(encoding="utf-8")
    assert ranges == whole
    lines = [line for line in normal.split("\n") if line.strip()]
    by_line = train_tokenizer(tmp_path / "t.txt", line_by_line=True, prefix="lbl", **kw)[1]
    as_list = train_tokenizer(texts=lines, prefix="list", **kw)[1]
    assert Path(by_line).read_text(encoding="utf-8") == Path(as_list).read_text(encoding="utf-8")


def test_bad_records_and_options_fail_before_anything_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    kw = {"vocab_size": 300, "save_path": out}
    (tmp_path / "bad.csv").write_text("text\nthe cat\nthe, mat, sat\nran\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"bad.csv, line 3: 3 fields where the header has 1.*skip_bad_records=True"
    ):
        train_tokenizer(tmp_path / "bad.csv", **kw)
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"txt": "mat"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no 'text' field"):
        train_tokenizer(tmp_path / "bad.jsonl", **kw)
    with pytest.raises(ValueError, match=r"has no column 'body'.*pass text_column="):
        train_tokenizer(tmp_path / "bad.csv", text_column="body", **kw)
    with pytest.raises(ValueError, match=r"texts holds no text"):
        train_tokenizer(texts=["  ", "\r\n"], **kw)
    with pytest.raises(ValueError, match="Pass encoding= or the separate encoding options"):
        train_tokenizer(tmp_path / "bad.csv", encoding=EncodingOptions(), line_by_line=True, **kw)
    with pytest.raises(ValueError, match="No training text given"):
        train_tokenizer(**kw)
    (tmp_path / "latin1.csv").write_bytes(b"text\nthe cat\ncaf\xe9 mat\n")
    with pytest.raises(ValueError, match=r"latin1.csv is not valid UTF-8 \(byte offset 16.*'replace'"):
        train_tokenizer(tmp_path / "latin1.csv", **kw)
    assert not out.exists()
    with pytest.warns(UserWarning, match=r"Replaced 1 invalid UTF-8 sequence"):
        train_tokenizer(
            tmp_path / "latin1.csv", encoding_errors="replace", **{**kw, "save_path": tmp_path / "r"}
        )
    train_tokenizer(tmp_path / "bad.csv", skip_bad_records=True, **kw)
    assert "skipped 1 bad record(s)" in capsys.readouterr().out and (out / "gpt2_flax-vocab.json").is_file()


def test_hub_source_trains_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []

    def load_dataset(name: str, config: str | None = None, *, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["the cat sat", "on a mat"] * 50, "n": list(range(100))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from gpt2_flax import cli

    args = ["train-tokenizer", "hub:me/cats:small@validation", "--vocab-size", "300", "--save-path"]
    assert cli.main([*args, str(tmp_path)]) == 0
    assert calls == [("me/cats", "small", "validation")]
    assert "Ġcat" in merged_tokens(str(tmp_path / "gpt2_flax-vocab.json"))
