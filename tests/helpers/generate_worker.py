"""One process of a real multi-process JAX run on CPU that generates (the path of samples during a
pod-slice run: every process takes part, process 0 writes).

    python generate_worker.py PORT NUM_PROCESSES PROCESS_ID DEVICES_PER_PROCESS WORKDIR

Builds a tiny GPT-2 (seed 0; parameters sharded over every device of every process) on the
tokenizer in WORKDIR/tok and writes its samples to WORKDIR/texts.json on process 0.
"""

from __future__ import annotations

import json
import os
import sys

port, nproc, pid, ndev, workdir = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate_case import generate_case  # noqa: E402

texts = generate_case(workdir)
if jax.process_index() == 0:
    with open(os.path.join(workdir, "texts.json"), "w") as f:
        json.dump(texts, f)
jax.distributed.shutdown()
