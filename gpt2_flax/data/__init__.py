"""Token datasets: encode text once into a cached token file, then serve training batches from it.

The modules, in the order text flows through them:

    sources.py   reading inputs: file globbing, text files / lists / datasets, text hygiene
    records.py   CSV / JSONL / Parquet inputs: the text column, record checks, loading the rows
    remote.py    inputs and saved token caches by URL (gs://, any fsspec protocol): read by byte ranges
    encoding.py  EncodingOptions (every encoding setting in one frozen object), the `datasets.map`
                 encoders that turn sources into token ids, and the same texts streamed for
                 train_tokenizer (iter_texts)
    cache.py     the token cache: one token file on disk (memory-mapped), keyed by what changes tokens
    multihost.py one tokenizer and one token cache per slice in a multi-process (jax.distributed) run
    rows.py      training rows and batches, a pure function of (seed, step, process index); prefetch
    packing.py   line_by_line rows: whole documents best-fit into rows of block_size tokens
    dataset.py   TokenDataset and merge_datasets, the datasets users build
    stream.py    StreamingDataset: a datasets.IterableDataset encoded on the fly, no cache
    stream_mix.py  merge_datasets with streams: the same seeded row draws as the cached mixture
    corpus.py    the offline demo corpus (standard-library docstrings)

DataConfig.encoding turns the flat data.* keys into an EncodingOptions; TokenDataset(encoding=...),
the cache and `gpt2-flax encode` take it, and its token-changing fields key the cache.

Only the public names below are exported here; everything else is imported from its module. Names
are imported on first use, so `gpt2_flax.tokenizer` can import `gpt2_flax.data.sources` and
`gpt2_flax.data.encoding` (the sources, checks and texts the dataset reads) while cache.py and
dataset.py import the tokenizer.
"""

from __future__ import annotations

from gpt2_flax import _lazy_exports

_EXPORTS = {
    "TokenDataset": "gpt2_flax.data.dataset",
    "merge_datasets": "gpt2_flax.data.dataset",
    "StreamingDataset": "gpt2_flax.data.stream",
    "EncodingOptions": "gpt2_flax.data.encoding",
    "encode_main": "gpt2_flax.data.cache",
    "local_cache_dir": "gpt2_flax.data.corpus",
    "write_demo_corpus": "gpt2_flax.data.corpus",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
