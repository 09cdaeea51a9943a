"""MFU in front of the user: the chip table, the CPU peak, metrics.jsonl fields, the first step
(compile) kept apart, the end-of-run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpt2_flax import GPT2, ConfigError
from gpt2_flax.config import TrainConfig
from gpt2_flax.metrics import MetricsLogger, chip_peak_flops, measured_cpu_flops, run_peak_flops


@pytest.mark.parametrize(
    ("kind", "peak"),
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("Some New Chip", None),
    ],
)
def test_chip_table(kind: str, peak: float | None) -> None:
    assert chip_peak_flops(kind) == peak


def test_cpu_peak_is_measured_or_configured() -> None:
    measured, how = run_peak_flops()
    assert measured == measured_cpu_flops() > 1e9 and "measured" in how
    assert run_peak_flops(5e10) == (5e10, "configured, 1 CPU host(s)")


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_peak_flops_is_range_checked(bad: float) -> None:
    with pytest.raises(ConfigError, match="train.peak_flops must be a finite number >= 0"):
        TrainConfig(peak_flops=bad)


def test_first_step_is_kept_out_of_tokens_per_s() -> None:
    logger = MetricsLogger(None, 10, 0, tokens_per_step=100, flops_per_step=1e9, enabled=False,
                           peak_flops=1e10)  # fmt: skip
    logger.first_step_done(5.0)  # a slow first step: compilation
    first = logger.log(1, {"loss": 1.0})  # log_every=1: the first record is that step alone
    assert first["first_step_s"] == 5.0 and first["tokens_per_s"] == pytest.approx(20.0)
    later = logger.log(3, {"loss": 1.0})
    assert "first_step_s" not in later and later["tokens_per_s"] > 1000  # two fast steps
    assert later["mfu"] == pytest.approx(later["model_tflops_per_s"] * 1e12 / 1e10)
    summary = logger.summary()
    assert summary.startswith("gpt2-flax: 3 steps in") and "compile included: 5.0 s" in summary
    assert "tokens/s" in summary and "MFU" in summary


def test_training_logs_mfu_and_prints_a_summary(
    tokenizer_files, tiny_config, dataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    ai.train(dataset, batch_size=16, num_steps=12, output_dir=tmp_path / "run", log_every=4,
             peak_flops=2e10, progress=False)  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[0]["first_step_s"] > 0 and all("first_step_s" not in r for r in records[1:])
    for r in records:
        assert 0 < r["mfu"] < 1 and r["mfu"] == pytest.approx(r["model_tflops_per_s"] * 1e12 / 2e10)
    err = capsys.readouterr().err
    assert "gpt2-flax: 12 steps in" in err and "first step, compile included" in err and "MFU" in err


def _events(folder) -> list:
    """Every Event in the TensorBoard files under `folder` (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            out.append((path.name, Event.FromString(data[i + 12 : i + 12 + n])))
            i += 12 + n + 4
    return out


def test_tensorboard_has_every_metric_the_config_and_purges_on_resume(
    tokenizer_files, tiny_config, dataset, tmp_path
) -> None:
    pytest.importorskip("tensorboardX")

    vocab, merges = tokenizer_files
    kw = dict(batch_size=16, output_dir=tmp_path, progress=False, log_every=2, save_every=2, num_steps=6)
    GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config).train(dataset, stop_at_step=4, **kw)
    GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config).train(dataset, **kw)
    events = _events(tmp_path / "tensorboard")
    scalars = {}
    for _, e in events:
        for v in e.summary.value:
            scalars.setdefault(v.tag, []).append(e.step)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "perplexity"):
        assert sorted(scalars[key]) == [r["step"] for r in logged if key in r] == [2, 4, 6], key
    texts = {
        v.tag.split("/")[0]
        for _, e in events
        for v in e.summary.value
        if v.metadata.plugin_data.plugin_name == "text"
    }
    assert "config" in texts
    # The resumed run's file starts by purging from its checkpoint step on (TensorBoard drops the rest).
    files = sorted({name for name, _ in events})
    assert len(files) == 2
    resumed = [e for name, e in events if name == files[1]]
    assert any(e.session_log.status == e.session_log.START and e.step == 4 for e in resumed)
