"""The generation case that one process and two processes must agree on (tests/test_generate.py)."""

from __future__ import annotations

from pathlib import Path


def generate_case(workdir: str | Path) -> list[str]:
    """Samples (top-k, seeded) of a seed-0 tiny GPT-2 on the tokenizer in workdir/tok."""
    from gpt2_flax import GPT2, build_gpt2_config, load_tokenizer

    tok = Path(workdir) / "tok"
    vocab, merges = str(tok / "case-vocab.json"), str(tok / "case-merges.txt")
    size = load_tokenizer(vocab, merges).get_vocab_size(with_added_tokens=True)
    config = build_gpt2_config(vocab_size=size, max_length=16, n_embd=32, n_layer=2, n_head=4)
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=config, seed=0)
    return ai.generate(n=3, prompt="ROMEO:", max_length=24, top_k=20, seed=0, return_as_list=True)
