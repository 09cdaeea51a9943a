"""One training run, many device layouts: 1 device, 8 devices data-parallel, FSDP, tensor parallel
and 2 real processes x 4 devices all give the same losses and parameters (the global batch is the
batch). Plus the sharding rules themselves and the errors for layouts that cannot work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_corpus
from helpers import new_model
from jax.sharding import PartitionSpec as P
from sharding_case import max_rel_diff, run_case

from gpt2_flax.config import ConfigError, MeshConfig, load_config
from gpt2_flax.sharding import make_mesh, mesh_shape

HERE = Path(__file__).resolve().parent
TOL = 1e-5  # relative, fp32


def assert_params_close(params: dict, ref: dict) -> None:
    for name, want in ref.items():
        # The key bias (c_attn.bias[C:2C]) gets a mathematically zero gradient (softmax ignores a
        # constant added to every score), so Adam turns float noise into updates there: ~1e-6.
        atol = 1e-5 if name.endswith("c_attn.bias") else 1e-7
        assert np.allclose(params[name], want, rtol=TOL, atol=atol), name


def _subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("layouts")
    (d / "corpus.txt").write_text(make_corpus(seed=3, lines=300))
    return d


@pytest.fixture(scope="module")
def reference(workdir: Path) -> tuple[list[float], dict]:
    """The 1-device run, in a subprocess that has exactly one CPU device."""
    code = (
        "import json, numpy as np, sys; from sharding_case import run_case; "
        f"l, p = run_case({str(workdir)!r}, {{'data': 1}}, 'one'); "
        f"np.savez({str(workdir / 'one.npz')!r}, **p); json.dump(l, open({str(workdir / 'one.json')!r}, 'w'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env(1), cwd=HERE, timeout=300)
    params = dict(np.load(workdir / "one.npz"))
    return json.loads((workdir / "one.json").read_text()), params


@pytest.mark.parametrize(
    "mesh",
    [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 4, "tensor": 2}],
    ids=["data8", "fsdp4xdata2", "tensor2xdata4"],
)
def test_layouts_match_one_device(workdir: Path, reference: tuple, mesh: dict[str, int]) -> None:
    assert jax.device_count() == 8
    ref_losses, ref_params = reference
    losses, params = run_case(workdir, {"data": 1, "fsdp": 1, "tensor": 1, **mesh}, tag="-".join(mesh))
    assert len(losses) == len(ref_losses) == 10
    assert max_rel_diff(np.array(losses), np.array(ref_losses)) < TOL, (losses, ref_losses)
    assert losses[-1] < losses[0]
    assert_params_close(params, ref_params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a TPU compile, a CLI training or more processes: CI runs it
def test_two_processes_match_one_device(workdir: Path, reference: tuple) -> None:
    ref_losses, ref_params = reference
    port = _free_port()
    worker = HERE / "helpers" / "multihost_worker.py"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(port),
                "2",
                str(i),
                "4",
                str(workdir),
                json.dumps({"data": -1}),
            ],
            env=_subprocess_env(4),
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    losses = json.loads((workdir / "multihost_losses.json").read_text())
    assert max_rel_diff(np.array(losses), np.array(ref_losses)) < TOL, (losses, ref_losses)
    assert_params_close(dict(np.load(workdir / "multihost_params.npz")), ref_params)
    # One tokenizer and one token cache for the slice: process 0 trained the tokenizer and encoded,
    # process 1 received the tokenizer files (its own folder: no shared disk) and reused the cache
    # (a shared folder); both trained on the same tokenizer, tokens and batches. In folders of their
    # own both encode (and agree); a data copy that differs on one host is an error on both.
    assert [o.count("Trained a ") for o in outs] == [1, 0], outs
    assert [o.count("Received the tokenizer from process 0") for o in outs] == [0, 1]
    assert [o.count("Encoded ") for o in outs] == [3, 2] and outs[1].count("Reusing token cache") == 1
    reports = [json.loads((workdir / f"report-multihost-{i}.json").read_text()) for i in range(2)]
    assert reports[0]["same"] == reports[1]["same"], reports
    assert reports[0]["same"]["own_cache"] == reports[0]["same"]["cache"] == reports[0]["same"]["saved_cache"]
    assert reports[0]["mismatch"].startswith("TrainingError: process(es) [1] of this run holds other tokens")
    assert reports[1]["mismatch"].startswith("DataError: This process's token cache")
    assert reports[0]["tokenizer_failure"].startswith("FileNotFoundError: Input file")
    assert reports[1]["tokenizer_failure"].startswith(
        "TrainingError: process(es) [0] of this run could not train"
    )
    for name in ("case-vocab.json", "case-merges.txt", "case.tokenizer.json"):
        assert (workdir / "tok-multihost-p0" / name).read_bytes() == (
            workdir / "tok-multihost-p1" / name
        ).read_bytes()
    # Only process 0 writes the export and the metrics; every process took part in checkpointing.
    run = workdir / "run-multihost"
    assert (run / "model.safetensors").is_file() and (run / "checkpoints" / "10").is_dir()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 10


def test_parameter_and_optimizer_shardings_follow_the_rules() -> None:

    from gpt2_flax.model import build_gpt2_config
    from gpt2_flax.train import build, init_state

    cfg = load_config(
        None,
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        model={"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 300, "n_positions": 16},
        train={"batch_size": 8},
    )
    g = build_gpt2_config(300, 16, 0.0, 32, 2, 4)
    model = new_model(g)
    state = init_state(build(model, cfg), model)
    p = state.params
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    # (L, embed, 3, heads, head_dim): the tensor split falls on head boundaries.
    assert spec(p["h"]["attn"]["c_attn"]["kernel"]) == (None, "fsdp", None, "tensor", None)
    assert spec(p["h"]["mlp"]["c_proj"]["kernel"]) == (None, "tensor", "fsdp")  # (L, mlp, embed)
    assert spec(p["wte"]["embedding"]) == ("tensor", "fsdp")  # (vocab, embed)
    assert spec(p["ln_f"]["scale"]) in ((None,), ())
    # Adam's moments shard exactly like their parameters (ZeRO-3 with fsdp).
    mu = state.opt_state[1][0].mu
    assert spec(mu["h"]["attn"]["c_attn"]["kernel"]) == (None, "fsdp", None, "tensor", None)
    assert spec(mu["wte"]["embedding"]) == ("tensor", "fsdp")
    shard = p["h"]["mlp"]["c_fc"]["kernel"].addressable_shards[0].data.shape
    assert shard == (2, 16, 64)  # (L, C/fsdp, 4C/tensor)


@pytest.mark.parametrize(
    "sizes, n, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, 8, "multiplies to 3"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "only one axis may be -1"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "does not divide"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, 8, "positive"),
    ],
)
def test_bad_mesh_sizes(sizes: dict[str, int], n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mesh_shape(MeshConfig(**sizes), n)
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_bad_layouts_for_training() -> None:

    from gpt2_flax.model import build_gpt2_config
    from gpt2_flax.train import build

    g = build_gpt2_config(300, 16, 0.0, 36, 2, 3)  # 3 heads
    model = new_model(g)
    small = {"n_layer": 2, "n_embd": 36, "n_head": 3, "vocab_size": 300, "n_positions": 16}
    cfg = load_config(None, ["mesh.data=4", "mesh.tensor=2"], model=small, train={"batch_size": 8})
    with pytest.raises(ConfigError, match="heads cannot be split"):
        build(model, cfg)
    cfg = load_config(None, ["mesh.data=8"], model=small, train={"batch_size": 12})
    with pytest.raises(ConfigError, match="not divisible by the 8 data-parallel devices"):
        build(model, cfg)
    cfg = load_config(None, ["mesh.data=8"], model=small, train={"batch_size": 16, "grad_accum_steps": 4})
    with pytest.raises(ConfigError, match="multiple of 32"):
        build(model, cfg)
    assert make_mesh(MeshConfig(data=-1)).shape["data"] == 8


def test_precision_policy() -> None:
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_flax.model import build_gpt2_config, compute_dtype

    assert compute_dtype("auto", "tpu") == jnp.bfloat16 and compute_dtype("auto", "gpu") == jnp.bfloat16
    assert compute_dtype("auto", "cpu") == jnp.float32  # bf16 is slower than fp32 on CPUs
    g = build_gpt2_config(300, 16, 0.0, 32, 2, 4)
    fp32 = new_model(g, dtype="float32")
    bf16 = new_model(g, dtype="bfloat16")
    # Parameters stay float32 whatever the compute dtype; logits (and so the loss) are float32.
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.float32)}
    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 300
    lo = bf16(ids)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(lo, fp32(ids), atol=0.05)  # bf16 matmuls: close, not equal
    assert not np.array_equal(lo, fp32(ids))


def test_steps_are_traced_under_the_mesh_so_constraints_apply() -> None:
    # The train step is lowered as loop.py runs it: under jax.set_mesh. Each block's activation
    # constraint must be in the program (a mesh-less trace would drop them all without a word).
    from gpt2_flax.train import build, init_state

    cfg = load_config(
        None,
        ["mesh.data=4", "mesh.tensor=2"],
        model={"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 300, "n_positions": 16},
        train={"batch_size": 8},
    )
    model = new_model(cfg.model)
    plan = build(model, cfg)
    assert plan.mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3  # jax.make_mesh, types explicit
    rows = jax.sharding.NamedSharding(plan.mesh, P(("data", "fsdp")))
    row = jax.ShapeDtypeStruct((8, 16), np.int32, sharding=rows)
    state = init_state(plan, model)
    batch = {"input_ids": row, "labels": row}
    with jax.set_mesh(plan.mesh):
        under = plan.step_fn.lower(state, batch).as_text().count("sdy.sharding_constraint")
    without = plan.step_fn.lower(state, batch).as_text().count("sdy.sharding_constraint")
    assert under >= 2 and without == 0, (under, without)  # what the mesh context changes


def test_a_large_parameter_the_mesh_does_not_divide_warns() -> None:
    from gpt2_flax.sharding import _fit, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    with pytest.warns(UserWarning, match=r"wte.embedding \(5001, 300\) is replicated .*5001 over fsdp=8"):
        spec = _fit(P("fsdp", None), (5001, 300), mesh, "wte.embedding")
    assert spec == P(None, None)
    assert _fit(P("fsdp", None), (3, 8), mesh, "tiny") == P(None, None)  # small: no warning needed


def test_parameters_are_born_sharded(tokenizer_files, tiny_config) -> None:
    # GPT2(...) never builds the whole model on one device: the init is jitted with out_shardings
    # over all 8 devices (FSDP), so each device holds 1/8 of every sharded parameter from the start.
    from gpt2_flax import GPT2

    ai = GPT2(vocab_file=tokenizer_files[0], merges_file=tokenizer_files[1], config=tiny_config)
    kernel = ai.model.h.mlp.c_fc.kernel[...]  # (L, C, 4C), logical (layers, embed, mlp)
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape == (2, 32 // 8, 128)
    ids = np.arange(32, dtype=np.int32).reshape(2, 16)
    assert ai.model(ids).shape == (2, 16, tiny_config.vocab_size)  # still an ordinary model to call


@pytest.mark.parametrize("mesh", ["mesh.data=8", "mesh.data=4 mesh.fsdp=2"])
def test_microbatch_gradients_are_all_reduced_once_per_step(monkeypatch, mesh: str) -> None:
    """With gradient accumulation on a data axis, each data shard sums its own microbatch gradients
    and the sum is all-reduced once, after the microbatch scan (`train._per_data_shard`), not once
    per microbatch; the step computes what the per-microbatch reduction (one device's) computes."""
    from flax import nnx

    from gpt2_flax import hlo, train
    from gpt2_flax.model import GPT2LMHeadModel

    small = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 300, "n_positions": 16}
    cfg = load_config(None, mesh.split(), model=small, train={"batch_size": 32, "grad_accum_steps": 4})
    toks = np.random.default_rng(0).integers(0, 300, (32, 17))
    batch = {"input_ids": toks[:, :-1].astype(np.int32), "labels": toks[:, 1:].astype(np.int32)}

    def run() -> tuple[dict[str, float], hlo.Collective]:
        model = GPT2LMHeadModel(cfg.model, rngs=nnx.Rngs(0))
        p = train.build(model, cfg)
        state = train.init_state(p, model)
        with jax.set_mesh(p.mesh):
            b = train.to_global(batch, p.mesh)
            module = hlo.parse(p.step_fn.lower(state, b).compile().as_text())
            for _ in range(2):
                state, metrics = p.step_fn(state, b)
        reduced = hlo.collectives(module, hlo.multiplicities(module))["all-reduce"]
        return {k: float(v) for k, v in jax.device_get(metrics).items()}, reduced

    once, reduced_once = run()
    monkeypatch.setattr(train, "_data_shards", lambda: 1)  # the per-microbatch reduction
    each, reduced_each = run()
    assert max_rel_diff(np.array(list(once.values())), np.array(list(each.values()))) < TOL
    grads = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(GPT2LMHeadModel(cfg.model, rngs=nnx.Rngs(0)))))
    if mesh == "mesh.data=8":  # measured: 4 ops, 5x the float32 gradients -> 1 op, 1x
        assert reduced_each.bytes >= 4 * grads and reduced_once.ops == 1, (reduced_each, reduced_once)
        assert reduced_once.bytes < 1.01 * grads, (reduced_once, grads)
    else:  # fsdp still reduces each microbatch's gradients over its own axis (ZeRO-3 by design)
        assert reduced_once.bytes < reduced_each.bytes - grads, (reduced_each, reduced_once, grads)
