"""`gpt2-flax info DIR`: what a run folder or an export folder holds, read from its files only.

Nothing here imports JAX or writes anything: it reads run.json, config.json, metrics.jsonl, the
export manifest and the checkpoint folder names, so it answers at once, on any machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gpt2_flax.config import gpt2_num_params
from gpt2_flax.run_dir import MANIFEST, RUN_FILE, checkpoint_steps, read_lock


def describe(folder: str | Path) -> str:
    """A few lines for a person: model, tokenizer, progress, losses, checkpoints, export, next steps."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    run = _json(folder / RUN_FILE)
    config = _json(folder / "config.json")
    if run is None and config is None:
        raise FileNotFoundError(
            f"{folder} holds neither a training run (run.json) nor an exported model (config.json)"
        )
    lines = [f"{folder}: {'a training run' if run else 'an exported model'}"]
    model = (run or {}).get("model") or config or {}
    lines.append("  model: " + _model_line(model))
    if run:
        lines += _run_lines(folder, run)
    lines += _export_lines(folder, config)
    return "\n".join(lines)


def _model_line(m: dict[str, Any]) -> str:
    c, n, v, t = m.get("n_embd", 0), m.get("n_layer", 0), m.get("vocab_size", 0), m.get("n_positions", 0)
    params = gpt2_num_params(n, c, v, t)
    start = f", started from {m['init_from']}" if m.get("init_from") else ""
    return (
        f"GPT-2 of {params:,} parameters: n_layer={n}, n_embd={c}, n_head={m.get('n_head')}, "
        f"context {t}, vocabulary {v}{start}"
    )


def _run_lines(folder: Path, run: dict[str, Any]) -> list[str]:
    train = (run.get("config") or {}).get("train", {})
    steps = checkpoint_steps(folder)
    planned = train.get("num_steps")
    done = steps[-1] if steps else 0
    state = "finished" if planned and done >= planned else "resumable"
    lines = [
        f"  tokenizer: fingerprint {str(run.get('tokenizer_fingerprint', '?'))[:12]} (run_tokenizer.json)",
        f"  progress: step {done} of {planned} ({state})",
        f"  checkpoints: {', '.join(map(str, steps)) or 'none'} in {folder / 'checkpoints'}",
    ]
    lora = run.get("lora")
    if lora:
        lines.append(
            f"  LoRA: rank {lora['rank']}, alpha {lora['alpha']} on {', '.join(lora['targets'])}; "
            f"base {lora['base']} (the checkpoints hold the adapters only)"
        )
    data = run.get("data") or {}
    files = data.get("files") or []
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    amount = "streamed" if data.get("streamed") else f"{data.get('num_tokens', '?'):,} tokens"
    lines.append(f"  data: {amount} from {shown or 'texts given in Python'}")
    lines += _loss_lines(folder / "metrics.jsonl")
    holder = read_lock(folder)
    if holder:
        lines.append(
            f"  in use: locked by pid {holder.get('pid')} on {holder.get('host')} "
            f"since {holder.get('started')}"
        )
    if planned and done < planned:
        lines.append("  next: run the same train command (same output_dir) to resume")
    elif planned:
        lines.append(f"  next: pass num_steps > {done} to train further, or use the export here")
    if steps:
        lines.append(
            f"  export a checkpoint: gpt2-flax export --checkpoint {folder} --step {done} --output DIR"
        )
    return lines


def _loss_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not rows:
        return []
    last = rows[-1]
    out = [
        f"  loss: {last.get('loss', math.nan):.4f} at step {last.get('step')} "
        f"(first logged {rows[0].get('loss', math.nan):.4f})"
    ]
    val = [r for r in rows if "val_loss" in r]
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        out.append(
            f"  validation loss: {val[-1]['val_loss']:.4f} last, {best['val_loss']:.4f} best "
            f"(step {best['step']})"
        )
    return out


def _export_lines(folder: Path, config: dict[str, Any] | None) -> list[str]:
    if config is None:
        return ["  export: none yet (written when the run finishes)"]
    weights = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    manifest = _json(folder / MANIFEST)
    by = "gpt2_flax" if manifest else "another tool (no gpt2_flax manifest)"
    return [
        f"  export: {', '.join(weights) or 'no weights'} with config.json (written by {by}); "
        f"eos id {config.get('eos_token_id')}",
        f"  use it: GPT2LMHeadModel.from_pretrained({str(folder)!r}), or gpt2-flax generate "
        f"--model-folder {folder}",
    ]


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise OSError(f"{path} cannot be read ({e})") from None
