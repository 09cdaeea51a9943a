"""`gpt2-flax compile`: the real train step compiled for TPU slices on this CPU (needs libtpu)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_flax.aot import report_from_dict

ROOT = Path(__file__).resolve().parents[1]
# No TPU is opened (JAX_PLATFORMS=cpu), so libtpu's one-process lock file need not be held.
LIBTPU_ENV = {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[dev]' installs it on Linux x86_64)",
)


def _run_compile(config: str, topology: str, *args: str) -> subprocess.CompletedProcess:
    # A subprocess: TPU topology devices live beside the 8 fake CPU devices of the test process.
    cmd = [
        sys.executable,
        "-m",
        "gpt2_flax.cli",
        "compile",
        "--config",
        str(ROOT / config),
        "--topology",
        topology,
    ]
    env = {**os.environ, **LIBTPU_ENV, "XLA_FLAGS": ""}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # (TPU programs compiled for a topology: no cache)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)


def _compile(config: str, topology: str, *overrides: str) -> tuple[int, dict]:
    out = _run_compile(config, topology, "--json", *overrides)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
@pytest.mark.parametrize("topology, devices", [("v5e:2x2", 4), ("v4:2x2x1", 8)])
def test_tiny_config_compiles(topology: str, devices: int) -> None:
    code, r = _compile("configs/tiny.yaml", topology)
    assert code == 0 and r["fits"]
    assert r["n_devices"] == devices and r["mesh"]["data"] == devices
    assert 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["compiler_flops"] > 0 and r["tokens_per_s_60"] > r["tokens_per_s_40"] > 0


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
# v5e only: each 124M compile costs ~45 s of the suite's 20 minutes; the v4 mesh path is compiled by
# test_tiny_config_compiles[v4:2x2x1-8], and `gpt2-flax compile` checks v4 fits on demand.
@pytest.mark.parametrize("topology, kind", [("v5e:2x4", "TPU v5 lite")])
def test_gpt2_124m_fits(topology: str, kind: str) -> None:
    code, r = _compile("configs/gpt2-124m.yaml", topology)
    assert code == 0 and r["fits"] and r["device_kind"] == kind
    assert 120e6 < r["n_params"] < 130e6  # 124M + vocab padding 50257 -> 50304
    assert r["argument_bytes"] > r["n_params"] * 12 / r["n_devices"]  # params + 2 Adam moments, fp32
    # Splash attention, in the compiled program: its forward, dq and dkv kernels are TPU custom calls
    # (4 with remat: the forward again in the backward). The recipe (4 microbatches, remat dots,
    # 2026-12-01): temporaries 13,145,794,560 bytes; the explicit path at the same settings:
    # 13,148,627,456 (`--model.attention=explicit`), nearly equal: remat dots drops the scores either
    # way. At 16 microbatches: 3.82 vs 3.97 GiB (BENCHMARKS.md, with a same-run small-model
    # comparison, 139.7 vs 27.6 MiB, left out of the suite: its two T=1024 compiles take ~45 s).
    # Since the gradients are all-reduced once after the microbatch scan (2026-12-02): splash
    # 13,303,847,424, explicit 13,302,750,720 (+0.15 GiB each: the summed gradients and their
    # reduction are alive together after the scan), equal within 0.01%.
    assert r["attention"].startswith("splash") and r["kernel_calls"] >= 3
    assert r["temp_bytes"] < 13_302_750_720 * 1.001
    # The estimate (docs/tpu.md): the microbatch scan (4) around the layer scans (12, forward and
    # backward), read from the compiled loops, agreeing with the config.
    e = r["estimate"]
    assert e["loops"] == "4 x [12, 12]"
    assert e["kernel_calls"] == 4 * 12 * 4 and e["unknown_kernel_calls"] == 0
    # Trip counts applied, FLOPs agree with 6N + 12LdT within 10%: measured x1.049, all of it the
    # splash kernels' recompute (the forward again under remat, QK^T again in dq and dkv) and their
    # diagonal tiles, 16.5 LdT where the formula counts 12; XLA's part alone is 6N within 1%.
    assert 1.0 <= (e["xla_flops"] + e["kernel_flops"]) / r["model_flops"] <= 1.10
    six_n = 6 * r["n_params"] * r["tokens_per_step"]
    assert e["xla_flops"] == pytest.approx(six_n, rel=0.01)
    # The explicit path's FLOPs, all XLA's (its attention is matmuls XLA counts), are 4.724e14 at
    # these settings; splash's estimate 4.728e14: the kernels' analytic count agrees within 0.1%.
    # Its HBM bytes, 6.52e12 where splash's are 3.55e12: the scores' traffic splash avoids.
    assert e["hbm_bytes"] < 6.5e12
    # The float32 gradients all-reduced once per step, after the microbatch scan, not once per
    # microbatch (105 ops, 1.50 GiB before: train._per_data_shard): 4 ops, 497,903,624 bytes.
    reduced = e["collectives"]["all-reduce"]
    assert 4 * r["n_params"] * 0.99 < reduced["bytes"] < 4 * r["n_params"] * 1.1 and reduced["ops"] < 12
    assert 0 < r["ceiling_mfu"] <= 1 and r["ceiling_tokens_per_s"] > 0
    text = report_from_dict(r).format()  # the text report of the same numbers: no second compile
    for line in ("estimate per step", "model FLOPs (6N + 12LdT per token)", "roofline", "ceiling"):
        assert line in text, text


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_too_big_reports_does_not_fit() -> None:
    # One microbatch of 512 x 1024 tokens without remat needs far more than a 16 GiB v5e chip.
    code, r = _compile(
        "configs/gpt2-124m.yaml", "v5e:2x4", "--train.grad_accum_steps=1", "--model.remat=none"
    )
    assert code == 1 and not r["fits"] and r["total_bytes"] > r["hbm_bytes"]


def test_unknown_topology_is_a_clear_error() -> None:
    out = _run_compile("configs/tiny.yaml", "v99:1x1")
    assert out.returncode == 2 and "v99:1x1" in out.stderr
