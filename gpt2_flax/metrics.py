"""Honest training logs: a progress bar, JSON lines, TensorBoard, W&B, tokens/s and model FLOPs utilisation.

TensorBoard event files go to output_dir/tensorboard/ (process 0 only) through tensorboardX, a small
writer that needs no TensorFlow (`pip install gpt2_flax[tensorboard]`; without it, a note says so and
metrics.jsonl is the record): every metric of metrics.jsonl as a scalar, the samples and the resolved
config as text. Local output folders only, for now (a gs:// one keeps metrics.jsonl alone). A resume
writes a new event file that purges the steps logged after its checkpoint, so TensorBoard shows no
step twice.

Weights & Biases (train.wandb_project, `pip install gpt2_flax[wandb]`) gets the same scalars, the
samples and the resolved config from process 0. Its run id is run.json's run_id, so a resume
continues the same W&B run; steps W&B already holds (logged after the checkpoint a resume starts
from) are not sent again.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etils import epath
from tqdm.auto import tqdm

from gpt2_flax.errors import ConfigError, spell


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention
    12 * L * T * C (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * n_layer * seq_len * n_embd


@dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int


GiB = 1 << 30
# One chip (Google Cloud TPU documentation; vendors' data sheets, SXM parts, for GPUs). Matched as
# a substring of jax's device_kind, longest name first ("TPU v5 lite" before "TPU v5").
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(275e12, 1200e9, 32 * GiB),
    "TPU v5 lite": Chip(197e12, 819e9, 16 * GiB),
    "TPU v5e": Chip(197e12, 819e9, 16 * GiB),
    "TPU v5p": Chip(459e12, 2765e9, 95 * GiB),
    "TPU v5": Chip(459e12, 2765e9, 95 * GiB),
    "TPU v6 lite": Chip(918e12, 1640e9, 32 * GiB),
    "TPU v6e": Chip(918e12, 1640e9, 32 * GiB),
    "A100": Chip(312e12, 2039e9, 80 * 10**9),
    "H100": Chip(989e12, 3350e9, 80 * 10**9),
    "H200": Chip(989e12, 4800e9, 141 * 10**9),
}


def chip(device_kind: str) -> Chip | None:
    """The table's row for a device kind, or None when the chip is not in it."""
    for name in sorted(CHIPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return CHIPS[name]
    return None


def chip_peak_flops(device_kind: str) -> float | None:
    """The table's peak for a device kind, or None when the chip is not in it."""
    row = chip(device_kind)
    return row.peak_flops if row else None


@functools.cache
def measured_cpu_flops() -> float:
    """This host's float32 matmul FLOP/s, measured once (a 1024^3 jitted matmul, best of 5: ~0.1 s).
    All the CPU devices of a host share its cores, so this is the host's peak, not a device's."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1024, 1024), jnp.float32, device=jax.local_devices(backend="cpu")[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def run_peak_flops(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of the whole run, how it was found): per chip x chips, or per host x hosts on
    CPUs. override: the peak of one chip (one host for CPUs), e.g. --train.peak_flops=197e12."""
    import jax

    devices = jax.devices()
    if devices[0].platform == "cpu":
        per, what = (override, "configured") if override else (measured_cpu_flops(), "measured matmul")
        return per * jax.process_count(), f"{what}, {jax.process_count()} CPU host(s)"
    kind = devices[0].device_kind
    per = override or chip_peak_flops(kind)
    if not per:
        return 0.0, f"unknown chip {kind!r}: set --train.peak_flops for MFU"
    return per * len(devices), f"{'configured' if override else 'table'}, {len(devices)} x {kind}"


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
        peak_flops: float = 0.0,
        tensorboard: bool = False,
        wandb: WandbRun | None = None,
    ):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops  # of the whole run; 0 = unknown (no MFU)
        self.first_step_s: float | None = None  # the first step of this call, compile included
        self._timed = [0, 0.0]  # steps and seconds after the first step: the summary's means
        # Host work between steps (evaluation, checkpoints, samples), timed apart: a sample point's
        # generation (seed model: ~7 s with its compile) had counted as training time, and its
        # interval showed 565 tokens/s against ~2,000 for the others.
        self._between = 0.0  # seconds of it since the last record
        self._between_total = 0.0
        self._reported: set[str] = set()
        self.output_dir = epath.Path(output_dir) if (output_dir and enabled) else None
        self.path = self.output_dir / "metrics.jsonl" if self.output_dir is not None else None
        # Object stores (gs://) cannot append: there the whole file is rewritten at each log point.
        self._remote = self.path is not None and "://" in str(self.path)
        self._lines = self.path.read_text().splitlines(True) if self._remote and self.path.exists() else []
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.tb = None
        if tensorboard and self.output_dir is not None:
            self.tb = _tensorboard_writer(self.output_dir, start_step)
        self.wandb = None
        if wandb is not None and enabled:
            self.wandb = _wandb_run(wandb, self.output_dir)
        # W&B refuses a step below the last one it holds: on resume it starts past both that and
        # the checkpoint (the steps in between were logged by the run before, identically).
        self._wandb_from = max(start_step + 1, int(getattr(self.wandb, "step", 0) or 0))
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
        between, self._between = self._between, 0.0
        steps, dt, timed = step - self._last_step, max(now - self._last_time - between, 1e-9), True
        if steps <= 0:  # log_every=1: this record is the first step alone, compile included
            steps, dt, timed = 1, self.first_step_s or dt, False
        self._last_time, self._last_step = now, step
        tps = steps * self.tokens_per_step / dt
        record: dict[str, Any] = {"step": step, **metrics, "tokens_per_s": tps, "step_time_s": dt / steps}
        if between:
            record["between_steps_s"] = between  # evaluation, checkpoints, samples: not in tokens/s
        if "loss" in metrics and math.isfinite(metrics["loss"]) and metrics["loss"] < 50:
            record["perplexity"] = math.exp(metrics["loss"])
        flops_per_s = self.flops_per_step * steps / dt
        record["model_tflops_per_s"] = flops_per_s / 1e12
        if self.peak_flops:
            record["mfu"] = flops_per_s / self.peak_flops
        if self.first_step_s is not None and "first_step_s" not in self._reported:
            record["first_step_s"] = self.first_step_s  # compile included: kept out of tokens_per_s
            self._reported.add("first_step_s")
        if timed:
            self._timed = [self._timed[0] + steps, self._timed[1] + dt]
        if not self.enabled:
            return record
        if self.path is not None and self._remote:
            self._lines.append(json.dumps(record) + "\n")
            self.path.write_text("".join(self._lines))
        elif self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None and step >= self._wandb_from:
            self.wandb.log(scalars, step=step)
        if self.bar is not None:
            shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}", "tok_s": f"{tps:,.0f}"}
            if "mfu" in record:
                shown["mfu"] = f"{record['mfu']:.1%}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)
        return record

    def first_step_done(self, seconds: float) -> None:
        """The first step (compile included) took `seconds`: restart the clock so that tokens/s
        and MFU measure training, not compilation."""
        self.first_step_s = seconds
        self._last_time = time.perf_counter()
        self._last_step += 1

    @contextlib.contextmanager
    def between_steps(self) -> Iterator[None]:
        """Times host work between train steps (evaluation, a checkpoint, samples) apart, so that
        tokens/s, step_time_s and MFU measure the steps alone. The caller waits for the steps in
        flight first, or their compute would be counted here."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._between += dt
            self._between_total += dt

    def summary(self) -> str:
        """One line for the end of a run: steps, total time, and the mean tokens/s and MFU of the
        steps after the first (compile, evaluation, checkpoints and samples timed apart)."""
        steps, secs = self._timed
        if not steps:
            return "gpt2-flax: no step was timed"
        tps = steps * self.tokens_per_step / secs
        first = self.first_step_s
        total = secs + (first or 0.0) + self._between_total
        line = f"gpt2-flax: {steps + (first is not None)} steps in {total:.1f} s"
        apart = [f"first step, compile included: {first:.1f} s"] if first is not None else []
        if self._between_total:
            apart.append(f"evaluation, checkpoints and samples: {self._between_total:.1f} s")
        if apart:
            line += f" ({'; '.join(apart)})"
        line += f"; mean {tps:,.0f} tokens/s"
        if self.peak_flops:
            line += f", MFU {self.flops_per_step * steps / secs / self.peak_flops:.1%}"
        return line

    def text(self, tag: str, text: str, step: int) -> None:
        """Text (the samples) for TensorBoard's text tab and W&B; metrics.jsonl is not touched."""
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None and step >= self._wandb_from:
            import wandb

            self.wandb.log({tag: wandb.Html("<pre>" + html.escape(text) + "</pre>")}, step=step)

    def config(self, config: dict[str, Any], step: int) -> None:
        """The resolved config: TensorBoard text at `step`, the W&B run's config (a resume may
        change values such as stop_at_step, hence allow_val_change)."""
        if self.enabled and self.tb is not None:
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", step)
        if self.wandb is not None:
            self.wandb.config.update(config, allow_val_change=True)

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
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()  # a resume (or a later run) opens it again
            self.wandb = None


def _tensorboard_writer(output_dir: Any, start_step: int) -> Any:
    """A tensorboardX SummaryWriter on output_dir/tensorboard, or None (with a note) without it."""
    if "://" in str(output_dir):  # tensorboardX would make a local folder named "gs:" instead
        print(
            "gpt2-flax: no TensorBoard event files for a remote output_dir yet; metrics.jsonl has "
            "every metric"
        )
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        print(
            "gpt2-flax: no TensorBoard event files (pip install 'gpt2_flax[tensorboard]' for them); "
            "metrics.jsonl has every metric",
            file=sys.stderr,
        )
        return None
    try:  # purge_step: TensorBoard drops this log's earlier events from start_step on (a resume)
        return SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step or None, flush_secs=30)
    except Exception as e:  # e.g. a remote output_dir tensorboardX cannot write to
        print(f"gpt2-flax: no TensorBoard event files ({type(e).__name__}: {e})", file=sys.stderr)
        return None


@dataclass(frozen=True)
class WandbRun:
    """Which Weights & Biases run to log to: train.wandb_project and wandb_mode, and run.json's run_id
    (the W&B run id, so that a resume continues the same run)."""

    project: str
    mode: str | None  # online | offline; None = $WANDB_MODE, else online
    run_id: str


def check_wandb(project: str | None) -> None:
    """W&B asked for (train.wandb_project) needs the wandb package: said before any file is written."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{spell('train.wandb_project', project)} logs to Weights & Biases, which needs the wandb "
            "package: pip install 'gpt2_flax[wandb]' (or leave train.wandb_project unset)"
        ) from None


def _wandb_run(w: WandbRun, output_dir: Any) -> Any:
    """The W&B run, or None (with a note) when W&B cannot start it: training goes on without it."""
    import wandb

    local = output_dir is not None and "://" not in str(output_dir)
    try:  # resume="allow": the same id continues the run a stopped or preempted process began
        return wandb.init(
            project=w.project,
            id=w.run_id,
            resume="allow",
            mode=w.mode,
            dir=str(output_dir) if local else None,  # W&B's files in output_dir/wandb
        )
    except Exception as e:  # not logged in, no network ...: W&B raises many types
        print(
            f"gpt2-flax: warning: no W&B logging ({type(e).__name__}: {str(e)[:200]}); metrics.jsonl has "
            "every metric. train.wandb_mode=offline needs no network or login",
            file=sys.stderr,
        )
        return None


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
