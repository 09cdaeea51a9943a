"""Honest training logs: a progress bar, JSON lines, tokens/s and model FLOPs utilisation."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from etils import epath
from tqdm.auto import tqdm


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention
    12 * L * T * C (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * n_layer * seq_len * n_embd


class MetricsLogger:
    """Writes one JSON object per logged step to `metrics.jsonl` and drives a progress bar.
    Only process 0 writes; other processes call it too and it does nothing."""

    def __init__(
        self,
        output_dir: str | Path | None,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        flops_per_step: float,
        enabled: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.output_dir = epath.Path(output_dir) if (output_dir and enabled) else None
        self.path = self.output_dir / "metrics.jsonl" if self.output_dir is not None else None
        # Object stores (gs://) cannot append: there the whole file is rewritten at each log point.
        self._remote = self.path is not None and "://" in str(self.path)
        self._lines = self.path.read_text().splitlines(True) if self._remote and self.path.exists() else []
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.bar = None
        if enabled and progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """`metrics` are host floats averaged over the steps since the last call."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        dt = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        tps = steps * self.tokens_per_step / dt
        record: dict[str, Any] = {"step": step, **metrics, "tokens_per_s": tps, "step_time_s": dt / steps}
        if "loss" in metrics and math.isfinite(metrics["loss"]) and metrics["loss"] < 50:
            record["perplexity"] = math.exp(metrics["loss"])
        record["model_tflops_per_s"] = self.flops_per_step * steps / dt / 1e12
        if not self.enabled:
            return record
        if self.path is not None and self._remote:
            self._lines.append(json.dumps(record) + "\n")
            self.path.write_text("".join(self._lines))
        elif self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}", tok_s=f"{tps:,.0f}", refresh=False
            )
            self.bar.update(step - self.bar.n)
        return record

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- samples.txt

SAMPLE_HEADER = "===== step {} ====="
_HEADER_RE = re.compile(r"^===== step (\d+) =====$", re.M)


def format_samples(step: int, texts: list[str]) -> str:
    return SAMPLE_HEADER.format(step) + "\n" + ("\n" + "-" * 10 + "\n").join(texts) + "\n\n"


def append_samples(output_dir: Any, step: int, texts: list[str]) -> str:
    """Appends the samples of `step` under its header to output_dir/samples.txt (process 0; None
    writes nothing); returns the block, to be shown."""
    block = format_samples(step, texts)
    if output_dir is not None:
        path = epath.Path(output_dir) / "samples.txt"
        if "://" in str(path):  # object stores cannot append
            path.write_text((path.read_text() if path.exists() else "") + block)
        else:
            with open(path, "a", encoding="utf-8") as f:
                f.write(block)
    return block.rstrip("\n")


def trim_samples(output_dir: Any, step: int) -> None:
    """On resume, drops the samples written after the checkpoint's step (they are made again,
    identically: training samples are seeded by their step)."""
    import jax

    path = epath.Path(output_dir) / "samples.txt"
    if jax.process_index() != 0 or not path.exists():
        return
    text = path.read_text()
    late = next((m.start() for m in _HEADER_RE.finditer(text) if int(m.group(1)) > step), None)
    if late is not None:
        path.write_text(text[:late])
