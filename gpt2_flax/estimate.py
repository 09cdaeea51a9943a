"""A per-step estimate from the compiled train step (an estimate: no TPU has run it; docs/tpu.md
states the assumptions): FLOPs and HBM bytes with the loop trip counts applied, the splash
kernel's FLOPs (which XLA's cost analysis cannot see) added from the kernels' shapes, a roofline
time per step, the ceiling on tokens/s and MFU it implies, and the collective bytes per step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpt2_flax import hlo, splash


@dataclass(frozen=True)
class StepEstimate:
    xla_flops: float  # per step, all devices: XLA's cost analysis, each loop body x its trip count
    kernel_flops: float  # per step, all devices: the splash kernels, from their shapes
    hbm_bytes: float  # per step, all devices: XLA's bytes accessed, trip counts applied
    loops: str  # the compiled while loops' trip counts, nested: "16 x [12, 12]"
    kernel_calls: int  # per step, per device
    unknown_kernel_calls: int  # TPU kernels not in splash.KERNEL_MATMULS: their FLOPs are missing
    collectives: dict[str, hlo.Collective]  # per device, per step
    roofline_s: float  # max(FLOPs / peak, bytes / bandwidth), the slice working as one
    bound: str  # "compute" or "memory": which side of the roofline sets roofline_s

    @property
    def flops(self) -> float:
        return self.xla_flops + self.kernel_flops


def roofline(flops: float, hbm_bytes: float, peak_flops: float, hbm_bandwidth: float) -> tuple[float, str]:
    """(seconds, bound) of a step that does `flops` and moves `hbm_bytes` on hardware of that peak
    and bandwidth (whole-slice numbers), if compute and memory traffic overlapped perfectly and
    nothing else (collectives, host) took time: a lower bound on the step time."""
    compute = flops / peak_flops if peak_flops else 0.0
    memory = hbm_bytes / hbm_bandwidth if hbm_bandwidth else 0.0
    return max(compute, memory), "compute" if compute >= memory else "memory"


def nested_loops(module: hlo.Module, name: str | None = None) -> str:
    """The while loops' trip counts as they nest: "16 x [12, 12]" (? for an unknown count)."""
    comp = module.computations[name or module.entry]
    parts = []
    for body, _, n in comp.whiles:
        inner = nested_loops(module, body)
        parts.append(("?" if n is None else str(n)) + (f" x [{inner}]" if inner else ""))
    return ", ".join(parts)


def _splash_flops(call: hlo.KernelCall, block: int) -> float | None:
    """One call's FLOPs from its (B, H, T, D) result in the compute dtype (q, dq, dk or dv)."""
    dims = [re.fullmatch(r"(?:bf16|f16|f32)\[(\d+),(\d+),(\d+),(\d+)\]", s) for s in call.shapes]
    bhtd = next((tuple(int(x) for x in m.groups()) for m in dims if m), None)
    return None if bhtd is None else splash.kernel_flops(call.name, *bhtd, block=block)


def estimate_step(
    text: str, n_devices: int, peak_flops: float, hbm_bandwidth: float, block: int
) -> StepEstimate:
    """The estimate for one compiled SPMD program (`compiled.as_text()`) run on `n_devices`;
    peak_flops and hbm_bandwidth of the whole slice; block: the splash block size in use."""
    module = hlo.parse(text)
    mult = hlo.multiplicities(module)
    cost = hlo.loop_cost(module, text, hlo.xla_cost)
    calls = hlo.kernel_calls(module, mult)
    kernel, unknown = 0.0, 0
    for call in calls:
        f = _splash_flops(call, block)
        kernel += (f or 0.0) * call.count
        unknown += call.count if f is None else 0
    flops, hbm_bytes = (cost.flops + kernel) * n_devices, cost.bytes_accessed * n_devices
    seconds, bound = roofline(flops, hbm_bytes, peak_flops, hbm_bandwidth)
    return StepEstimate(
        xla_flops=cost.flops * n_devices,
        kernel_flops=kernel * n_devices,
        hbm_bytes=hbm_bytes,
        loops=nested_loops(module),
        kernel_calls=sum(c.count for c in calls),
        unknown_kernel_calls=unknown,
        collectives=hlo.collectives(module, mult),
        roofline_s=seconds,
        bound=bound,
    )
