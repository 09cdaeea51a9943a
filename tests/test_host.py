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


def test_the_cli_keeps_compiled_programs_on_disk_unless_told_otherwise(monkeypatch, tmp_path):
    import jax

    from gpt2_flax import host

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    keys += ("jax_compilation_cache_max_size",)
    before = {k: getattr(jax.config, k) for k in keys}
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert host.enable_compilation_cache() is None  # the user's own JAX setting stays
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("GPT2_FLAX_COMPILATION_CACHE", "0")
    assert host.enable_compilation_cache() is None
    monkeypatch.setenv("GPT2_FLAX_COMPILATION_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        folder = host.enable_compilation_cache()
        assert folder == str(tmp_path / "gpt2_flax" / "xla") and Path(folder).is_dir()
        assert jax.config.jax_compilation_cache_dir == folder
        assert jax.config.jax_compilation_cache_max_size == 2 * 2**30
        monkeypatch.setenv("GPT2_FLAX_COMPILATION_CACHE", str(tmp_path / "mine"))
        assert host.enable_compilation_cache() == str(tmp_path / "mine")
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


_BIG_BLOCK = """
import ctypes, json, resource
from gpt2_flax.host import tune_allocator

applied = tune_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = int(2.25 * 2**30)  # past the largest int (2 GB) that mallopt takes, like GPT-2 124M's temp buffer
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps({"applied": applied, "first": faults[0] * 4096, "again": faults[1] * 4096, "n": n}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_a_block_over_2_gb_is_reused_without_faults():
    """GPT-2 124M's temp buffer (2.36 GB at context 256, batch 4) was trimmed and faulted back in
    every step while the trim threshold was the largest int: 2.38 GB of faults, 2-2.5 s a step."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPT2_FLAX_MALLOC": "tuned"}
    out = subprocess.run(
        [sys.executable, "-c", _BIG_BLOCK], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"]
    assert r["first"] > 0.9 * r["n"]  # fresh memory: faulted in once
    assert r["again"] < 0.01 * r["n"], r  # the freed block came back with its pages
