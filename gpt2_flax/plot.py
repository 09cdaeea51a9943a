"""loss.png of a run: training loss (raw and smoothed) and validation loss against steps and
tokens, and the learning rate below. Drawn from metrics.jsonl alone, with matplotlib's Agg backend
(no display needed), at the end of a run and by `gpt2-flax plot DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2_flax.errors import DataError

INSTALL = "pip install 'gpt2_flax[plot]' (matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_run(folder: str | Path, out: str | Path | None = None) -> Path:
    """Writes folder/loss.png (or `out`) from folder/metrics.jsonl; returns its path."""
    folder = Path(folder)
    rows = _rows(folder / "metrics.jsonl")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: {INSTALL}") from e
    steps = [r["step"] for r in rows if "loss" in r]
    loss = [r["loss"] for r in rows if "loss" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[3, 1])
    top.plot(steps, loss, color="tab:blue", alpha=0.35, label="training loss")
    top.plot(steps, _smoothed(loss), color="tab:blue", label="training loss (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        top.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation loss")
    top.set_ylabel("loss (nats per token)")
    top.grid(alpha=0.3)
    top.legend()
    tokens = _tokens_per_step(folder)
    if tokens:  # a second x-axis in tokens seen (the same run at another batch size compares here)
        top.secondary_xaxis("top", functions=(lambda s: s * tokens, lambda t: t / tokens)).set_xlabel(
            "tokens"
        )
    lr = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    if lr:
        bottom.plot(*zip(*lr, strict=True), color="tab:green")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out is not None else folder / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: plot a training output_dir (it logs metrics.jsonl)")
    try:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON lines ({e})") from None
    if not any("loss" in r for r in rows):
        raise DataError(f"{path} holds no logged loss yet: plot again after the first log_every steps")
    return rows


def _smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard-style exponential moving average, debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _tokens_per_step(folder: Path) -> int:
    try:
        cfg = json.loads((folder / "run.json").read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError):
        return 0
    block = cfg.get("data", {}).get("block_size") or cfg.get("model", {}).get("n_positions", 0)
    return int(cfg.get("train", {}).get("batch_size", 0)) * int(block)
