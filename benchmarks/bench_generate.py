"""Generation speed: gpt2_flax `GPT2.generate` against Hugging Face PyTorch `GPT2LMHeadModel.generate`
(its KV cache, 2 threads) on the same exported folder, each contender in its own process.

    python benchmarks/bench_generate.py                    # seed-size and 124M-size models, batch 1 and 8
    python benchmarks/bench_generate.py --models seed --batches 8

Work: a 16-token prompt (after <|endoftext|>), exactly 128 new tokens (min length = max length on
both sides, so neither stops early on random weights), top_k 50, top_p 0.9, temperature 0.7.
Models have random weights: speed does not depend on them. "seed" is the seed page's 8x256 model
with vocab 5000 and n_positions 256 (Hugging Face cannot generate past its context, so not 32);
"124m" is GPT-2 124M's shape (12x768, vocab 50257, context 1024) with a synthetic 50257-token BPE.
Compile time is reported apart; tokens/s is the best of --repeats timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "seed": dict(vocab_size=5000, max_length=256, n_embd=256, n_layer=8, n_head=8),
    "124m": dict(vocab_size=50257, max_length=1024, n_embd=768, n_layer=12, n_head=12),
}
NEW_TOKENS, PROMPT_TOKENS = 128, 16
TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly vocab_size tokens: <|endoftext|>, the 256 bytes, then merges of
    random earlier pairs (GPT-2's vocabulary size without downloading GPT-2's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tokens, merges, rng = list(vocab)[1:], [], random.Random(0)
    while len(vocab) < vocab_size:
        a, b = rng.choice(tokens[:2000]), rng.choice(tokens[:2000])
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def make_folder(name: str, root: Path) -> tuple[Path, str]:
    """The exported folder both contenders load, and a prompt of PROMPT_TOKENS tokens."""
    from gpt2_flax import GPT2, build_gpt2_config, load_tokenizer, train_tokenizer

    spec = MODELS[name]
    if name == "seed":
        corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
        if not corpus.is_file():
            corpus = root / "corpus.txt"
            corpus.write_text((TEXT + "\n") * 2000)
        vocab, merges = train_tokenizer(corpus, vocab_size=spec["vocab_size"], save_path=root)
        tok = load_tokenizer(vocab, merges)
    else:
        tok = synthetic_tokenizer(spec["vocab_size"])
    config = build_gpt2_config(**{**spec, "vocab_size": tok.get_vocab_size(with_added_tokens=True)})
    folder = root / name
    GPT2(config=config, tokenizer=tok, seed=0).save(folder)
    ids = tok.encode(TEXT * 4).ids
    for n in range(PROMPT_TOKENS, len(ids)):  # a prefix that re-encodes to exactly 16 tokens
        prompt = tok.decode(ids[:n])
        if len(tok.encode(prompt).ids) == PROMPT_TOKENS:
            return folder, prompt
    raise RuntimeError("no 16-token prompt found")


def worker_ours(folder: str, prompt: str, batch: int, repeats: int) -> dict:
    from flax import nnx

    from gpt2_flax import GPT2

    ai = GPT2(model_folder=folder)
    n = len(ai.tokenizer.encode(prompt).ids)
    kw = dict(n=batch, prompt=prompt, max_new_tokens=NEW_TOKENS, min_length=n + NEW_TOKENS, top_k=50,
              top_p=0.9, temperature=0.7, return_as_list=True)  # fmt: skip
    t0 = time.perf_counter()
    ai.generate(seed=0, **kw)
    first = time.perf_counter() - t0
    engine = ai._generator()
    best = min(_timed(lambda s=s: ai.generate(seed=s, **kw)) for s in range(1, repeats + 1))
    groups = engine.groups(nnx.to_pure_dict(nnx.state(ai.model)), batch)  # programs run at once
    return {"first_call_s": first, "compile_s": engine.compile_seconds, "best_s": best, "groups": groups}


def worker_hf(folder: str, prompt: str, batch: int, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = tok([prompt] * batch, return_tensors="pt")["input_ids"]  # <|endoftext|> + 16 tokens
    if torch.cuda.is_available():  # the same precision as ours there: bf16 compute
        model, ids = model.to("cuda", dtype=torch.bfloat16), ids.to("cuda")
    kw = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.7, max_new_tokens=NEW_TOKENS,
              min_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)  # fmt: skip
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
        first = time.perf_counter() - t0
        best = min(_timed(lambda: model.generate(ids, **kw)) for _ in range(repeats))
    return {"first_call_s": first, "compile_s": 0.0, "best_s": best}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth as XLA:CPU sees it: a jitted sum over 1 GiB of float32."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(2**28, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best / 1e9


def run_worker(args: argparse.Namespace) -> None:
    fn = worker_ours if args.worker == "ours" else worker_hf
    out = fn(args.folder, args.prompt, args.batch, args.repeats)
    if args.worker == "ours" and args.bandwidth:
        out["read_gbs"] = read_bandwidth_gbs()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def spawn(worker: str, folder: Path, prompt: str, batch: int, repeats: int, bandwidth: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--folder", str(folder), "--prompt", prompt,
           "--batch", str(batch), "--repeats", str(repeats)]  # fmt: skip
    cmd += ["--bandwidth"] if bandwidth else []
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["seed", "124m"], choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder, prompt = make_folder(name, Path(tmp))
            weight_bytes = sum(f.stat().st_size for f in folder.glob("model.safetensors"))
            for batch in args.batches:
                bw = name == "124m" and batch == 1
                ours = spawn("ours", folder, prompt, batch, args.repeats, bw)
                theirs = spawn("hf", folder, prompt, batch, args.repeats, False)
                tps = {k: batch * NEW_TOKENS / r["best_s"] for k, r in (("ours", ours), ("hf", theirs))}
                programs = f"{ours['groups']} program{'s' * (ours['groups'] > 1)}"
                line = (f"{name:5s} batch {batch}: gpt2_flax {tps['ours']:8.1f} tok/s ({programs}, compile "
                        f"{ours['compile_s']:.1f} s, RSS {ours['peak_rss_mb']:.0f} MB) | HF PyTorch "
                        f"{tps['hf']:8.1f} tok/s (RSS {theirs['peak_rss_mb']:.0f} MB) | ours/theirs "
                        f"{tps['ours'] / tps['hf']:.2f}x")  # fmt: skip
                if bw:
                    bound = ours["read_gbs"] * 1e9 / weight_bytes
                    line += (f" | weights {weight_bytes / 1e6:.0f} MB/token, read bandwidth "
                             f"{ours['read_gbs']:.1f} GB/s -> bound {bound:.1f} tok/s "
                             f"(ours {tps['ours'] / bound:.0%} of it)")  # fmt: skip
                print(line, flush=True)


if __name__ == "__main__":
    main()
