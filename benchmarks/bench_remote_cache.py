"""A token cache read in place from a URL (remote.RemoteTokens) against the local memmap, one run.

    python benchmarks/bench_remote_cache.py                      # 100 MB of tokens, 3000 batches each
    python benchmarks/bench_remote_cache.py --mb 20 --batches 1000

The same random uint16 token file is served as training batches (8 x 1024, concatenated rows, and
line_by_line rows over 500-token documents) through the dataset's own row classes, its tokens
either memory-mapped or read through fsspec from a file:// URL (and a memory:// one: fsspec's
in-process store, no I/O at all). Both read the page cache here, so the gap is the per-batch cost of
the ranged-read path itself (one fs.cat_ranges per batch, one read per row); an object store adds
its round trips on top. The modes alternate in rounds, so a slow spell on the 2 cores lands on all.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="token file size")
    p.add_argument("--batches", type=int, default=3000, help="batches per mode and layout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import fsspec

    from gpt2_flax.data.packing import DocumentRows
    from gpt2_flax.data.remote import RemoteTokens
    from gpt2_flax.data.rows import PackedRows

    n = args.mb * (1 << 20) // 2
    tokens = np.random.default_rng(0).integers(0, 5000, n, dtype=np.uint16)
    offsets = np.arange(0, n + 1, 500, dtype=np.int64)  # 500-token documents
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        tokens.tofile(path)
        mem = f"/bench-{uuid.uuid4().hex[:8]}/tokens.bin"
        fsspec.filesystem("memory").pipe(mem, tokens.tobytes())
        sources = {
            "memmap": np.memmap(path, np.uint16, mode="r"),
            "file://": RemoteTokens(f"file://{path}", np.uint16, n),
            "memory://": RemoteTokens(f"memory:/{mem}", np.uint16, n),
        }
        layouts = {
            "concatenated": lambda t: PackedRows(t, args.block_size),
            "line_by_line": lambda t: DocumentRows(t, offsets, args.block_size, warn=False),
        }
        for layout, make in layouts.items():
            rows = {mode: make(t) for mode, t in sources.items()}
            first = {mode: r.get_batch(7, args.batch_size, seed=1) for mode, r in rows.items()}
            for mode in rows:  # the same batches, whichever way the tokens are read
                assert all((first[mode][k] == first["memmap"][k]).all() for k in first["memmap"])
            seconds = {mode: 0.0 for mode in rows}
            per_round = -(-args.batches // args.rounds)
            for r in range(args.rounds):
                for mode, source in rows.items():
                    start = time.perf_counter()
                    for step in range(r * per_round, (r + 1) * per_round):
                        source.get_batch(step, args.batch_size, seed=0)
                    seconds[mode] += time.perf_counter() - start
            total = per_round * args.rounds
            for mode, s in seconds.items():
                rate = total / s
                toks = rate * args.batch_size * args.block_size
                print(
                    f"{layout:13s} {mode:10s} {total} batches in {s:6.2f} s: {rate:8.1f} batches/s, "
                    f"{toks / 1e6:6.2f} M tokens/s, {s / total * 1e3:.3f} ms/batch, "
                    f"{seconds['memmap'] / s:.2f}x the memmap's rate"
                )


if __name__ == "__main__":
    main()
