"""The host allocator tuning (gpt2_flax/host.py): after warmup a train step page-faults nothing,
where glibc's defaults fault XLA's whole temp buffer back in every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _faults(mode: str) -> dict:
    env = {**os.environ, "GPT2_FLAX_MALLOC": mode, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, str(HERE / "helpers" / "fault_worker.py")],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_train_step_reuses_memory_instead_of_faulting_it_in():
    tuned, default = _faults("tuned"), _faults("default")
    assert tuned["applied"] and not default["applied"]
    assert tuned["temp_bytes"] > 64 * 2**20  # past every glibc mmap threshold, as in real models
    # glibc defaults: the temp buffer comes from mmap and goes back each step (what the tuning fixes).
    assert default["fault_bytes_per_step"] > 0.5 * default["temp_bytes"]
    assert tuned["fault_bytes_per_step"] < 0.02 * tuned["temp_bytes"]


def test_not_applied_for_an_accelerator(monkeypatch):
    from gpt2_flax import host

    monkeypatch.setattr(host, "_state", {})
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert host.tune_allocator() is False
    monkeypatch.setattr(host, "_state", {})
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("GPT2_FLAX_MALLOC", "default")
    assert host.tune_allocator() is False
