"""MFU in front of the user: the chip table, the CPU peak, metrics.jsonl fields, the first step
(compile) kept apart, the end-of-run summary; TensorBoard and W&B (a fake wandb: no network)."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from gpt2_flax import GPT2, ConfigError
from gpt2_flax.config import TrainConfig
from gpt2_flax.metrics import (
    MetricsLogger,
    WandbRun,
    chip_peak_flops,
    measured_cpu_flops,
    run_peak_flops,
)


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


def test_evaluation_checkpoints_and_samples_are_kept_out_of_tokens_per_s() -> None:
    logger = MetricsLogger(None, 10, 0, tokens_per_step=100, flops_per_step=1e9, enabled=False,
                           peak_flops=1e10)  # fmt: skip
    logger.first_step_done(0.1)
    with logger.between_steps():  # a sample point: seconds of generation between two steps
        time.sleep(0.5)
    record = logger.log(3, {"loss": 1.0})
    assert record["between_steps_s"] == pytest.approx(0.5, abs=0.1)
    assert record["step_time_s"] < 0.05 and record["tokens_per_s"] > 100 / 0.05
    assert "between_steps_s" not in logger.log(5, {"loss": 1.0})  # counted once, in its interval
    summary = logger.summary()
    assert "evaluation, checkpoints and samples: 0.5 s" in summary
    total = float(summary.split(" steps in ")[1].split(" s")[0])
    assert 0.6 <= total < 0.7  # the total time still counts it (and the first step)


def test_training_logs_mfu_and_prints_a_summary(
    tokenizer_files, tiny_config, dataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    ai.train(dataset, batch_size=16, num_steps=12, output_dir=tmp_path / "run", log_every=4,
             save_every=4, peak_flops=2e10, progress=False)  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    # The checkpoints at steps 4 and 8 are timed apart, in the interval after each.
    assert "between_steps_s" not in records[0] and all(r["between_steps_s"] > 0 for r in records[1:])
    assert records[0]["first_step_s"] > 0 and all("first_step_s" not in r for r in records[1:])
    for r in records:
        assert 0 < r["mfu"] < 1 and r["mfu"] == pytest.approx(r["model_tflops_per_s"] * 1e12 / 2e10)
    err = capsys.readouterr().err
    assert "gpt2-flax: 12 steps in" in err and "first step, compile included" in err and "MFU" in err
    assert "evaluation, checkpoints and samples:" in err


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


class FakeWandb(types.ModuleType):
    """A `wandb` module that records init/log/config/finish calls and, like W&B's server, a run's
    last step: a resumed run's `step` is one past it."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple[str, Any]] = []
        self.last_step: dict[str, int] = {}  # run id -> highest step logged

    def init(self, **kwargs: Any) -> Any:
        self.calls.append(("init", kwargs))
        fake, run_id = self, kwargs["id"]

        class Config:
            def update(self, values: dict[str, Any], allow_val_change: bool = False) -> None:
                fake.calls.append(("config", (values, allow_val_change)))

        class Run:
            step = fake.last_step[run_id] + 1 if run_id in fake.last_step else 0
            config = Config()

            def log(self, data: dict[str, Any], step: int) -> None:
                fake.calls.append(("log", (step, data)))
                fake.last_step[run_id] = max(step, fake.last_step.get(run_id, -1))

            def finish(self) -> None:
                fake.calls.append(("finish", None))

        return Run()

    class Html:
        def __init__(self, data: str) -> None:
            self.data = data


def test_wandb_logs_every_metric_and_the_config_and_a_resume_continues_the_run(
    tokenizer_files, tiny_config, dataset, tmp_path, monkeypatch
) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    vocab, merges = tokenizer_files
    kw = dict(batch_size=16, output_dir=tmp_path, progress=False, log_every=2, save_every=2, num_steps=6,
              tensorboard=False, wandb_project="tiny-gpt2", wandb_mode="offline")  # fmt: skip
    GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config).train(dataset, stop_at_step=4, **kw)
    GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config).train(dataset, **kw)

    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    inits = [c for name, c in fake.calls if name == "init"]
    asked = dict(project="tiny-gpt2", id=run_id, resume="allow", mode="offline", dir=str(tmp_path))
    assert inits == [asked, asked]
    # Each run: init, its config, its steps, finish; the resumed one starts past the checkpoint.
    names = [name for name, _ in fake.calls]
    assert names == ["init", "config", "log", "log", "finish", "init", "config", "log", "finish"]
    configs = [c for name, c in fake.calls if name == "config"]
    assert [(c["train"]["stop_at_step"], allowed) for c, allowed in configs] == [(4, True), (None, True)]
    assert configs[1][0]["train"]["wandb_project"] == "tiny-gpt2" and configs[1][0]["model"]["n_embd"] == 32
    logged = {c[0]: c[1] for name, c in fake.calls if name == "log"}  # step -> scalars
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in records}
    assert sorted(logged) == [2, 4, 6]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "perplexity"} <= set(logged[6])


def test_wandb_gets_the_samples_and_no_step_it_already_holds() -> None:
    fake = FakeWandb()
    fake.last_step["abc"] = 6  # a run preempted after logging step 6; its last checkpoint: step 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake)
        logger = MetricsLogger(None, 10, 4, tokens_per_step=100, flops_per_step=1e9, progress=False,
                               wandb=WandbRun("p", None, "abc"))  # fmt: skip
        logger.log(6, {"loss": 2.0})  # trained again identically: W&B has it already
        logger.text("samples", "<|endoftext|>x < y", 6)
        logger.log(8, {"loss": 1.5})
        logger.text("samples", "<|endoftext|>x < y", 8)
        logger.close()
    assert fake.calls[0] == ("init", dict(project="p", id="abc", resume="allow", mode=None, dir=None))
    logs = [c for name, c in fake.calls if name == "log"]
    assert [step for step, _ in logs] == [8, 8] and logs[0][1]["loss"] == 1.5
    assert logs[1][1]["samples"].data == "<pre>&lt;|endoftext|&gt;x &lt; y</pre>"
    assert fake.calls[-1] == ("finish", None) and logger.wandb is None


def test_wandb_without_the_package_is_a_config_error_before_any_write(
    tokenizer_files, tiny_config, dataset, corpus_file, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as without the [wandb] extra
    vocab, merges = tokenizer_files
    ai = GPT2(vocab_file=vocab, merges_file=merges, config=tiny_config)
    with pytest.raises(ConfigError, match=r"wandb_project='p'.*pip install 'gpt2_flax\[wandb\]'"):
        ai.train(dataset, batch_size=16, num_steps=2, output_dir=tmp_path / "api", wandb_project="p")
    from gpt2_flax import cli

    args = ["--data", str(corpus_file), "--output-dir", str(tmp_path / "cli"), "--train.wandb_project=p"]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "--train.wandb_project=p" in err and "pip install 'gpt2_flax[wandb]'" in err
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
