"""Ahead-of-time compile of the real train step for a TPU slice this machine does not have.

`jax.experimental.topologies` (with `libtpu` installed; no TPU needed) describes the slice's
devices; the step is lowered on abstract, sharded inputs and compiled by the TPU compiler, which
then tells per-device memory and FLOPs: whether a config fits before a TPU is rented.

    gpt2-flax compile --config configs/gpt2-124m.yaml --topology v5e:2x4
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_flax import splash
from gpt2_flax.config import Config
from gpt2_flax.errors import ConfigError
from gpt2_flax.estimate import StepEstimate, estimate_step
from gpt2_flax.hlo import Collective
from gpt2_flax.metrics import GiB, chip, flops_per_token
from gpt2_flax.model import GPT2LMHeadModel, attention_implementation, compute_dtype
from gpt2_flax.sharding import batch_sharding, make_mesh
from gpt2_flax.train import plan


def _size(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class CompileReport:
    topology: str
    device_kind: str
    n_devices: int
    n_chips: int
    mesh: dict[str, int]
    n_params: int
    argument_bytes: int  # per device: parameters, optimizer state, batch
    temp_bytes: int  # per device: activations and scratch
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (counted once)
    hbm_bytes: int  # per device
    compiler_flops: float  # per step, all devices (includes rematerialised recompute)
    model_flops_per_token: float
    tokens_per_step: int
    peak_flops_per_chip: float
    attention: str  # the implementation the train step uses, and why (model.attention_implementation)
    kernel_calls: int  # TPU custom calls (Pallas kernels such as splash) in the compiled program
    hbm_bandwidth_per_chip: float
    estimate: StepEstimate | None  # None when the program does not fit (nothing compiled)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def tokens_per_s(self, mfu: float) -> float:
        return mfu * self.peak_flops_per_chip * self.n_chips / self.model_flops_per_token

    @property
    def model_flops(self) -> float:
        """Per step: 6N + 12LdT per token (metrics.flops_per_token) times the tokens."""
        return self.model_flops_per_token * self.tokens_per_step

    @property
    def ceiling_tokens_per_s(self) -> float:
        e = self.estimate
        return self.tokens_per_step / e.roofline_s if e and e.roofline_s else 0.0

    @property
    def ceiling_mfu(self) -> float:
        e, peak = self.estimate, self.peak_flops_per_chip * self.n_chips
        return self.model_flops / (e.roofline_s * peak) if e and e.roofline_s and peak else 0.0

    def estimate_lines(self) -> list[str]:
        e = self.estimate
        if e is None:
            return ["estimate: none (the program does not fit, so nothing was compiled to cost)"]
        peak, bandwidth = self.peak_flops_per_chip * self.n_chips, self.hbm_bandwidth_per_chip * self.n_chips
        ms = lambda x, rate: f"{x / rate * 1e3:.4g} ms" if rate else "? ms"  # noqa: E731
        unknown = (
            f", {e.unknown_kernel_calls:,} of unknown kind not counted" if e.unknown_kernel_calls else ""
        )
        coll = [f"{k} {c.ops:,} ops {_size(c.bytes)}" for k, c in e.collectives.items()]
        return [
            f"estimate per step (docs/tpu.md): loops {e.loops} (trip counts from the compiled loops)",
            f"  FLOPs {e.flops:.3e} = XLA {e.xla_flops:.3e} (trip counts applied) + splash kernels "
            f"{e.kernel_flops:.3e} ({e.kernel_calls:,} calls per device{unknown})",
            f"  model FLOPs (6N + 12LdT per token) {self.model_flops:.3e}: "
            f"estimate / model = {e.flops / self.model_flops:.3f}",
            f"  HBM bytes {e.hbm_bytes:.3e} (XLA's bytes accessed, trip counts applied); collectives "
            f"per device: {', '.join(coll) or 'none'}",
            f"  roofline {e.roofline_s * 1e3:.4g} ms per step, {e.bound}-bound ({ms(e.flops, peak)} of "
            f"FLOPs at {self.peak_flops_per_chip / 1e12:.0f} TFLOP/s, {ms(e.hbm_bytes, bandwidth)} of HBM "
            f"at {self.hbm_bandwidth_per_chip / 1e9:,.0f} GB/s per chip; collectives not timed)",
            f"  ceiling {self.ceiling_tokens_per_s:,.0f} tokens/s, MFU {self.ceiling_mfu:.0%}",
        ]

    def format(self) -> str:
        g = _size
        lines = [
            f"topology {self.topology}: {self.n_devices} x {self.device_kind} ({self.n_chips} chips), "
            f"mesh {self.mesh}",
            f"model: {self.n_params / 1e6:.1f}M parameters; {self.tokens_per_step:,} tokens per step",
            f"attention: {self.attention}; {self.kernel_calls} TPU kernel calls in the compiled step",
            f"per-device memory: arguments {g(self.argument_bytes)}, temporaries {g(self.temp_bytes)}, "
            f"outputs {g(self.output_bytes)} (donated {g(self.alias_bytes)})",
            f"total {g(self.total_bytes)} of {g(self.hbm_bytes)} HBM per device -> "
            + ("FITS" if self.fits else "DOES NOT FIT"),
            # XLA's cost analysis counts a loop body once (the layer scan, the microbatch scan) and
            # sees nothing inside a custom call (124M, v5e:2x4: 9.46e12 explicit, 9.04e12 splash).
            "FLOPs per step (compiler, all devices, loop bodies counted once"
            + (", TPU kernels not counted" if self.kernel_calls else "")
            + f"): {self.compiler_flops:.3e}; model FLOPs per token: {self.model_flops_per_token:.3e}",
            f"tokens/s at 40% MFU: {self.tokens_per_s(0.4):,.0f}; at 60% MFU: {self.tokens_per_s(0.6):,.0f}",
            *self.estimate_lines(),
        ]
        return "\n".join(lines)


def topology_devices(topology: str) -> list[Any]:
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        raise ConfigError(
            f"cannot describe TPU topology {topology!r} ({e}); install libtpu (pip install 'gpt2_flax[tpu]') "
            "and use a name like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4"
        ) from e


def compile_for_topology(cfg: Config, topology: str) -> CompileReport:
    """Lowers and compiles the train step of `cfg` for `topology`; nothing is allocated."""
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    spec = chip(kind)
    hbm, peak, bandwidth = (spec.hbm_bytes, spec.peak_flops, spec.hbm_bandwidth) if spec else (0, 0.0, 0.0)
    cores_per_chip = len(devices) // len({tuple(d.coords) for d in devices})
    mesh = make_mesh(cfg.mesh, devices)
    m = cfg.model
    abstract = nnx.eval_shape(lambda: GPT2LMHeadModel(m, platform="tpu"))
    graphdef, state = nnx.split(abstract)
    setup = plan(graphdef, state, cfg, mesh)
    b, t = cfg.train.batch_size, cfg.block_size
    row = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_sharding(mesh))
    with jax.set_mesh(mesh):
        lowered = setup.step_fn.lower(setup.abstract_state, {"input_ids": row, "labels": row})
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    n_chips = len(devices) // cores_per_chip
    block = splash.block_sizes(t, m.n_embd // m.n_head, compute_dtype(m.dtype, "tpu").itemsize).block_q
    estimate = None
    try:
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        sizes = (
            mem.argument_size_in_bytes,
            mem.temp_size_in_bytes,
            mem.output_size_in_bytes,
            mem.alias_size_in_bytes,
        )
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, list | tuple) else cost).get("flops", 0.0))
        text = compiled.as_text()
        kernel_calls = text.count('custom_call_target="tpu_custom_call"')
        estimate = estimate_step(text, len(devices), peak * n_chips, bandwidth * n_chips, block)
    except Exception as e:  # the TPU compiler refuses programs that cannot fit
        sizes, flops = _sizes_from_oom(e, setup.abstract_state), 0.0
        kernel_calls = lowered.as_text().count("tpu_custom_call")  # as lowered: no compiled program
    # As the train step chooses it (dropout in effect in training, unpacked rows as compiled here).
    attention = attention_implementation(m, "tpu", t, dropout=m.dropout, packed=False)
    return CompileReport(
        topology=topology,
        device_kind=kind,
        n_devices=len(devices),
        n_chips=n_chips,
        mesh=dict(mesh.shape),
        n_params=n_params,
        argument_bytes=sizes[0],
        temp_bytes=sizes[1],
        output_bytes=sizes[2],
        alias_bytes=sizes[3],
        hbm_bytes=hbm // cores_per_chip,
        compiler_flops=flops * len(devices),
        model_flops_per_token=flops_per_token(n_params, m.n_layer, m.n_embd, t),
        tokens_per_step=b * t,
        peak_flops_per_chip=peak,
        attention=str(attention),
        kernel_calls=kernel_calls,
        hbm_bandwidth_per_chip=bandwidth,
        estimate=estimate,
    )


def _sizes_from_oom(error: Exception, abstract_state: Any) -> tuple[int, int, int, int]:
    """(arguments, temporaries, outputs, aliased) from "Ran out of memory ... temporaries (127.55G)"."""
    match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or match is None:
        raise error
    temp = int(float(match.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}[match.group(2)])
    # The state stays where it is (donated): count its per-device shard bytes once.
    args = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)
    )
    return args, temp, args, args


def report_dict(report: CompileReport) -> dict[str, Any]:
    out = dataclasses.asdict(report)
    out.update(
        total_bytes=report.total_bytes,
        fits=report.fits,
        tokens_per_s_40=report.tokens_per_s(0.4),
        tokens_per_s_60=report.tokens_per_s(0.6),
        model_flops=report.model_flops,
        ceiling_tokens_per_s=report.ceiling_tokens_per_s,
        ceiling_mfu=report.ceiling_mfu,
    )
    return out


def report_from_dict(d: dict[str, Any]) -> CompileReport:
    """The report of `report_dict` (the --json output) again, e.g. to print it as text."""
    names = {f.name for f in dataclasses.fields(CompileReport)}
    e = d.get("estimate")
    if e is not None:
        collectives = {k: Collective(**c) for k, c in e["collectives"].items()}
        e = StepEstimate(**{**e, "collectives": collectives})
    return CompileReport(**{k: v for k, v in d.items() if k in names and k != "estimate"}, estimate=e)
