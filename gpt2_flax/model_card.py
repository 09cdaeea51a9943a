"""The export's README.md: a Hugging Face model card (front matter + markdown) that says what the
model is, how it was trained and how to load it. A README.md that is not ours (the user's, or ours
edited since) is never replaced: the card is written only where none is, or where the last export's
manifest vouches for the one there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gpt2_flax.config import gpt2_num_params

CARD = "README.md"


def may_write(folder: Any, manifest_files: dict[str, str]) -> bool:
    """No README.md there, or the one the last export wrote, unchanged."""
    card = Path(str(folder)) / CARD
    if not card.exists():
        return True
    return manifest_files.get(CARD) == hashlib.sha256(card.read_bytes()).hexdigest()


def model_card(config: Any, tokenizer: Any, folder: Any) -> str:
    """The card for an export of `config` (a transformers GPT2Config) into `folder`; a run's own
    output folder adds its training numbers and its loss.png."""
    folder = Path(str(folder))
    c, n, h, t, v = config.n_embd, config.n_layer, config.n_head, config.n_positions, config.vocab_size
    params = gpt2_num_params(n, c, v, t)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- text-generation",
        "- gpt2_flax",
        "---",
        "",
        f"# {folder.name or 'GPT-2'}",
        "",
        f"A GPT-2 of {params:,} parameters trained with gpt2_flax (JAX/Flax), "
        "saved for PyTorch and `transformers`.",
        "",
        "| n_layer | n_embd | n_head | context | vocabulary |",
        "|---|---|---|---|---|",
        f"| {n} | {c} | {h} | {t} | {v} |",
        "",
        f"Tokenizer: byte-level BPE of {tokenizer.get_vocab_size(with_added_tokens=True)} tokens; "
        f"`<|endoftext|>` is id {config.eos_token_id} and starts every prompt, as it started every "
        "training document.",
        "",
    ]
    lines += _training(folder)
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, GPT2LMHeadModel",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")  # the folder, from its parent',
        f'model = GPT2LMHeadModel.from_pretrained("{folder.name}")',
        'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))",
        "```",
        "",
    ]
    return "\n".join(lines)


def _training(folder: Path) -> list[str]:
    """Steps, tokens and losses when the export is in the run's own folder (run.json, metrics.jsonl)."""
    try:
        run = json.loads((folder / "run.json").read_text())
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError):
        return []
    if not rows:
        return []
    cfg = run.get("config", {})
    train, block = (
        cfg.get("train", {}),
        cfg.get("data", {}).get("block_size") or cfg.get("model", {}).get("n_positions", 0),
    )
    step = rows[-1]["step"]
    tokens = step * int(train.get("batch_size", 0)) * int(block)
    out = [
        "## Training",
        "",
        f"- {step:,} steps of {train.get('batch_size')} rows x {block} tokens: {tokens:,} tokens",
    ]
    if "loss" in rows[-1]:
        out.append(f"- final training loss {rows[-1]['loss']:.4f}")
    val = [r for r in rows if "val_loss" in r]
    if val:
        out.append(f"- final validation loss {val[-1]['val_loss']:.4f}")
    if run.get("model", {}).get("init_from"):
        out.append(f"- started from {run['model']['init_from']}")
    files = run.get("data", {}).get("files") or []
    if files:
        out.append(f"- data: {', '.join(Path(f).name for f in files[:5])}{' ...' if len(files) > 5 else ''}")
    if (folder / "loss.png").is_file():
        out += ["", "![training loss](loss.png)"]
    return [*out, ""]
