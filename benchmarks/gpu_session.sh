#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 in one device call (at most 9.7 minutes of step limits on one H100/H200,
# inside a session's 15 minutes of device time). On the device machine, from the repository root:
#
#     bash benchmarks/gpu_session.sh            # logs under $OUT (the device tool's folder) or ./gpu_logs
#
# Every step has its own time limit, so one that hangs or runs long costs only its share. The
# machine's image has jax (CUDA), flax, optax, orbax, torch and transformers; gpt2_flax runs from
# this checkout (PYTHONPATH), `datasets` is not needed for these benchmarks.
set -u -o pipefail
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# JAX would otherwise take 75% of the GPU and starve the PyTorch contenders of the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its log, show its table
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "rc=$?" >>"$out/$name.log"
    grep -v -e '^\[transformers\]' -e 'Warning' -e '^W[0-9]' "$out/$name.log" | tail -n 14
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c 'import jax, flax, optax, orbax.checkpoint, torch, transformers as t
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)
print("torch", torch.__version__, "transformers", t.__version__)'
} 2>&1 | tee "$out/versions.log"

# Issue 10: GPT-2 124M at context 1024 (ours, HF eager, HF torch.compile; MFU against the chip's peak).
step train_124m 230 "$py" benchmarks/bench_train.py --config configs/gpt2-124m.yaml --steps 20 \
    --warmup 3 --rounds 4 train.batch_size=16 train.grad_accum_steps=1 model.remat=none
# The same step with the layers unrolled (on GPU they are scanned today): does the scan cost?
step train_124m_unrolled 110 "$py" -c 'import runpy, sys, gpt2_flax.model as m
m.unroll_layers = lambda platform, n_layer: True
sys.argv = ["bench_train.py", "--config", "configs/gpt2-124m.yaml", "--steps", "20", "--warmup", "3",
            "--rounds", "2", "--no-compile", "train.batch_size=16", "train.grad_accum_steps=1",
            "model.remat=none"]
runpy.run_path("benchmarks/bench_train.py", run_name="__main__")'
# Where our 124M step's time goes on the GPU, per XLA op (the profile the next change needs).
step profile_124m 90 "$py" benchmarks/profile_train.py --config configs/gpt2-124m.yaml --steps 3 --top 40 \
    train.batch_size=16 train.grad_accum_steps=1 model.remat=none
# Issue 9: generation, ours (bf16 compute) against HF PyTorch on the GPU (bf16), each in its own process.
step generate 150 "$py" benchmarks/bench_generate.py --models seed 124m --batches 1 8 --repeats 2
echo "== done $(date -u +%H:%M:%S)"
