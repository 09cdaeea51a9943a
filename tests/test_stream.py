"""Streaming corpora (issue 15, items 4 and 5): a datasets.IterableDataset encoded on the fly gives the
cached path's tokens, trains and resumes bitwise, splits over processes, mixes by weight, and refuses
what cannot work with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import RESUME_TRAIN, snapshot
from safetensors.numpy import load_file

from gpt2_flax import GPT2, StreamingDataset, TokenDataset, load_tokenizer, merge_datasets, train_tokenizer
from gpt2_flax.cli import main as cli_main
from gpt2_flax.data import cache, stream
from gpt2_flax.data.rows import mix_choice
from gpt2_flax.errors import DataError
from gpt2_flax.tokenizer import tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


@pytest.fixture(scope="module")
def docs(corpus_file: Path) -> list[str]:
    lines = corpus_file.read_text(encoding="utf-8").splitlines()
    return ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]  # 150 documents


@pytest.fixture(scope="module")
def tok(tokenizer_files):
    return load_tokenizer(*tokenizer_files)


def _stream(docs: list[str], shards: int = 3, column: str = "text") -> datasets.IterableDataset:
    return datasets.Dataset.from_dict({column: docs}).to_iterable_dataset(num_shards=shards)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("line_by_line", [False, True], ids=["concatenated", "line_by_line"])
def test_streamed_rows_are_the_cached_rows(docs, tok, tmp_path, monkeypatch, line_by_line) -> None:
    # In stream order the rows are the cached path's rows 0, 1, 2, ... (which it then visits in a seeded
    # order). line_by_line: the same best-fit packing when one window holds the whole corpus.
    monkeypatch.setattr(stream, "WINDOW_ROWS", 10_000)
    if not line_by_line:  # documents of ~200 characters: cut into pieces, encoded in groups of ~100
        monkeypatch.setattr(cache, "CHUNK_CHARS", 100)
    kw = dict(tokenizer=tok, block_size=BLOCK, line_by_line=line_by_line)
    cached = TokenDataset(datasets.Dataset.from_dict({"text": docs}), cache_dir=tmp_path, **kw)
    streamed = StreamingDataset(_stream(docs), **kw)
    n = cached.num_blocks
    first = next(streamed.iter_batches(n, num_steps=1))
    assert _same(first, cached.rows._gather(np.arange(n)))
    # The next epoch: line_by_line packs it afresh (the same rows again, no shuffle buffer); the
    # concatenated token stream goes on across the epoch boundary, so its rows shift.
    again = next(streamed.iter_batches(n, start_step=1, num_steps=1))
    assert _same(again, first) is line_by_line


def test_stream_resumes_bitwise_from_the_step(docs, tok, tiny_config, tmp_path) -> None:
    """GPT2.train on a bare IterableDataset, stopped at step 5 and resumed by a new GPT2 object, ends
    bit-identical to the straight run: the deterministic skip re-reads exactly the rows the first part
    trained on. (test_checkpoint's settings: the session's compilation cache already holds the step.)"""
    train = dict(RESUME_TRAIN, progress=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    GPT2(tokenizer=tok, config=tiny_config, seed=0).train(_stream(docs), output_dir=straight, **train)
    ai = GPT2(tokenizer=tok, config=tiny_config, seed=0)
    ai.train(_stream(docs), output_dir=resumed, stop_at_step=5, **train)
    assert ai.stopped_early
    GPT2(tokenizer=tok, config=tiny_config, seed=1).train(_stream(docs), output_dir=resumed, **train)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    losses = [
        [json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (straight, resumed)
    ]
    assert losses[0] == losses[1]
    run = json.loads((straight / "run.json").read_text())
    assert run["config"]["data"]["streaming"] is True
    assert run["data"]["streamed"] is True and run["data"]["stream_processes"] == 1


def test_shuffled_stream_and_resume_skip(docs, tok) -> None:
    ds = StreamingDataset(_stream(docs), tokenizer=tok, block_size=BLOCK, shuffle_buffer=40)
    full = list(ds.iter_batches(8, seed=3, num_steps=30))  # ~1.5 epochs: set_epoch reshuffles
    assert all(_same(a, b) for a, b in zip(full, ds.iter_batches(8, seed=3, num_steps=30), strict=True))
    tail = list(ds.iter_batches(8, seed=3, start_step=25, num_steps=5, prefetch=2))
    assert all(_same(a, b) for a, b in zip(full[25:], tail, strict=True))
    other = next(ds.iter_batches(8, seed=4))
    assert not _same(other, full[0])


def test_processes_get_disjoint_parts(docs, tok, monkeypatch) -> None:
    """Process p of 2 reads its own text, together all of it, each piece once: whole shards when the
    shard count divides by 2 (split_dataset_by_node), else every other piece, so that even a single
    long document (one big text file, the seed page's input.txt) splits evenly."""

    def texts(ds, p, n=2):
        part, deal = ds._part(0, p, n, shuffle=False)
        return [t for group, _ in ds._texts(part, deal) for t in group]

    for shards in (4, 3):
        ds = StreamingDataset(_stream(docs, shards), tokenizer=tok, block_size=BLOCK)
        parts = [texts(ds, p) for p in range(2)]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(docs)
        if shards == 3:
            assert parts[0] == docs[0::2] and parts[1] == docs[1::2]
        b0, b1 = (next(ds.iter_batches(16, process_index=p, process_count=2)) for p in range(2))
        assert b0["input_ids"].shape == b1["input_ids"].shape == (8, BLOCK) and not _same(b0, b1)
    monkeypatch.setattr(cache, "CHUNK_CHARS", 1000)
    book = "\n".join(docs)  # one document of ~30 pieces
    ds = StreamingDataset(_stream([book], 1), tokenizer=tok, block_size=BLOCK)
    whole, parts = texts(ds, 0, 1), [texts(ds, p) for p in range(2)]
    assert len(whole) > 20 and parts == [whole[0::2], whole[1::2]]
    b0, b1 = (next(ds.iter_batches(16, process_index=p, process_count=2)) for p in range(2))
    assert not _same(b0, b1)
    # Fewer pieces than processes: the error says why, and the way out.
    ds = StreamingDataset(_stream([docs[0]], 1), tokenizer=tok, block_size=4)
    with pytest.raises(DataError, match=r"for process 1 of 2: .*dealt to the processes in turn.*drop data"):
        next(ds.iter_batches(2, process_index=1, process_count=2))


def test_stream_mixture_is_deterministic_and_follows_the_weights(docs, tok, dataset) -> None:
    # A stream of the even documents, one of the odd ones, and the cached corpus, weighted 2 : 1 : 1.
    kw = dict(tokenizer=tok, block_size=BLOCK)
    even, odd = StreamingDataset(_stream(docs[0::2]), **kw), StreamingDataset(_stream(docs[1::2]), **kw)
    mix = merge_datasets([even, odd, dataset], weights=[2, 1, 1])
    steps = 40
    got = list(mix.iter_batches(16, seed=5, num_steps=steps))
    assert all(_same(a, b) for a, b in zip(got, mix.iter_batches(16, seed=5, num_steps=steps), strict=True))
    # Row r of batch s is the next row of the part mix_choice drew (the cached part: its sample s*16+r).
    readers = [even.reader(5, 0, 1), odd.reader(5, 0, 1)]
    counts = np.zeros(3)
    for s, batch in enumerate(got):
        for r, k in enumerate(mix_choice(5, s, 16, mix.weights)):
            counts[k] += 1
            if k < 2:
                want = readers[k].take(1)["input_ids"][0]
            else:
                want = dataset.rows._gather(dataset.rows.rows_for(np.array([s * 16 + r]), 5))["input_ids"][0]
            assert np.array_equal(batch["input_ids"][r], want)
    assert np.allclose(counts / counts.sum(), [0.5, 0.25, 0.25], atol=0.05)  # 640 rows
    tail = list(mix.iter_batches(16, seed=5, start_step=30, num_steps=10))  # resume: skip per part
    assert all(_same(a, b) for a, b in zip(got[30:], tail, strict=True))
    with pytest.raises(DataError, match="weights= or equalize=True"):
        merge_datasets([even, odd])


def test_stream_refusals_name_the_fix(docs, tok, tmp_path) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="StreamingDataset"):
        TokenDataset(_stream(docs), tokenizer=tok, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="tokenizer up front"):
        StreamingDataset(_stream(docs))
    with pytest.raises(DataError, match="no column 'body'"):
        StreamingDataset(_stream(docs), tokenizer=tok, text_column="body")
    with pytest.raises(DataError, match="not a Dataset"):
        StreamingDataset(datasets.Dataset.from_dict({"text": docs}), tokenizer=tok)
    with pytest.raises(DataError, match="eval_batches"):
        StreamingDataset(_stream(docs), tokenizer=tok).eval_batches(8, None, 0, 2)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--data.validation_split=0.1", "validation_split"),
        ("--data.num_proc=2", "num_proc"),
        ("--data.from_cache=x", "from_cache"),
    ],
)
def test_cli_refuses_streaming_options_that_cannot_work(tmp_path, capsys, option, message) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    args = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", "hub:nosuch/dataset"]
    before = snapshot(tmp_path)
    assert cli_main([*args, "--data.streaming=true", option, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"data.streaming=true cannot be used with data.{message}" in err
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]
    assert snapshot(tmp_path) == before


def test_cli_streams_local_jsonl_with_a_tokenizer_from_its_prefix(docs, tmp_path, monkeypatch) -> None:
    """`gpt2-flax train --data x.jsonl --data.streaming=true` without a tokenizer trains one on the
    stream's text column (not the JSON around it) and streams the column; stopped before training."""
    from gpt2_flax import api

    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": "zzyzx qqq", "body": d}) + "\n")
    seen = []

    class Stop(Exception):
        pass

    real = api._stream_dataset

    def stream_dataset(*args):
        seen.append(real(*args))
        raise Stop

    monkeypatch.setattr(api, "_stream_dataset", stream_dataset)
    args = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", str(tmp_path / "d.jsonl")]
    with pytest.raises(Stop):
        cli_main(
            [*args, "--data.streaming=true", "--data.text_column=body", "--output-dir", str(tmp_path / "run")]
        )
    ds = seen[0]
    assert isinstance(ds, StreamingDataset) and ds.column == "text"
    vocab = set(ds.tokenizer.get_vocab())
    assert "Ġthe" in vocab and not [t for t in vocab if "zz" in t or "qq" in t or "body" in t]
    # The tokenizer train_tokenizer gives on the column's texts with tiny.yaml's sizes.
    v, m = train_tokenizer(texts=docs, vocab_size=400, min_frequency=1, save_path=tmp_path / "tok")
    assert tokenizer_fingerprint(ds.tokenizer) == tokenizer_fingerprint(load_tokenizer(v, m))
    batch = next(ds.iter_batches(8))
    assert batch["input_ids"].shape == (8, ds.block_size)
    assert not (tmp_path / "run").exists()


def test_hub_spec_streams_its_split(docs, monkeypatch) -> None:
    """hub:NAME:CONFIG@SPLIT with streaming is datasets.load_dataset(..., streaming=True) (offline:
    load_dataset replaced), its text column renamed to "text"."""
    from gpt2_flax.data.encoding import EncodingOptions
    from gpt2_flax.data.stream_sources import open_streams

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return _stream(docs, column="body")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ds = open_streams(["hub:org/corpus:en@validation"], EncodingOptions(text_column="body"))
    assert calls == [(("org/corpus", "en"), {"split": "validation", "streaming": True})]
    assert ds.column_names == ["text"] and [r["text"] for r in ds] == docs


def test_a_streamed_run_resumes_on_its_own_process_count() -> None:
    """run.json records how many processes streamed (each reads its own part); a resume on another
    count would train on other rows, so the refusal says so."""
    from gpt2_flax.run_dir import _describe

    old = {"files": ["s"], "streamed": True, "stream_processes": 2}
    new = {**old, "stream_processes": 1}
    assert "streamed by 2 -> 1 processes" in _describe("data", old, new)
    assert _describe("data", {"files": ["s"]}, new) == "cached -> streamed"
