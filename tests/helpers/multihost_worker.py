"""One process of a real multi-process JAX run on CPU (the code path of a TPU pod slice).

    python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID DEVICES_PER_PROCESS WORKDIR MESH_JSON

Trains the tiny model of tests/test_sharding.py for 10 steps with `GPT2.train`, training its own
tokenizer and token cache (report=True); each process writes what it trained on, and process 0 the
logged losses and the final parameters, to WORKDIR.
"""

from __future__ import annotations

import json
import logging
import os
import sys

port, nproc, pid, ndev, workdir, mesh = sys.argv[1:7]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sharding_case import run_case  # noqa: E402

# gpt2_flax's INFO lines (tokenizer trained / received, cache encoded / reused) for the test to count.
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("gpt2_flax").setLevel(logging.INFO)
losses, params = run_case(workdir, json.loads(mesh), tag="multihost", report=True)
if jax.process_index() == 0:
    import numpy as np

    np.savez(os.path.join(workdir, "multihost_params.npz"), **params)
    with open(os.path.join(workdir, "multihost_losses.json"), "w") as f:
        json.dump(losses, f)
jax.distributed.shutdown()
