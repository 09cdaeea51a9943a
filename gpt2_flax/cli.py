"""`gpt2-flax`: the command line. It parses arguments and calls library functions; nothing else.

gpt2-flax train                                   # the demo: stdlib docstrings, a few CPU minutes
gpt2-flax train --config configs/seed.yaml --data input.txt --train.num_steps=2000
gpt2-flax train-tokenizer input.txt --vocab-size 5000 --save-path tok
gpt2-flax generate --model-folder trained_model --prompt "ROMEO:" -n 3
gpt2-flax export --checkpoint trained_model --output exported
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2_flax.config import Config, ConfigError, field_docs, load_config, presets
from gpt2_flax.errors import GPT2FlaxError, cli_spelling

# The main job with no arguments: the seed page's kind of model, sized to train in a few CPU minutes
# on the offline stdlib-docstring corpus. configs/demo.yaml holds the same values (a test checks).
DEMO: dict[str, Any] = {
    "model": {"vocab_size": 2000, "n_positions": 64, "n_embd": 128, "n_layer": 4, "n_head": 4},
    "train": {
        "batch_size": 32,
        "num_steps": 800,
        "learning_rate": 2e-3,
        "log_every": 50,
        "save_every": 400,
        "output_dir": "gpt2_flax_demo",
    },
}


def _override_help() -> str:
    """Every config key by section, with its default and its description (the config's comments)."""
    lines = ["config keys (YAML sections, or dotted overrides such as --train.learning_rate=3e-4):"]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        default, docs = cls(), field_docs(cls)
        lines.append(f"\n {section.name}:")
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section.name}.{f.name}={getattr(default, f.name)!r}")
            lines += [f"      {line}" for line in textwrap.wrap(docs.get(f.name, ""), 90)]
    return "\n".join(lines)


def split_overrides(extra: Sequence[str]) -> list[str]:
    """['--train.lr=1', '--mesh.data', '2'] -> ['train.lr=1', 'mesh.data=2']; anything else is an error."""
    out: list[str] = []
    items = list(extra)
    while items:
        item = items.pop(0)
        key = item.removeprefix("--")
        if not item.startswith("--") or "." not in key.split("=")[0]:
            raise ConfigError(
                f"unrecognised argument {item!r}; config overrides look like --train.num_steps=100"
            )
        if "=" not in key:
            if not items:
                raise ConfigError(f"override {item} needs a value: {item}=VALUE")
            key = f"{key}={items.pop(0)}"
        out.append(key)
    return out


def resolve_config(args: argparse.Namespace, extra: Sequence[str]) -> Config:
    overrides = split_overrides(extra)
    if args.data:
        overrides.append(f"data.files=[{', '.join(repr(d) for d in args.data)}]")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir!r}")
    if args.config is None:
        return load_config(None, overrides, **DEMO)
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = resolve_config(args, extra)  # config errors in milliseconds: JAX is not imported yet

    from gpt2_flax.api import run_training
    from gpt2_flax.host import enable_compilation_cache
    from gpt2_flax.sharding import maybe_initialize

    enable_compilation_cache()

    maybe_initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    run_training(cfg, overwrite=args.overwrite, progress=not args.no_progress, samples=args.samples)
    return 0


def _encoding_options(args: argparse.Namespace, **runtime: Any) -> Any:
    """The EncodingOptions of the flags `_add_encoding_args` adds (train-tokenizer and encode read the
    same text, so they share these), plus `runtime` settings (num_proc, progress)."""
    from gpt2_flax.data import EncodingOptions

    column = int(args.text_column) if args.text_column and args.text_column.isdigit() else args.text_column
    return EncodingOptions(
        line_by_line=args.line_by_line,
        text_column=column,
        header=not args.no_header,
        encoding_errors=args.encoding_errors,
        skip_bad_records=args.skip_bad_records,
        **runtime,
    )


def cmd_train_tokenizer(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.tokenizer import train_tokenizer

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    vocab, merges = train_tokenizer(
        args.files,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        save_path=args.save_path,
        prefix=args.prefix,
        show_progress=True,
        encoding=_encoding_options(args),
    )
    print(f"wrote {vocab}\nwrote {merges}\nwrote {Path(args.save_path) / (args.prefix + '.tokenizer.json')}")
    return 0


def cmd_encode(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.data import encode_main

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    encoding = _encoding_options(args, num_proc=args.num_proc, progress=not args.no_progress)
    summary = encode_main(
        args.files,
        tokenizer_file=args.tokenizer_file,
        vocab_file=args.vocab_file,
        merges_file=args.merges_file,
        cache_dir=args.cache_dir,
        output=args.output,
        encoding=encoding,
    )
    print(json.dumps(summary, default=str, indent=2))
    if args.output:
        print(f"train on it with: gpt2-flax train --data.from_cache={args.output} ...")
    return 0


def cmd_generate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.api import GPT2
    from gpt2_flax.host import enable_compilation_cache
    from gpt2_flax.sampling import GenerateArgs

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    enable_compilation_cache()
    prompts: str | list[str] = args.prompt
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path} does not exist")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompt-file {path} holds no prompt (one prompt per non-empty line)")
    # Digits are token ids; "\\n"-style escapes are decoded, other characters kept as typed.
    unescape = lambda s: s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    stops = [int(s) if s.isdigit() else unescape(s) for s in args.stop or []]
    kwargs = dict(
        n=args.n,
        prompt=prompts,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        min_length=args.min_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        stop=stops or None,
        seed=args.seed,
        prepend_bos=not args.no_bos,
    )
    ai = GPT2(model_folder=args.model_folder)
    if args.to_file:
        kwargs.pop("n")
        path = ai.generate_to_file(
            n=args.n, batch_size=args.batch_size or 1, destination_path=args.to_file, **kwargs
        )
        print(f"wrote {args.n * (len(prompts) if isinstance(prompts, list) else 1)} samples to {path}")
        return 0
    batches = ai._generate_batches(GenerateArgs(batch_size=args.batch_size, **kwargs), progress=True)
    texts = [t for batch in batches for t in batch]
    print(("\n" + "=" * 10 + "\n").join(texts))
    return 0


def cmd_export(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.convert import export_checkpoint

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    out = export_checkpoint(
        args.checkpoint, args.output, step=args.step, overwrite=args.overwrite, push_to_hub=args.push_to_hub
    )
    print(f"exported to {out}: load it with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


def cmd_info(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.info import describe

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    print(describe(args.folder))
    return 0


def cmd_plot(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from gpt2_flax.plot import plot_run

    if extra:
        raise ConfigError(f"unrecognised arguments {list(extra)}")
    print(f"gpt2-flax: wrote {plot_run(args.folder, args.output)}")
    return 0


def cmd_compile(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = load_config(args.config, split_overrides(extra))  # before JAX: config errors at once

    from gpt2_flax.aot import compile_for_topology, report_dict

    report = compile_for_topology(cfg, args.topology)
    print(json.dumps(report_dict(report)) if args.json else report.format())
    return 0 if report.fits else 1


_PRESETS = ", ".join(presets())
_INPUTS_HELP = "text/CSV/JSONL/Parquet files, folders, globs or hub:NAME[:CONFIG][@SPLIT]"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="gpt2-flax", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a tokenizer (if needed) and a GPT-2, then export it",
        description="Train GPT-2. With no --config: the offline demo (stdlib docstrings).",
        epilog=_override_help(),
        formatter_class=fmt,
    )
    t.add_argument(
        "--config", help=f"YAML config, or a preset by name ({_PRESETS}); default: the built-in demo"
    )
    t.add_argument("--data", nargs="+", help=f"{_INPUTS_HELP} (sets data.files)")
    t.add_argument(
        "--output-dir", help="checkpoints, metrics.jsonl and the export go here (train.output_dir)"
    )
    t.add_argument(
        "--overwrite", action="store_true", help="replace another model's run/export in output dir"
    )
    t.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)"
    )
    t.add_argument("--samples", type=int, default=3, help="samples printed after training (default 3)")
    t.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host TPU slice: start jax.distributed, peers found from the TPU metadata",
    )
    t.add_argument("--coordinator", help="multi-host elsewhere: coordinator host:port")
    t.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    t.add_argument("--process-id", type=int, help="multi-host: this process's index")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer on the text a dataset of these inputs reads"
    )
    k.add_argument("files", nargs="+", help=_INPUTS_HELP)
    k.add_argument("--vocab-size", type=int, default=5000, help="vocabulary size (default 5000)")
    k.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    k.add_argument("--save-path", default=".", help="output folder (default .)")
    k.add_argument(
        "--prefix", default="gpt2_flax", help="file prefix: PREFIX-vocab.json ... (default gpt2_flax)"
    )
    _add_encoding_args(k)
    k.set_defaults(func=cmd_train_tokenizer)

    n = sub.add_parser("encode", help="tokenize a corpus once into a token cache (before training)")
    n.add_argument("files", nargs="+", help=_INPUTS_HELP)
    n.add_argument("--tokenizer-file", help="a tokenizer.json (or --vocab-file with --merges-file)")
    n.add_argument("--vocab-file", help="a vocab.json (with --merges-file)")
    n.add_argument("--merges-file", help="a merges.txt (with --vocab-file)")
    n.add_argument("--cache-dir", help="cache folder (default ~/.cache/gpt2_flax/tokens or $GPT2_FLAX_CACHE)")
    n.add_argument("--output", help="also save the cache here, for train --data.from_cache=OUTPUT")
    _add_encoding_args(n)
    n.add_argument("--num-proc", type=int, default=1, help="encoding worker processes (default 1)")
    n.add_argument("--no-progress", action="store_true", help="no progress bars")
    n.set_defaults(func=cmd_encode)

    g = sub.add_parser("generate", help="sample text from an exported model folder")
    g.add_argument("--model-folder", required=True, help="folder written by train/export/save")
    g.add_argument("--prompt", default="", help="text every sample starts with")
    g.add_argument("--prompt-file", help="a text file of prompts, one per line (n samples each)")
    g.add_argument("-n", "--n", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--batch-size", type=int, default=None, help="samples per device batch (default: all)")
    g.add_argument("--to-file", help="write the samples to this new file instead of printing them")
    g.add_argument("--max-length", type=int, default=256, help="tokens per sample, prompt included")
    g.add_argument("--max-new-tokens", type=int, default=None, help="or: tokens after the prompt")
    g.add_argument("--min-length", type=int, default=None, help="no end or stop before this many tokens")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat n-grams of this size")
    g.add_argument("--stop", action="append", help="stop string (\\n escapes work) or token id; repeatable")
    g.add_argument("--no-bos", action="store_true", help="do not start from <|endoftext|>")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="export a training checkpoint to a PyTorch/transformers folder")
    e.add_argument("--checkpoint", required=True, help="a training output_dir (holds run.json, checkpoints/)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--output", required=True, help="folder to write config.json, model.safetensors, ...")
    e.add_argument("--overwrite", action="store_true", help="replace another model's export in --output")
    e.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the export to this Hugging Face Hub repo (USER/NAME)",
    )
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("info", help="what a run or export folder holds, and how to go on from it")
    i.add_argument("folder", help="a training output_dir or an exported model folder")
    i.set_defaults(func=cmd_info)
    pl = sub.add_parser("plot", help="loss.png of a run: loss, validation loss and learning rate")
    pl.add_argument("folder", help="a training output_dir (it has metrics.jsonl)")
    pl.add_argument("--output", help="the PNG to write (default: FOLDER/loss.png)")
    pl.set_defaults(func=cmd_plot)
    c = sub.add_parser(
        "compile",
        help="compile the train step for a TPU slice on this machine (needs libtpu): memory, FLOPs",
        description="Lower and compile the real train step for a TPU topology without a TPU and report "
        "the attention in use, per-device memory against HBM, FLOPs and the tokens/s of 40% and 60% "
        "MFU, and an estimate of the step: FLOPs and HBM bytes with loop trip counts applied, a "
        "roofline time, the ceiling on tokens/s and MFU, collective bytes (docs/tpu.md). Exit 0 if it "
        "fits, 1 if not.",
        epilog=_override_help(),
        formatter_class=fmt,
    )
    c.add_argument("--config", required=True, help=f"YAML config, or a preset by name ({_PRESETS})")
    c.add_argument(
        "--topology", required=True, help="e.g. v5e:2x4 (v5e-8), v4:2x2x1 (v4-8), v5p:2x2x1, v5e:4x4"
    )
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_compile)
    return p


def _add_encoding_args(parser: argparse.ArgumentParser) -> None:
    """How the inputs are read: the same flags (and meaning) for train-tokenizer and encode."""
    parser.add_argument("--line-by-line", action="store_true", help="each line/row/record is a document")
    parser.add_argument("--text-column", help="CSV column (name or index) or JSONL field with the text")
    parser.add_argument("--no-header", action="store_true", help="CSV files have no header row")
    parser.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: an error naming file and offset (strict) or U+FFFD (replace)",
    )
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip CSV/JSONL records with wrong fields or empty text (counted in a warning), not an error",
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix, printed as one message (exit 2). Anything else is a bug in
    gpt2_flax and keeps its traceback. The tokenizers library raises bare Exceptions for unreadable
    files; they are wrapped into DataError where files are read (sources.py, tokenizer.py)."""
    import pickle
    import zipfile

    import yaml

    errors: list[type[BaseException]] = [
        GPT2FlaxError,
        OSError,  # FileNotFoundError, PermissionError, disk full ...
        yaml.YAMLError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        ImportError,  # an optional extra (torch, libtpu) not installed: the message says which
    ]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        with cli_spelling():  # messages name options as --data.text_column=..., not text_column=
            return args.func(args, extra)
    except _user_errors() as e:
        print(f"gpt2-flax {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e} ({e.filename})"
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
        return f"{e}: the disk is full; free space (older checkpoints are intact) and run again to resume"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
